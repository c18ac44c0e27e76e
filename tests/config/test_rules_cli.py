"""check-config, one test (or more) per validation rule, through the CLI as a user runs it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pdlaunch.config.rules.security import SECRET_ENV
from pdlaunch.config.validate import SLEEP_ENABLES_CUMEM
from tests.config.cli_helpers import FREE_PORT, assert_invalid, check, check_json, write_model, write_yaml


def gpus(count: int) -> list[str]:
    """Check as if on a CUDA host with `count` 80 GiB GPUs."""
    return ["--device", "cuda", "--target-gpus", str(count), "--target-gpu-memory", "80"]


GPU2 = gpus(2)


@pytest.fixture(autouse=True)
def _deployment_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The multi-node configs here are about other rules; a shared secret is tested in test_security_rules."""
    monkeypatch.setenv(SECRET_ENV, "rules-test-secret-0123456789")


# --- vLLM #33540: cumem allocator and sleep mode ---------------------------------------------

def test_cumem_on_cpu_is_not_supported() -> None:
    result = check(["--model", "tiny", "--device", "cpu", "--enable-cumem-allocator"])
    assert_invalid(result, "--enable-cumem-allocator", "cumem allocator is not supported on current platform")


def test_sleep_mode_on_cpu_is_not_supported() -> None:
    result = check(["--model", "tiny", "--device", "cpu", "--enable-sleep-mode"])
    assert_invalid(result, "--enable-sleep-mode", "sleep mode is not supported on current platform")


def test_sleep_mode_turns_cumem_on_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pdlaunch.config.validate")
    for _ in range(2):
        report = check_json(["--model", "tiny", *GPU2, "--enable-sleep-mode"])
        assert report["valid"] and report["config"]["model"]["enable_cumem_allocator"] is True
    assert [r.getMessage() for r in caplog.records].count(SLEEP_ENABLES_CUMEM) == 1


def test_summary_says_why_cumem_is_on() -> None:
    result = check(["--model", "tiny", *GPU2, "--enable-sleep-mode"])
    assert result.exit_code == 0 and "cumem allocator: on (sleep mode requires it)" in result.output


def test_cumem_without_sleep_mode_stays_on_and_sleep_off() -> None:
    config = check_json(["--model", "tiny", *GPU2, "--enable-cumem-allocator"])["config"]
    assert config["model"]["enable_cumem_allocator"] is True and config["model"]["enable_sleep_mode"] is False


def test_expandable_segments_with_connector_needs_cumem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512,expandable_segments:True")
    result = check(["--model", "tiny", *GPU2])
    assert_invalid(result, "model.enable_cumem_allocator", "PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True")
    line = next(x for x in result.output.splitlines() if "expandable_segments" in x)
    assert "--enable-cumem-allocator" in line and "--enable-sleep-mode" in line


@pytest.mark.parametrize("fix", [["--enable-cumem-allocator"], ["--enable-sleep-mode"], ["--colocated"]])
def test_expandable_segments_allowed_with_cumem_or_without_connector(
        monkeypatch: pytest.MonkeyPatch, fix: list[str]) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert check(["--model", "tiny", *GPU2, *fix]).exit_code == 0


def test_expandable_segments_false_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    assert check(["--model", "tiny", *GPU2]).exit_code == 0


def test_expandable_segments_in_pytorch_alloc_conf_needs_cumem_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # PYTORCH_ALLOC_CONF is torch's newer name for the allocator settings: read when PYTORCH_CUDA_ALLOC_CONF is unset.
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    result = check(["--model", "tiny", *GPU2])
    assert_invalid(result, "model.enable_cumem_allocator", "PYTORCH_ALLOC_CONF has expandable_segments:True")
    assert check(["--model", "tiny", *GPU2, "--enable-cumem-allocator"]).exit_code == 0


