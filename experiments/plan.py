"""Plans one experiment's round for a device target without the target or the weights:

    python -m experiments.plan --config=experiments/configs/spear/arc_challenge_llama3p2_3b.py \\
        --topology=v5e:2x4 [--mesh=C,M] [--config.local.micro_batch_size=4 ...]

prints, per program of the round (rollout sampler, local training, server step, player
scoring, evaluation), the per-device argument, output, temporary and peak bytes, the
FLOPs, and whether the round fits one device's memory (`fedsp.plan`). The exit status
is 0 when it fits, 1 when it does not.

``--topology``: a TPU topology ("v5e:2x4", "v5p:2x2x1", "v4:2x2x1" or "v5e-8", "v5p-8",
"v4-8"; needs ``pip install -e '.[plan]'``), "cpu:N" (N simulated CPU devices), or
"h100x8" (an estimate: compiled for 8 CPU devices, judged against 80 GB); by default
the target the config file names in ``PLAN_TARGET`` (the paper configs are fitted for
theirs), else "cpu:1". ``--mesh``
overrides ``fl.mesh`` (each axis an int or "auto"). The architecture comes from
``model.path``'s config.json, else from ``--model_config`` (a config.json, a model
directory, or a name of `MODEL_CONFIGS`), else from the name in ``model.path`` when it is
one of `MODEL_CONFIGS` ("" is the default SmolLM2).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

# JAX reads these when it starts, which is while the flags are parsed (the config file
# imports fedsp): the planner never runs on a real accelerator, and cpu:N needs N devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _cpu_devices(argv: list[str]) -> int:
    """Devices a cpu:N or GPU-estimate ``--topology`` in ``argv`` needs (1 otherwise)."""
    names = [a.split("=", 1)[1] for a in argv if a.startswith("--topology=")]
    for i, a in enumerate(argv[:-1]):
        if a == "--topology":
            names.append(argv[i + 1])
    count = 1
    for name in names:
        if name.startswith("cpu:") and name[4:].isdigit():
            count = max(count, int(name[4:]))
        elif name == "h100x8":
            count = max(count, 8)
    return count


if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_cpu_devices(sys.argv)}"
    ).strip()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "target: a TPU topology (v5e:2x4, v5p-8, ...), cpu:N or h100x8 (default: the config "
    "file's PLAN_TARGET, else cpu:1)",
)
_MESH = flags.DEFINE_string("mesh", None, "C,M: the (clients, model) mesh (overrides fl.mesh)")
_MODEL_CONFIG = flags.DEFINE_string(
    "model_config", None, "the architecture: a config.json, a model directory or a known name"
)
_SEQ_LEN = flags.DEFINE_integer(
    "seq_len", None, "longest sequence of the round (default: local.max_len)"
)
_EVAL_LEN = flags.DEFINE_integer("eval_len", 256, "tokens of a log-likelihood evaluation row")
_PROGRAMS = flags.DEFINE_list("programs", None, "only these programs (rollout, train, ...)")
_JSON = flags.DEFINE_string("json", None, "append the plan as one JSON line to this file")

_HERE = pathlib.Path(__file__).resolve().parent
# Hugging Face names the paper configs use → the architecture fields of their config.json.
MODEL_CONFIGS = {
    "": "smollm2_135m.json",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2_135m.json",
    "Qwen/Qwen2.5-1.5B": "qwen2p5_1p5b.json",
    "meta-llama/Llama-3.2-3B": "llama3p2_3b.json",
    "meta-llama/Llama-3.1-8B": "llama3p1_8b.json",
}


def model_config(model_path: str, override: str | None):
    """The `ModelConfig` to plan (see the module docstring).

    Raises:
      ValueError: none of the sources gives a config.json; names ``model.path`` and
        ``--model_config``.
    """
    from fedsp.model.config import ModelConfig
    from fedsp.plan import model_config_from_dir

    source = override if override is not None else model_path
    if source in MODEL_CONFIGS:
        file = _HERE / "model_configs" / MODEL_CONFIGS[source]
        return ModelConfig.from_hf(json.loads(file.read_text()))
    path = pathlib.Path(source).expanduser()
    if path.is_file() and path.suffix == ".json":
        return ModelConfig.from_hf(json.loads(path.read_text()))
    if path.is_dir():
        return model_config_from_dir(path)
    field = "--model_config" if override is not None else "model.path"
    raise ValueError(
        f"{field}={source!r}: no config.json there and not one of the known models "
        f"{sorted(k for k in MODEL_CONFIGS if k)}; pass --model_config=<config.json or "
        "model directory>"
    )


def levers(config) -> dict[str, object]:
    """The config fields that change a round's memory but not its numbers."""
    return {
        "fl.clients_per_round": config.fl.clients_per_round,
        "model.remat": config.model.remat,
        "local.micro_batch_size": config.local.micro_batch_size,
        "rollout.batch_size": config.rollout.batch_size,
        "rollout.reuse_cache": config.rollout.reuse_cache,
        "eval.batch_size": config.eval.batch_size,
    }


def file_target(config_file: str) -> str:
    """The ``PLAN_TARGET`` a config file declares, else "cpu:1"."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_planned_config", config_file)
    if spec is None or spec.loader is None:
        return "cpu:1"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(getattr(module, "PLAN_TARGET", "cpu:1"))


def parse_mesh(text: str | None) -> tuple[int | str, int | str] | None:
    """``"C,M"`` → (C, M), each an int or "auto"; None stays None.

    Raises:
      ValueError: not two comma-separated values (names ``--mesh``).
    """
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(p == "auto" or p.isdigit() for p in parts):
        raise ValueError(f"--mesh: expected C,M (each an integer or 'auto'), got {text!r}")
    clients, model = (p if p == "auto" else int(p) for p in parts)
    return clients, model


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from fedsp.plan import Shapes, get_target, plan_round
    from fedsp.plan.report import format_plan, plan_dict

    config = _CONFIG.value
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    try:
        target = get_target(_TOPOLOGY.value or file_target(config_file))
        plan = plan_round(
            config,
            target,
            model_config(config.model.path, _MODEL_CONFIG.value),
            mesh=parse_mesh(_MESH.value),
            shapes=Shapes(seq_len=_SEQ_LEN.value, eval_len=_EVAL_LEN.value),
            programs=_PROGRAMS.value,
        )
    except (ValueError, FileNotFoundError) as err:
        raise app.UsageError(str(err)) from None
    print(format_plan(plan))
    if _JSON.value:
        record = {"config": config_file, "levers": levers(config), **plan_dict(plan)}
        with open(_JSON.value, "a") as f:
            f.write(json.dumps(record) + "\n")
    sys.stdout.flush()
    sys.exit(0 if plan.fits else 1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
