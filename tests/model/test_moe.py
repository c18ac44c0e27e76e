"""Mixture-of-Experts models (model/moe/): config parsing, check-config, the fused expert backends, and
greedy ids equal to transformers' through `pdlaunch generate` (float32, CPU) for every family.

TP 2 / expert parallel 2 parity is in tests/tp/test_moe_tp.py, 1P1D serving in tests/serving/test_e2e_moe.py,
the GPU paths (Triton, grouped_mm, CUDA graphs, bf16) in tests/model/test_moe_gpu.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pdlaunch.cli import app
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.model_info import load_model_info
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.plan import plan_deployment
from pdlaunch.model.arch import parse_hf_config
from pdlaunch.model.moe.fused import fused_moe, moe_reference
from pdlaunch.model.moe.layout import TileConfig
from pdlaunch.model.moe.router import route
from pdlaunch.model.tokenizer import Tokenizer
from tests.config.cli_helpers import check
from tests.helpers.checkpoints import MOE_BUILDERS, hf_greedy, hf_model

QWEN3_MOE: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 512, "num_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "head_dim": 32,
}
PROMPT = "The quick brown fox jumps over the lazy dog and"


@pytest.mark.parametrize("kind", list(MOE_BUILDERS))
def test_generate_matches_transformers_greedy(kind: str, moe_ckpt: Callable[[str], Path]) -> None:
    """The user path: `pdlaunch generate` 32 greedy tokens, float32 on CPU (check-config: below)."""
    path = moe_ckpt(kind)
    out = CliRunner().invoke(app, ["generate", "--model", str(path), "--prompt", PROMPT, "--max-tokens", "32",
                                   "--device", "cpu", "--dtype", "float32", "--json"])
    assert out.exit_code == 0, out.output
    ours = json.loads(out.output.strip().splitlines()[-1])["token_ids"]
    assert len(ours) == 32  # no early EOS (the builders' seeds are chosen for it)
    assert ours == hf_greedy(path, Tokenizer(path).encode(PROMPT), 32, stop_at_eos=True)


def test_sparse_layers_follow_decoder_sparse_step_and_mlp_only_layers() -> None:
    moe = parse_hf_config({**QWEN3_MOE, "decoder_sparse_step": 2, "mlp_only_layers": [3]}).moe
    assert moe is not None and moe.sparse_layers == [False, True, False, False]
    assert moe.num_experts == 8 and moe.top_k == 2 and moe.expert_intermediate_size == 32
    assert not moe.norm_topk_prob and moe.checkpoint_style == "mlp"
    mixtral = parse_hf_config({**QWEN3_MOE, "architectures": ["MixtralForCausalLM"], "num_local_experts": 8}).moe
    assert mixtral is not None and mixtral.norm_topk_prob and mixtral.checkpoint_style == "block_sparse_moe"
    assert mixtral.expert_intermediate_size == 128 and all(mixtral.sparse_layers)
    olmoe = parse_hf_config({**QWEN3_MOE, "architectures": ["OlmoeForCausalLM"]})
    assert olmoe.qk_norm_full_width and not olmoe.qk_norm


@pytest.mark.parametrize("change,field", [
    ({"architectures": ["DeepseekV3ForCausalLM"]}, "config.json:architectures"),
    ({"num_experts_per_tok": 9}, "config.json:num_experts_per_tok"),
    ({"architectures": ["OlmoeForCausalLM"], "clip_qkv": 8.0}, "config.json:clip_qkv"),
])
def test_unsupported_moe_configs_are_refused_with_the_key(change: dict[str, Any], field: str) -> None:
    with pytest.raises(PdlaunchError) as err:
        parse_hf_config({**QWEN3_MOE, **change})
    assert err.value.field == field


def test_check_config_names_a_missing_and_a_misshapen_expert_tensor(moe_ckpt: Callable[[str], Path],
                                                                     tmp_path: Path) -> None:
    broken = Path(shutil.copytree(moe_ckpt("mixtral"), tmp_path / "broken"))
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    tensors["model.layers.0.block_sparse_moe.experts.2.w2.weight"] = torch.zeros(64, 16)
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    result = check(["--model", str(broken), "--device", "cpu"])
    assert result.exit_code == 1
    assert "model.layers.0.block_sparse_moe.experts.2.w2.weight" in result.output
    assert "expert 2 down projection" in result.output and "(64, 16)" in result.output
    del tensors["model.layers.0.block_sparse_moe.experts.2.w2.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    result = check(["--model", str(broken), "--device", "cpu"])
    assert result.exit_code == 1 and "model.layers.1.block_sparse_moe.experts.3.w3.weight" in result.output


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe", "olmoe"])
def test_parameter_count_equals_transformers(kind: str, moe_ckpt: Callable[[str], Path]) -> None:
    info, problems = load_model_info(str(moe_ckpt(kind)))
    assert info is not None and not problems
    assert info.num_parameters() == sum(p.numel() for p in hf_model(moe_ckpt(kind)).parameters())


def test_expert_parallel_needs_experts_to_divide_by_tp(moe_ckpt: Callable[[str], Path]) -> None:
    path = str(moe_ckpt("qwen3_moe"))  # 4 experts of width 32
    ok = check(["--model", path, "--device", "cpu", "--tp", "4", "--enable-expert-parallel"])
    assert ok.exit_code == 0, ok.output
    bad = check(["--model", path, "--device", "cpu", "--tp", "8", "--enable-expert-parallel"])
    assert bad.exit_code == 1 and "4 experts to divide by it" in bad.output
    assert "heads" not in check(["--model", path, "--device", "cpu", "--tp", "4"]).output


@pytest.mark.parametrize("flag,role", [("--decode-expert-parallel", "decode"),
                                       ("--no-prefill-expert-parallel", "prefill")])
def test_a_role_expert_parallel_flag_on_a_colocated_deployment_has_no_effect(flag: str, role: str,
                                                                             moe_ckpt: Callable[[str], Path]) -> None:
    """It made a {role} group, refused as "a decode group in a colocated deployment; remove the group (and
    --prefill/--decode)": a group and flags the user never wrote. --decode-tp warns that it has no effect there."""
    result = check(["--model", str(moe_ckpt("qwen3_moe")), "--device", "cpu", "--colocated", flag])
    output = " ".join(result.output.split())
    assert result.exit_code == 0, output
    assert f"warning: {flag}: has no effect: every instance is colocated, with no {role} instance to take it; " \
           "drop it; colocated instances follow --enable-expert-parallel (parallel.enable_expert_parallel)" in output


