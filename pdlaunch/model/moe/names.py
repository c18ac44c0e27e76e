"""Checkpoint tensor names of MoE layers <-> our stacked expert parameters.

HF checkpoints hold one tensor per expert and projection: `...mlp.experts.{e}.gate_proj.weight`
(Qwen2/Qwen3-MoE, OLMoE) or `...block_sparse_moe.experts.{e}.w1.weight` (Mixtral: w1 gate, w3 up,
w2 down). Our model stacks them per layer in `...mlp.experts.w13` (gate rows, then up rows) and
`...mlp.experts.w2`; the shard id tells the parameter's weight_loader which expert and which half.
Mixtral's router `block_sparse_moe.gate` is our `mlp.gate`.
"""

from __future__ import annotations

import re

from pdlaunch.model.moe.config import MoeArch

_EXPERT = re.compile(r"^(?P<prefix>.*)\.(?P<block>mlp|block_sparse_moe)\.experts\.(?P<e>\d+)\."
                     r"(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
# checkpoint projection -> (our stacked parameter, half of w13 or None for w2)
_PROJ = {"gate_proj": ("w13", "gate"), "up_proj": ("w13", "up"), "down_proj": ("w2", None),
         "w1": ("w13", "gate"), "w3": ("w13", "up"), "w2": ("w2", None)}
_NAMES = {"mlp": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
          "block_sparse_moe": {"gate": "w1", "up": "w3", "down": "w2"}}
ExpertShard = tuple[str, int] | int  # ("gate" | "up", expert) for w13, expert for w2


def expert_target(name: str) -> tuple[str, ExpertShard | None] | None:
    """Checkpoint name -> (our parameter name, weight_loader shard id), or None if not an MoE tensor."""
    m = _EXPERT.match(name)
    if m is not None:
        param, half = _PROJ[m["proj"]]
        expert = int(m["e"])
        return f"{m['prefix']}.mlp.experts.{param}", (half, expert) if half else expert
    if name.endswith(".block_sparse_moe.gate.weight"):
        return name.replace(".block_sparse_moe.gate.", ".mlp.gate."), None
    return None


def expert_checkpoint_names(param_name: str, moe: MoeArch) -> list[str] | None:
    """Our parameter name -> the checkpoint names it is loaded from (all experts, whatever this rank
    holds), or None when it is not an MoE parameter."""
    names = _NAMES[moe.checkpoint_style]
    block = moe.checkpoint_style
    for param, projs in (("w13", ("gate", "up")), ("w2", ("down",))):
        suffix = f".mlp.experts.{param}"
        if param_name.endswith(suffix):
            prefix = param_name.removesuffix(suffix)
            return [f"{prefix}.{block}.experts.{e}.{names[p]}.weight" for e in range(moe.num_experts) for p in projs]
    if block == "block_sparse_moe" and param_name.endswith(".mlp.gate.weight"):
        return [param_name.replace(".mlp.gate.", ".block_sparse_moe.gate.")]
    return None
