"""Warnings (not errors) for settings that do nothing with this model, so a user does not believe them on.

vLLM accepts `--enable-expert-parallel` with a dense model and says nothing; here check-config and serve say
that it places nothing (a dense model has no experts), naming the flag or field the user set.
"""

from __future__ import annotations

from pdlaunch.config.model_info import ModelInfo
from pdlaunch.config.models import DeploymentConfig
from pdlaunch.config.problems import Problem, problem


def no_effect_warnings(cfg: DeploymentConfig, info: ModelInfo | None) -> list[Problem]:
    """Expert parallelism asked for (deployment-wide or per group) on a model without experts."""
    if info is None or info.moe is not None:
        return []
    fields = ["parallel.enable_expert_parallel"] if cfg.parallel.enable_expert_parallel else []
    fields += [f"instances[{i}].enable_expert_parallel" for i, group in enumerate(cfg.instances)
               if group.enable_expert_parallel]
    return [problem(field, f"has no effect: {cfg.model.path!r} ({info.architecture}) is a dense model, with no "
                    "experts to place", "drop it, or serve a Mixture-of-Experts checkpoint") for field in fields]