def test_expert_parallel_per_instance_group(moe_ckpt: Callable[[str], Path]) -> None:
    """`--decode-expert-parallel` (YAML `instances[i].enable_expert_parallel`) overrides the deployment's mode
    for one group: check-config checks E % tp for that group only, and the launcher's spec carries it."""
    path = str(moe_ckpt("qwen3_moe"))  # 4 experts of width 32
    assert check(["--model", path, "--device", "cpu", "--prefill-tp", "2", "--decode-tp", "4",
                  "--decode-expert-parallel"]).exit_code == 0
    base = ["--model", path, "--device", "cpu", "--tp", "8"]  # 8 > 4 experts (and heads: said once for --tp)

    def expert_errors(args: list[str]) -> list[str]:
        """The expert-parallel lines, each after `--tp: `: a line for only some of the groups --tp reached names
        them."""
        lines = check([*base, *args]).output.splitlines()
        return [line.removeprefix("error: --tp: ").split("expert parallel over TP 8")[0] for line in lines
                if "expert parallel over TP 8" in line and line.startswith("error: --tp: ")]

    assert expert_errors(["--decode-expert-parallel"]) == ["instances[1] (decode): "]
    assert expert_errors(["--enable-expert-parallel", "--no-decode-expert-parallel"]) == ["instances[0] (prefill): "]
    assert expert_errors(["--enable-expert-parallel"]) == [""]  # every group: once, naming none
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "model": {"path": path}, "proxy": {"port": 0},
        "parallel": {"tp": 2, "enable_expert_parallel": True},
        "instances": [{"role": "prefill", "tp": 2, "enable_expert_parallel": False}, {"role": "decode", "tp": 2}]})
    specs = {p.spec.role: p.spec for p in plan_deployment(cfg).instances}
    assert (specs["prefill"].expert_parallel, specs["decode"].expert_parallel) == (False, True)


