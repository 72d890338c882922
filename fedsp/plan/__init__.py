"""Capacity planning: will a config's round fit a device target, before renting it?

The round's programs (`fedsp.plan.programs`: the sampler, the clients' mapped local
training, the server step, player scoring, evaluation) are lowered from shapes alone
(`fedsp.plan.abstract`: no weights are read or drawn) on a target's mesh
(`fedsp.plan.targets`: a TPU topology compiled through libtpu without TPU hardware, N
simulated CPU devices, or a GPU as an estimate), compiled, and their per-device memory
and FLOPs reported (`fedsp.plan.planner`). ``python -m experiments.plan`` is the command
line; BENCHMARKS.md ("Capacity planner") holds the tables and the planner-vs-measured
check.

    target = get_target("v5e:2x4")
    plan = plan_round(config, target, model_config_from_dir("/models/Qwen2.5-1.5B"))
    print(plan.fits, plan.peak_bytes)
"""

from fedsp.plan.abstract import model_config_from_dir
from fedsp.plan.planner import Plan, ProgramPlan, check_config, plan_round
from fedsp.plan.programs import Shapes
from fedsp.plan.targets import Target, get_target

__all__ = [
    "Plan",
    "ProgramPlan",
    "Shapes",
    "Target",
    "check_config",
    "get_target",
    "model_config_from_dir",
    "plan_round",
]
