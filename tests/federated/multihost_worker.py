"""One process of a multi-host run on localhost, or the one-process run it is compared to.

``python -m tests.federated.multihost_worker MODEL_DIR WORKDIR PORT PROCESS_ID
NUM_PROCESSES ALGORITHMS [--stall-after-round R]`` runs `fedsp.run` for 2 rounds of each
algorithm of the comma-separated ``ALGORITHMS`` (SPEAR; TPAW with its on-disk player
pool) on a tiny model into ``WORKDIR/<algorithm>``, with a (2, 2) mesh over the job's 4
devices: 2 processes × 2 CPU devices joined through ``jax.distributed`` (coordinator on
127.0.0.1:PORT), or, with NUM_PROCESSES = 1, one process with 4 devices. The caller sets
the device count. Afterwards every process restores the final checkpoint and writes its
adapters and the run's metrics to ``WORKDIR/<algorithm>/process_<id>.npz``.

With ``--stall-after-round R`` process 1 stops making progress in round R + 1 (after
round R's checkpoint) and prints "stalls", for the caller to kill it.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import jax
import numpy as np

import fedsp
from fedsp import distributed
from fedsp.data import FEEDBACK_PROVIDERS
from tests.federated.mesh_worker import CoinFlip, config_for


def multihost_config(model_dir: str, algorithm: str, port: int, process_id: int, processes: int):
    config = config_for(pathlib.Path(model_dir), algorithm, (2, 2))
    config.fl.clients_per_round = 4
    config.data.num_clients = 4
    config.log.tensorboard = True
    if processes > 1:
        config.distributed.initialize = True
        config.distributed.coordinator_address = f"127.0.0.1:{port}"
        config.distributed.coordinator_bind_address = f"127.0.0.1:{port}"
        config.distributed.num_processes = processes
        config.distributed.process_id = process_id
        config.distributed.initialization_timeout_s = 120
        config.distributed.heartbeat_timeout_s = 10
    return config


def stall_after(rnd: int) -> fedsp.RoundHooks:
    def stall(current: int, uploads) -> None:
        if current > rnd:
            print("stalls", flush=True)
            time.sleep(3600)

    return fedsp.RoundHooks(on_uploads=stall)


def main(argv: list[str]) -> None:
    model_dir, workdir, port, process_id, processes, algorithms = argv[:6]
    stall = int(argv[7]) if argv[6:7] == ["--stall-after-round"] else None
    FEEDBACK_PROVIDERS["coinflip"] = CoinFlip
    for algorithm in algorithms.split(","):
        config = multihost_config(model_dir, algorithm, int(port), int(process_id), int(processes))
        run_dir = pathlib.Path(workdir) / algorithm
        hooks = stall_after(stall) if stall is not None and process_id == "1" else None
        fedsp.run(config, run_dir, hooks=hooks)
        state = fedsp.init_run(config, workdir=run_dir)  # the final checkpoint, restored
        params = jax.tree_util.tree_flatten_with_path(distributed.to_host(state.params))[0]
        arrays = {f"params/{jax.tree_util.keystr(path)}": leaf for path, leaf in params}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    arrays[f"metric/{record['round']}/{key}"] = np.asarray(value, np.float64)
        assert state.run is not None
        state.run.close()
        np.savez(run_dir / f"process_{process_id}.npz", **arrays)
        print(algorithm, "done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