def _case(tokens: int, experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 64, generator=gen)
    w13 = 0.1 * torch.randn(experts, 64, 64, generator=gen)
    w2 = 0.1 * torch.randn(experts, 64, 32, generator=gen)
    weights, ids = route(torch.randn(tokens, experts, generator=gen), top_k, True)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_grouped_mm_backend_equals_the_reference_loop(tokens: int) -> None:
    """The sorted, sync-free path (what CUDA runs) against the per-expert loop, also with half the experts
    on this rank (expert parallel: the other half contributes zero here)."""
    x, w13, w2, weights, ids = _case(tokens, 8, 3, seed=tokens)
    try:
        got = fused_moe(x, w13, w2, weights, ids, use="grouped_mm")
    except RuntimeError as exc:  # torch builds without a CPU grouped GEMM
        pytest.skip(f"torch._grouped_mm does not run on this CPU build: {exc}")
    torch.testing.assert_close(got, moe_reference(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)
    half = fused_moe(x, w13[4:], w2[4:], weights, ids, expert_start=4, use="grouped_mm")
    torch.testing.assert_close(half, moe_reference(x, w13[4:], w2[4:], weights, ids, 4), rtol=1e-5, atol=1e-5)
    other = moe_reference(x, w13[:4], w2[:4], weights, ids, 0)
    torch.testing.assert_close(half + other, moe_reference(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)


def test_block_layout_gives_each_block_one_expert_and_every_assignment_one_row() -> None:
    from pdlaunch.model.moe.layout import align_to_blocks

    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [5, 3], [3, 5]])  # expert 5: another rank's (local ids 0..3)
    local = torch.where(ids < 4, ids, 4)
    rows, block_expert = align_to_blocks(local, 4, block_m=2)
    assert rows.shape[0] == block_expert.shape[0] * 2 and block_expert.shape[0] == 5 + 4
    _check_blocks(local, 4, rows, block_expert, 2)
    few = torch.tensor([[3, 0], [9, 3]])  # 4 assignments of 16 experts: a block each, no sort
    rows, block_expert = align_to_blocks(few, 16, block_m=2)
    assert block_expert.tolist() == [3, 0, 9, 3]
    _check_blocks(few, 16, rows, block_expert, 2)


def _check_blocks(local: torch.Tensor, num_local: int, rows: torch.Tensor, block_expert: torch.Tensor,
                  block_m: int) -> None:
    """Every assignment to a local expert has exactly one row, in a block of its expert; no other rows."""
    flat = local.reshape(-1)
    kept = sorted(int(r) for r in rows if r < flat.numel())
    assert kept == [i for i in range(flat.numel()) if flat[i] < num_local]
    for b, e in enumerate(block_expert.tolist()):
        members = [int(r) for r in rows[block_m * b:block_m * (b + 1)] if r < flat.numel()]
        if e < 0:
            assert not members
        else:
            assert members and all(int(flat[r]) == e for r in members)


