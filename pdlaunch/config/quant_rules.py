"""FP8 rules that need the deployment: a block-FP8 checkpoint's projections must split on 128 edges at
the TP size of every instance group (each rank's block scales cover whole blocks of its shard)."""

from __future__ import annotations

import os
from pathlib import Path

from pdlaunch.config.models import DeploymentConfig
from pdlaunch.config.problems import Problem, problem
from pdlaunch.errors import PdlaunchError


def fp8_tp_problems(cfg: DeploymentConfig) -> list[Problem]:
    """One problem per instance group whose TP size cuts a block-FP8 projection off a 128 edge."""
    from pdlaunch.model.arch import load_arch  # layering: lazy (torch stays off config-only paths)
    from pdlaunch.model.quant.config import BLOCK, load_quant_config
    from pdlaunch.model.quant.linear import block_misaligned

    if cfg.model.path in ("demo", "tiny") or cfg.model.path.lower().endswith(".gguf"):
        return []
    directory = Path(os.path.expanduser(cfg.model.path))
    try:
        quant = load_quant_config(directory, cfg.model.quantization)
        arch = load_arch(directory)
    except PdlaunchError:
        return []  # reported by checkpoint_problems
    if quant is None or quant.scheme != "block":
        return []
    problems: list[Problem] = []
    for i, group in enumerate(cfg.instances):
        tp = group.tp or 1
        bad = block_misaligned(arch, tp)
        if bad:
            problems.append(problem(f"instances[{i}].tp", f"TP {tp} splits the block-FP8 projections {', '.join(bad)} "
                                    f"off the {BLOCK}-wide scale blocks", "use a TP size whose shards are whole "
                                    f"{BLOCK}-row blocks (or a per-channel FP8 checkpoint)"))
    return problems