@pytest.mark.parametrize("cuda_conf", ["expandable_segments:False", ""])
def test_pytorch_alloc_conf_counts_whatever_pytorch_cuda_alloc_conf_says(monkeypatch: pytest.MonkeyPatch,
                                                                         cuda_conf: str) -> None:
    # Which of the two torch reads when both are set changed between torch versions (2.13 reads
    # PYTORCH_CUDA_ALLOC_CONF alone, earlier ones PYTORCH_ALLOC_CONF first): either turning it on is refused.
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", cuda_conf)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    assert_invalid(check(["--model", "tiny", *GPU2]), "model.enable_cumem_allocator",
                   "PYTORCH_ALLOC_CONF has expandable_segments:True")


# --- device and target host -------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_cuda_without_gpu_or_target_is_a_problem() -> None:
    assert_invalid(check(["--model", "tiny", "--device", "cuda"]), "--device", "--target-gpus")


def test_auto_with_target_host_means_cuda() -> None:
    config = check_json(["--model", "tiny", "--target-gpus", "2", "--target-gpu-memory", "80"])["config"]
    assert config["device"] == "cuda" and config["model"]["dtype"] == "bfloat16"


def test_target_flags_must_come_together_and_be_positive() -> None:
    assert_invalid(check(["--model", "tiny", "--target-gpus", "2"]), "--target-gpu-memory")
    assert_invalid(check(["--model", "tiny", "--target-gpus", "0", "--target-gpu-memory", "80"]), "--target-gpus")
    assert_invalid(check(["--model", "tiny", "--target-gpus", "2", "--target-gpu-memory", "-1"]),
                   "--target-gpu-memory")


def test_float16_rejected_on_cpu_bfloat16_allowed() -> None:
    assert_invalid(check(["--model", "tiny", "--device", "cpu", "--dtype", "float16"]), "--dtype", "CPU")
    assert check(["--model", "tiny", "--device", "cpu", "--dtype", "bfloat16"]).exit_code == 0
    assert check(["--model", "tiny", *GPU2, "--dtype", "float16"]).exit_code == 0


# --- model directory --------------------------------------------------------------------------

def test_model_dir_must_exist(tmp_path: Path) -> None:
    assert_invalid(check(["--model", str(tmp_path / "missing"), "--device", "cpu"]), "--model", "does not exist")


def test_model_dir_needs_config_json(tmp_path: Path) -> None:
    assert_invalid(check(["--model", str(tmp_path), "--device", "cpu"]), "--model", "config.json")