@pytest.mark.parametrize("tp,replicas", [(2, 1), (4, 2)])
def test_norm_over_a_width_split_across_ranks_equals_the_whole_norm(tp: int, replicas: int,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """OLMoE's k_norm at TP 2 (each rank one of 2 KV heads) and TP 4 (each KV head on two ranks: its squares
    reach the all-reduce twice and are divided back out): every rank's columns equal the unsplit norm's."""
    from pdlaunch.model import sharded_norm
    from pdlaunch.model.sharded_norm import ShardedRMSNorm

    heads, head_dim = 2, 8
    x = torch.randn(5, heads * head_dim)
    weight = torch.randn(heads * head_dim)
    whole = ShardedRMSNorm(heads * head_dim, heads * head_dim, 0, 1e-5)
    whole.weight_loader(whole.weight, weight)
    want = whole(x)
    head_of = [r * heads // tp for r in range(tp)]  # QKVParallelLinear's KV head per rank
    squares = sum(x[:, h * head_dim:(h + 1) * head_dim].pow(2).sum(-1, keepdim=True) for h in head_of)
    monkeypatch.setattr(sharded_norm.dist, "all_reduce", lambda t: t.copy_(squares))
    for rank, head in enumerate(head_of):
        cols = slice(head * head_dim, (head + 1) * head_dim)
        norm = ShardedRMSNorm(heads * head_dim, head_dim, head * head_dim, 1e-5, tp, replicas)
        norm.weight_loader(norm.weight, weight)
        torch.testing.assert_close(norm(x[:, cols]), want[:, cols], msg=f"rank {rank}")


def test_every_shipped_tile_file_loads_and_covers_every_size() -> None:
    """pdlaunch/model/moe/configs/*.json (written by benchmarks/moe_kernels.py --write-config): each loads as
    the engine reads it on that device, ascending, the last entry covering any size; swap_ab tiles keep the
    weight tile at the warpgroup MMA's 64 rows or more; fp8_activations only in fp8 files."""
    from pdlaunch.model.moe.fused import CONFIG_DIR, config_file, device_tiles

    files = sorted(CONFIG_DIR.glob("*.json"))
    assert {f.name for f in files} >= {"NVIDIA_H200.json", "NVIDIA_H100_80GB_HBM3.json",
                                       "NVIDIA_H100_80GB_HBM3_fp8.json"}
    for path in files:
        device = json.loads(path.read_text())["device"]
        fp8 = path.stem.endswith("_fp8")
        assert config_file(device, fp8) == path
        tiles = device_tiles(device, fp8)
        assert [t.max_tokens for t in tiles] == sorted(t.max_tokens for t in tiles)
        assert tiles[-1].max_tokens >= 1 << 30, path.name
        assert all(t.block_n >= 64 for t in tiles if t.swap_ab), path.name
        assert all(t.down().block_n >= 64 for t in tiles if t.down().swap_ab), path.name
        assert fp8 or not any(t.fp8_activations for t in tiles), path.name


def test_moe_tile_override_replaces_the_file_s_fields_for_the_calls_it_covers(monkeypatch: pytest.MonkeyPatch) -> None:
    """PDLAUNCH_MOE_TILE (benchmarks time a tile inside whole steps before it goes into a file): its fields replace
    the chosen entry's for calls of at most its max_tokens, and reach the Triton launch through fused_moe."""
    from pdlaunch.model.moe import fused, triton_moe

    x = torch.zeros(1, 64)
    plain = fused.tile_for(x, 1)
    monkeypatch.setenv("PDLAUNCH_MOE_TILE", "block_n=32:num_stages=4:swap_ab=1:max_tokens=1")
    one = fused.tile_for(x, 1)
    assert (one.block_n, one.num_stages, one.swap_ab) == (32, 4, True)
    assert (one.block_m, one.block_k, one.max_tokens) == (plain.block_m, plain.block_k, plain.max_tokens)
    assert fused.tile_for(x, 2) == fused.tile_for(torch.zeros(2, 64), 2) != one  # past max_tokens: the file's
    assert one.down() == one  # no down_ field: the down GEMM launches as the gate/up GEMM
    monkeypatch.setenv("PDLAUNCH_MOE_TILE", "block_n=32:down_block_n=128:down_block_k=256:down_num_stages=2:"
                                            "down_num_warps=8:down_swap_ab=0:max_tokens=1")
    apart, down = fused.tile_for(x, 1), fused.tile_for(x, 1).down()
    assert (apart.block_n, apart.block_k, apart.num_stages, apart.num_warps) == (32, plain.block_k,
                                                                                 plain.num_stages, plain.num_warps)
    assert (down.block_n, down.block_k, down.num_stages, down.num_warps, down.swap_ab) == (128, 256, 2, 8, False)
    assert down.block_m == apart.block_m  # one row layout for both GEMMs
    monkeypatch.setenv("PDLAUNCH_MOE_TILE", "block_k=32:num_stages=3")
    assert (fused.tile_for(x, 4096).block_k, fused.tile_for(x, 4096).num_stages) == (32, 3)  # every call
    seen: list[TileConfig] = []

    def recording(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(args[5])  # type: ignore[arg-type]  # (w13, w2, weights, ids, expert_start, tile, ...)
        return x

    monkeypatch.setattr(triton_moe, "triton_moe", recording)
    w13, w2 = torch.zeros(4, 16, 64), torch.zeros(4, 64, 8)
    fused.fused_moe(x, w13, w2, torch.ones(1, 2), torch.tensor([[0, 1]]), use="triton")
    assert seen and seen[0].block_k == 32


@pytest.mark.parametrize("setting,words", [
    ("block_n=48", "out of range"), ("num_warps=0", "out of range"), ("swap_ab=2", "out of range"),
    ("num_stages=0", "out of range"), ("max_tokens=0", "out of range"), ("down_block_k=96", "out of range"),
    ("down_num_stages=0", "out of range"), ("down_swap_ab=3", "out of range"),
    ("block_size=64", "not a tile field"), ("block_n=big", "not a tile field"), ("block_n", "not a tile field")])
def test_a_bad_moe_tile_override_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch, setting: str,
                                                      words: str) -> None:
    from pdlaunch.model.moe import fused

    monkeypatch.setenv("PDLAUNCH_MOE_TILE", setting)
    with pytest.raises(PdlaunchError) as caught:
        fused.tile_for(torch.zeros(1, 64), 1)
    assert caught.value.field == "PDLAUNCH_MOE_TILE" and words in str(caught.value) and setting in str(caught.value)
