"""What the CPU tier for evicted KV blocks (`cache.kv_offload_gb`) needs, refused here as every instance would
refuse it at start (engine/llm_engine.py `_create_offload`), after serve has started its processes and loaded the
weights: prefix caching (an offloaded block is found again by its prefix), and TP 1."""

from __future__ import annotations

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.problems import Problem, problem


def offload_problems(cfg: DeploymentConfig) -> list[Problem]:
    """The KV offload tier without prefix caching, or in a group of TP > 1 (the resolved config: TP per group)."""
    if cfg.cache.kv_offload_gb <= 0:
        return []
    problems: list[Problem] = []
    if not cfg.cache.enable_prefix_caching:
        problems.append(problem("cache.kv_offload_gb", "KV offload needs prefix caching (an offloaded block is "
                                "found again by its prefix), and prefix caching is off",
                                "drop --no-enable-prefix-caching, or set --kv-offload-gb 0"))
    spanning = [f"instances[{i}] ({g.role}, TP {g.tp})" for i, g in enumerate(cfg.instances)
                if (g.tp or 1) > 1 and g.count > 0]
    if spanning:
        problems.append(problem("cache.kv_offload_gb", f"KV offload runs with TP 1 only: {', '.join(spanning)}",
                                "set --kv-offload-gb 0, or run those groups with TP 1"))
    return problems