def test_model_config_json_must_parse(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    (model / "config.json").write_text("{not json")
    assert_invalid(check(["--model", str(model), "--device", "cpu"]), "--model", "not valid JSON")


def test_unsupported_architecture(tmp_path: Path) -> None:
    model = write_model(tmp_path, architectures=["GPT2LMHeadModel"])
    assert_invalid(check(["--model", str(model), "--device", "cpu"]), "--model", "GPT2LMHeadModel")


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"])
def test_supported_architectures(tmp_path: Path, arch: str) -> None:
    model = write_model(tmp_path, architectures=[arch])
    assert check(["--model", str(model), "--device", "cpu"]).exit_code == 0


# --- tensor parallel --------------------------------------------------------------------------

def test_tp_must_divide_attention_heads(tmp_path: Path) -> None:
    model = write_model(tmp_path, num_attention_heads=12, num_key_value_heads=12, hidden_size=192)
    assert_invalid(check(["--model", str(model), *gpus(16), "--tp", "8"]),
                   "--tp", "12 attention heads")  # the flag typed, not the groups it reached


def test_tp_and_kv_heads_must_divide_each_other(tmp_path: Path) -> None:
    model = write_model(tmp_path, num_attention_heads=12, num_key_value_heads=4, hidden_size=192)
    result = check(["--model", str(model), *gpus(8), "--decode-tp", "6"])
    assert_invalid(result, "--decode-tp", "4 KV heads")
    # kv heads dividing tp (replicated KV heads) is fine
    model8 = write_model(tmp_path, "m8", num_attention_heads=8, num_key_value_heads=2)
    assert check(["--model", str(model8), *gpus(8), "--tp", "4"]).exit_code == 0


def test_prefill_decode_tp_ratio(tmp_path: Path) -> None:
    model = write_model(tmp_path, num_attention_heads=24, num_key_value_heads=24, hidden_size=192)
    result = check(["--model", str(model), *gpus(8), "--prefill-tp", "2", "--decode-tp", "3"])
    assert_invalid(result, "--decode-tp", "prefill TP 2 and decode TP 3")
    # dividing sizes reshard KV heads on the decode side, which reads (pull)
    for p_tp, d_tp in (("2", "4"), ("4", "2")):
        assert check(["--model", str(model), *gpus(8), "--prefill-tp", p_tp, "--decode-tp", d_tp]).exit_code == 0
    result = check(["--model", str(model), *gpus(8), "--prefill-tp", "2", "--decode-tp", "4",
                    "--transfer-mode", "push"])
    assert_invalid(result, "--transfer-mode", "pull only")
    assert check(["--model", str(model), *gpus(8), "--prefill-tp", "2", "--decode-tp", "2"]).exit_code == 0


# --- cache and lengths ------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["8", "16", "32", "64", "128"])
def test_supported_block_sizes(size: str) -> None:
    assert check(["--model", "tiny", "--device", "cpu", "--block-size", size]).exit_code == 0


@pytest.mark.parametrize("size", ["0", "12", "256"])
def test_unsupported_block_sizes(size: str) -> None:
    assert_invalid(check(["--model", "tiny", "--device", "cpu", "--block-size", size]), "--block-size")


def test_max_model_len_within_positions(tmp_path: Path) -> None:
    model = write_model(tmp_path)  # max_position_embeddings 1024
    assert_invalid(check(["--model", str(model), "--device", "cpu", "--max-model-len", "1025"]),
                   "--max-model-len", "1024")
    assert check(["--model", str(model), "--device", "cpu", "--max-model-len", "1024"]).exit_code == 0


@pytest.mark.parametrize(("value", "text"), [("512", "'512' is not an integer"), (512.0, "512.0 is not an integer"),
                                           (-5, "-5 must be at least 1"), (0, "0 must be at least 1"),
                                           (True, "True is not an integer")])
def test_an_invalid_max_position_embeddings_is_named_not_called_absent(value: object, text: str,
                                                                      tmp_path: Path) -> None:
    """A present but invalid max_position_embeddings was read as absent: beside the keyed error check-config said
    "config.json has no max_position_embeddings; set --max-model-len" (false, and no fix); `true` raised."""
    result = check(["--model", str(write_model(tmp_path, max_position_embeddings=value)), "--device", "cpu"])
    assert_invalid(result, "--model", f"max_position_embeddings {text} (config.json:max_position_embeddings)")
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "has no max_position_embeddings" not in result.output, result.output


def test_max_model_len_defaults_to_model_positions(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    assert check_json(["--model", str(model), "--device", "cpu"])["config"]["model"]["max_model_len"] == 1024


def test_num_gpu_blocks_must_hold_one_sequence() -> None:
    result = check(["--model", "tiny", "--device", "cpu", "--max-model-len", "1024", "--num-gpu-blocks", "10"])
    assert_invalid(result, "--num-gpu-blocks", "64 blocks")


# --- ports ------------------------------------------------------------------------------------

def test_port_out_of_range() -> None:
    assert_invalid(check(["--model", "tiny", "--device", "cpu", "--port", "70000"]), "--port", "1..65535")


def test_instance_ports_collide_with_proxy(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "proxy: {port: 8101}\ninstances:\n  - {role: prefill, count: 2, base_port: 8100}\n"
                      "  - {role: decode, count: 1, base_port: 8200}\n")
    assert_invalid(check([str(path), "--model", "tiny", "--device", "cpu"]), "instances[0].base_port", "8101")


def test_instance_groups_collide(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "instances:\n  - {role: prefill, count: 3, base_port: 8100}\n"
                      "  - {role: decode, count: 1, base_port: 8102}\n")
    assert_invalid(check([str(path), "--model", "tiny", "--device", "cpu"]), "instances[1].base_port")


def test_side_channel_range_collides_with_master_port(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "kv_transfer: {side_channel_port: 29499}\nparallel: {master_port: 29500}\n")
    assert_invalid(check([str(path), "--model", "tiny", "--device", "cpu"]), "kv_transfer.side_channel_port")


def test_same_ports_on_different_nodes_are_fine(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "parallel:\n  nodes: [{address: a}, {address: b}]\n"
                      "kv_transfer: {side_channel_host: 0.0.0.0}\n"
                      "instances:\n  - {role: prefill, base_port: 8100, node: 0}\n"
                      "  - {role: decode, base_port: 8100, node: 1}\n")
    assert check([str(path), "--model", "tiny", *GPU2]).exit_code == 0


def test_loopback_side_channel_across_nodes(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "parallel:\n  nodes: [{address: a}, {address: b}]\n"
                      "instances:\n  - {role: prefill, base_port: 8100, node: 0}\n"
                      "  - {role: decode, base_port: 8100, node: 1}\n")
    assert_invalid(check([str(path), "--model", "tiny", *GPU2]), "kv_transfer.side_channel_host", "0.0.0.0")


# --- devices ----------------------------------------------------------------------------------

def test_devices_over_subscribed_on_target() -> None:
    assert_invalid(check(["--model", "tiny", *GPU2, "--prefill", "2"]), "instances", "needs 3 GPUs")


def test_explicit_devices_beyond_host(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "instances:\n  - {role: prefill, devices: [0]}\n  - {role: decode, devices: [5]}\n")
    assert_invalid(check([str(path), "--model", "tiny", *GPU2]), "instances[1].devices", "device 5")


def test_explicit_devices_length_must_be_count_times_tp(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "instances:\n  - {role: prefill, tp: 2, devices: [0]}\n  - {role: decode}\n")
    assert_invalid(check([str(path), "--model", "tiny", *gpus(4)]), "instances[0].devices")


def test_explicit_devices_overlap_needs_memory_shares_that_fit(tmp_path: Path) -> None:
    text = "instances:\n  - {role: prefill, devices: [0]}\n  - {role: decode, devices: [0]}\n"
    path = write_yaml(tmp_path, text)
    assert_invalid(check([str(path), "--model", "tiny", *GPU2]), "instances[1].devices", "gpu_memory_utilization")
    assert check([str(path), "--model", "tiny", *GPU2, "--gpu-memory-utilization", "0.45"]).exit_code == 0


def test_two_tp_ranks_of_one_instance_on_one_gpu_are_refused(tmp_path: Path) -> None:
    """`devices: [0, 0]` for one instance of TP 2 passed with memory shares that fit, and the instance failed at
    start: NCCL refuses a communicator with two ranks on one GPU. Instances may share a GPU, one instance's ranks
    may not."""
    path = write_yaml(tmp_path, "cache: {gpu_memory_utilization: 0.3}\n"
                      "instances:\n  - {role: prefill, tp: 2, count: 2, devices: [0, 1, 1, 1]}\n"
                      "  - {role: decode, devices: [0]}\n")
    result = check([str(path), "--model", "tiny", *GPU2])
    assert_invalid(result, "instances[0].devices", "instance 1 of the group lists GPU 1 for 2 of its TP ranks")
    assert sum(line.startswith("error: ") for line in result.output.splitlines()) == 1, result.output
    path.write_text("cache: {gpu_memory_utilization: 0.3}\n"
                    "instances:\n  - {role: prefill, tp: 2, count: 2, devices: [0, 1, 0, 1]}\n"
                    "  - {role: decode, devices: [1]}\n")
    assert check([str(path), "--model", "tiny", *GPU2]).exit_code == 0


def test_pull_between_instances_on_one_gpu_fails(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "cache: {gpu_memory_utilization: 0.4}\n"
                      "instances:\n  - {role: prefill, devices: [0]}\n  - {role: decode, devices: [0]}\n")
    assert_invalid(check([str(path), "--model", "tiny", *GPU2, "--transfer-mode", "pull"]),
                   "--transfer-mode", "push")


def test_multi_node_tp_spans_nodes(tmp_path: Path) -> None:
    groups = "instances:\n  - {role: prefill, tp: 4, node: 0}\n  - {role: decode, tp: 4, node: 1}\n"
    path = write_yaml(tmp_path, "parallel:\n  nodes: [{address: a}, {address: b}]\n"
                      "kv_transfer: {side_channel_host: 0.0.0.0}\n" + groups)
    base = [str(path), "--model", "tiny", "--device", "cuda", "--target-gpu-memory", "80"]
    assert check([*base, "--target-gpus", "4"]).exit_code == 0
    # A node that lists no devices holds its group: it never spans on a count only that node sees.
    assert_invalid(check([*base, "--target-gpus", "2"]), "parallel.nodes[0].devices", "needs 4 GPUs")
    path.write_text("parallel:\n  nodes: [{address: a, devices: [0, 1]}, {address: b, devices: [0, 1]}]\n"
                    "  master_port: 29500\nkv_transfer: {side_channel_host: 0.0.0.0}\n" + groups)
    assert_invalid(check([*base, "--target-gpus", "2"]), "instances[1].tp", "more GPUs")


# --- roles and nodes --------------------------------------------------------------------------

def test_pd_needs_a_prefill_and_a_decode() -> None:
    assert_invalid(check(["--model", "tiny", "--device", "cpu", "--prefill", "0"]), "instances", "no prefill")
    assert_invalid(check(["--model", "tiny", "--device", "cpu", "--decode", "0"]), "instances", "no decode")


def test_colocated_needs_no_prefill_or_decode() -> None:
    assert check(["--model", "tiny", "--device", "cpu", "--colocated"]).exit_code == 0
    assert_invalid(check(["--model", "tiny", "--device", "cpu", "--colocated", "--decode", "2"]),
                   "instances[1].role", "colocated")


def test_colocated_group_needs_colocated_flag(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "instances: [{role: colocated}]\n")
    assert_invalid(check([str(path), "--model", "tiny", "--device", "cpu"]), "instances[0].role", "--colocated")


def test_node_rank_within_nodes(tmp_path: Path) -> None:
    assert_invalid(check(["--model", "tiny", "--device", "cpu", "--node-rank", "1"]), "--node-rank")
    path = write_yaml(tmp_path, "parallel: {nodes: [{address: a}, {address: b}]}\n")
    assert check([str(path), "--model", "tiny", *GPU2, "--node-rank", "1"]).exit_code == 0
    assert_invalid(check([str(path), "--model", "tiny", *GPU2, "--node-rank", "2"]), "--node-rank")


def test_group_node_within_nodes(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "instances:\n  - {role: prefill}\n  - {role: decode, node: 1}\n")
    assert_invalid(check([str(path), "--model", "tiny", "--device", "cpu"]), "instances[1].node")


def test_a_ray_field_set_to_its_default_without_the_ray_backend_is_refused(tmp_path: Path) -> None:
    """`--ray-address auto` (the value the README's ray commands give) with --backend ray forgotten started every
    instance on this machine without a word: the rule compared the value with the default, which is auto."""
    cpu = ["--model", "tiny", "--device", "cpu", *FREE_PORT]
    assert_invalid(check([*cpu, "--ray-address", "auto"]), "--ray-address", "is only read by --backend ray")
    path = write_yaml(tmp_path, "launcher: {ray_placement_timeout_seconds: 120, ray_resources: {}}\n")
    result = check([str(path), *cpu])
    assert_invalid(result, "launcher.ray_placement_timeout_seconds", "is only read by --backend ray")
    assert_invalid(result, "launcher.ray_resources", "is only read by --backend ray")
    assert check([*cpu, "--backend", "local"]).exit_code == 0


# --- memory estimate --------------------------------------------------------------------------

def test_model_too_big_for_the_target_gpus(tmp_path: Path) -> None:
    # ~70B parameters: 140 GB of bf16 weights per instance at TP 1.
    big = write_model(tmp_path, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, intermediate_size=28672, vocab_size=128256,
                      max_position_embeddings=8192)
    result = check(["--model", str(big), *GPU2])
    assert_invalid(result, "instances[0]", "GiB per GPU")
    assert check(["--model", str(big), *gpus(8), "--tp", "4"]).exit_code == 0


def test_cpu_kv_budget_must_hold_one_sequence(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "cache: {cpu_kv_cache_gb: 0.001}\n")
    assert_invalid(check([str(path), "--model", "tiny", "--device", "cpu"]), "cache.cpu_kv_cache_gb")


def test_summary_shows_instances_ports_memory_and_transfer() -> None:
    result = check(["--model", "tiny", "--device", "cpu", "--transfer-mode", "push", "--port", "9100"])
    assert result.exit_code == 0
    for text in ("prefill", "decode", "port 9100 (proxy)", "memory estimate", "nixl, mode push",
                 "cumem allocator: off", "valid"):
        assert text in result.output, text


def test_tp_group_spanning_nodes_needs_master_port_and_reachable_side_channel(tmp_path: Path) -> None:
    spanning = ("parallel:\n  nodes: [{address: a, devices: [0]}, {address: b, devices: [0, 1]}]\n"
                "instances:\n  - {role: prefill, tp: 2, node: 0, base_port: 8100}\n"
                "  - {role: decode, tp: 2, node: 1, base_port: 8200}\n")
    cpu = ["--model", "tiny", "--device", "cpu"]
    result = check([str(write_yaml(tmp_path, spanning)), *cpu])
    assert_invalid(result, "parallel.master_port", "spans nodes")
    assert "kv_transfer.side_channel_host" in result.output
    fixed = spanning.replace("parallel:\n", "parallel:\n  master_port: 29500\n") + \
        "kv_transfer: {side_channel_host: 0.0.0.0}\n"
    assert check([str(write_yaml(tmp_path, fixed)), *cpu]).exit_code == 0


# --- sizes: a typo in a count or a TP size is an error, not a check that fills memory -------------

def test_a_group_of_millions_of_instances_is_refused_at_once(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "device: cpu\ninstances:\n  - {role: prefill, count: 3000000}\n  - {role: decode}\n")
    result = check([str(path)])
    assert_invalid(result, "instances[0].count", "3000000 instances x TP 1 is 3000000 ranks, more than 16384")
    assert "fixed:" not in result.output  # the summary stops before it would plan every rank's ports


def test_a_huge_tp_is_refused_once_naming_the_key_every_group_takes_it_from(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "device: cpu\nparallel: {tp: 200000000}\n")
    report = check_json([str(path)])
    assert not report["valid"]
    assert [p["field"] for p in report["problems"]] == ["parallel.tp"]
    assert "TP 200000000 is more than 16384 ranks" in report["problems"][0]["message"]
    path = write_yaml(tmp_path, "device: cpu\ninstances: [{role: prefill, tp: 200000000}, {role: decode}]\n", "g.yaml")
    assert [p["field"] for p in check_json([str(path)])["problems"]] == ["instances[0].tp"]


def test_the_flag_that_set_a_huge_count_is_named() -> None:
    assert_invalid(check(["--model", "tiny", "--device", "cpu", "--prefill", "20000"]), "--prefill",
                   "20000 instances x TP 1 is 20000 ranks")


def test_groups_within_the_limit_alone_are_refused_together(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "device: cpu\ninstances:\n  - {role: prefill, count: 10000}\n"
                                "  - {role: decode, count: 10000}\n")
    assert_invalid(check([str(path)]), "instances", "the groups have 20000 ranks in all, more than 16384")


def test_the_largest_deployment_allowed_is_checked_as_usual(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "device: cpu\nmodel: {path: tiny}\ninstances:\n  - {role: prefill, count: 1}\n"
                                "  - {role: decode, count: 16383}\n")
    report = check_json([str(path)])
    assert not any("ranks" in p["message"] for p in report["problems"])
