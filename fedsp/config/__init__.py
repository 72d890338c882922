"""The experiment config: ``default_config()`` is the whole schema, ``validate`` checks it.

The schema and its defaults live in `fedsp.config.schema`, the checks in
`fedsp.config.validation`; this package exports both.

Every run, table cell and notebook starts from ``default_config()`` and changes only what
differs, so every field exists everywhere, ``--config.<section>.<field>=value`` works for
all of them, and there is one set of defaults: the library's consumers (`HParams`,
`SamplingParams`, the round loop) read validated fields and keep no defaults of their own.
The config holds no run-directory paths: the run directory is ``fedsp.run``'s ``workdir``.

Sections:
  seed        the one seed every random choice derives from (with the round index);
  model       path ("" = the default SmolLM2-135M-Instruct asset), dtype, lora, remat
              (per-layer rematerialisation: none | full | dots);
  task        name, data_dir ("" = $FEDSP_DATA_DIR), options, train/eval split;
  data        num_clients, partition (iid | dirichlet over `Example.label`), alpha,
              examples_per_client (cap per client, 0 = no cap), limit (train examples
              loaded before partitioning, 0 = all);
  algorithm   client algorithm and its hyper-parameters (see `fedsp.selfplay`);
  rollout     prompts per client per round and sampling settings;
  local       local training: steps, batch size, micro_batch_size (gradient
              accumulation, 0 = none), learning-rate schedule, max_len;
  fl          rounds, client sampling, client mapping backend (and clients_at_once:
              a device's clients trained together, or k at a time), the (clients, model)
              device mesh, server optimizer, client weighting and pruning;
  eval        evaluation cadence and size;
  distributed how the processes of a multi-host run find each other (`fedsp.distributed`);
  checkpoint  run-state checkpoint cadence and retention;
  log         TensorBoard and the progress bar.

``validate(config)`` checks every field a run reads before anything heavy (model load,
compilation) happens, and raises one ``ValueError`` that lists every problem, each
naming the field (``fl.backend``), the value it got and what it accepts. The algorithm
and task names it accepts come from the open registries (`fedsp.register_algorithm`,
`fedsp.register_task`).
"""

from fedsp.config.schema import (
    DTYPES,
    MULTIPLE_CHOICE_EVALS,
    PARTITIONS,
    default_config,
    requested_mesh,
)
from fedsp.config.validation import validate

__all__ = [
    "DTYPES",
    "MULTIPLE_CHOICE_EVALS",
    "PARTITIONS",
    "default_config",
    "requested_mesh",
    "validate",
]
