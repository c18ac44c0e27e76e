"""A corpus of invalid deployments (YAML files and flag sets): each exits 1, names the field, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.config.cli_helpers import assert_invalid, check, check_json, write_yaml

CPU = ["--model", "tiny", "--device", "cpu"]
GPU2 = ["--model", "tiny", "--device", "cuda", "--target-gpus", "2", "--target-gpu-memory", "80"]

# (id, YAML text or None, flags, field the problem must name)
CORPUS: list[tuple[str, str | None, list[str], str]] = [
    ("yaml-syntax", "model:\n  path: demo\n   dtype: float32\n", CPU, "config"),
    ("yaml-tab-indent", "cache:\n\tblock_size: 16\n", CPU, "config"),
    ("yaml-unclosed-flow", "instances: [{role: prefill\n", CPU, "config"),
    ("top-level-list", "- role: prefill\n", CPU, "config"),
    ("top-level-scalar", "just a string\n", CPU, "config"),
    ("unknown-top-key", "modle: {path: demo}\n", CPU, "modle"),
    ("unknown-nested-key", "cache: {blocksize: 16}\n", CPU, "cache.blocksize"),
    ("key-in-wrong-section", "max_model_len: 512\n", CPU, "max_model_len"),
    ("non-string-key", "1: 2\n", CPU, "config"),
    ("section-not-mapping", "model: demo\n", [], "model"),
    ("instances-not-list", "instances: {role: prefill}\n", CPU, "instances"),
    ("bad-role", "instances: [{role: prefil}, {role: decode}]\n", CPU, "instances[0].role"),
    ("negative-count", "instances: [{role: prefill, count: -1}, {role: decode}]\n", CPU, "instances[0].count"),
    ("zero-tp", "parallel: {tp: 0}\n", CPU, "parallel.tp"),
    ("tp-string", "parallel: {tp: two}\n", CPU, "parallel.tp"),
    ("gpu-util-above-1", "cache: {gpu_memory_utilization: 1.5}\n", CPU, "cache.gpu_memory_utilization"),
    ("gpu-util-nan", "cache: {gpu_memory_utilization: .nan}\n", CPU, "cache.gpu_memory_utilization"),
    ("offload-negative", "cache: {kv_offload_gb: -1}\n", CPU, "cache.kv_offload_gb"),
    ("node-missing-address", "parallel: {nodes: [{devices: [0]}]}\n", CPU, "parallel.nodes[0].address"),
    ("lease-zero", "kv_transfer: {kv_lease_seconds: 0}\n", CPU, "kv_transfer.kv_lease_seconds"),
    ("bad-connector", "kv_transfer: {connector: redis}\n", CPU, "kv_transfer.connector"),
    ("bad-routing", "proxy: {routing_policy: random}\n", CPU, "proxy.routing_policy"),
    ("proxy-port-zero", "proxy: {port: 0}\n", CPU, "proxy.port"),
    ("base-port-range-overflow", "instances: [{role: prefill, count: 2, base_port: 65535}, {role: decode}]\n",
     CPU, "instances[0].base_port"),
    ("duplicate-node-address", "parallel: {nodes: [{address: a}, {address: a}]}\n", GPU2, "parallel.nodes[1].address"),
    ("group-on-missing-node", "instances: [{role: prefill}, {role: decode, node: 3}]\n", CPU, "instances[1].node"),
    ("devices-overlap", "instances: [{role: prefill, devices: [1]}, {role: decode, devices: [1]}]\n", GPU2,
     "instances[1].devices"),
    ("num-blocks-too-few", "cache: {num_gpu_blocks: 1}\nmodel: {max_model_len: 512}\n", CPU, "cache.num_gpu_blocks"),
    ("side-channel-over-http", "kv_transfer: {side_channel_port: 8100}\n"
     "instances: [{role: prefill, base_port: 8100}, {role: decode, base_port: 8200}]\n", CPU,
     "kv_transfer.side_channel_port"),
    ("colocated-with-prefill", "colocated: true\ninstances: [{role: prefill}, {role: colocated}]\n", CPU,
     "instances[0].role"),
    ("flag-bad-device", None, ["--model", "tiny", "--device", "tpu"], "--device"),
    ("flag-bad-dtype", None, ["--model", "tiny", "--device", "cpu", "--dtype", "int8"], "--dtype"),
    ("flag-bad-transfer-mode", None, [*CPU, "--transfer-mode", "pul"], "--transfer-mode"),
    ("flag-bad-connector", None, [*CPU, "--kv-connector", "redis"], "--kv-connector"),
    ("flag-zero-tp", None, [*CPU, "--tp", "0"], "--tp"),
    ("flag-negative-prefill", None, [*CPU, "--prefill", "-2"], "--prefill"),
    ("flag-max-model-len-zero", None, [*CPU, "--max-model-len", "0"], "--max-model-len"),
    ("flag-max-model-len-too-long", None, [*CPU, "--max-model-len", "100000"], "--max-model-len"),
    ("flag-max-num-seqs-zero", None, [*CPU, "--max-num-seqs", "0"], "--max-num-seqs"),
    ("flag-gpu-util-zero", None, [*CPU, "--gpu-memory-utilization", "0"], "--gpu-memory-utilization"),
    ("flag-block-size-7", None, [*CPU, "--block-size", "7"], "--block-size"),
    ("flag-port-negative", None, [*CPU, "--port", "-5"], "--port"),
    ("flag-node-rank-3", None, [*CPU, "--node-rank", "3"], "--node-rank"),
    ("flag-fp16-cpu", None, [*CPU, "--dtype", "float16"], "--dtype"),
    ("flag-cumem-cpu", None, [*CPU, "--enable-cumem-allocator"], "--enable-cumem-allocator"),
    ("flag-sleep-cpu", None, [*CPU, "--enable-sleep-mode"], "--enable-sleep-mode"),
    ("flag-no-decode", None, [*CPU, "--decode", "0"], "instances"),
    ("flag-tp-vs-heads", None, [*CPU, "--tp", "3"], "--tp"),
    ("flag-decode-tp-vs-heads", None, [*CPU, "--decode-tp", "16"], "--decode-tp"),
    ("flag-too-many-gpus", None, [*GPU2, "--decode", "4"], "instances"),
    ("flag-missing-model", None, ["--model", "/nonexistent/model", "--device", "cpu"], "--model"),
    ("flag-target-half", None, ["--model", "tiny", "--target-gpus", "2"], "--target-gpu-memory"),
    ("flag-missing-file", None, ["/nonexistent/deploy.yaml", *CPU], "config"),
    ("flag-config-unknown-user-home", None, ["~nosuchuser-pdlaunch/deploy.yaml", *CPU], "config"),
    ("flag-directory-is-a-second-model", None, ["/", *CPU], "MODEL"),  # a directory positional is the model
    ("flag-model-unknown-user-home", None, ["--model", "~nosuchuser-pdlaunch/m", "--device", "cpu"], "--model"),
]

if not torch.cuda.is_available():  # on a CUDA host this one is valid
    CORPUS.append(("flag-cuda-no-target", None, ["--model", "tiny", "--device", "cuda"], "--device"))


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 30


@pytest.mark.parametrize(("text", "flags", "field"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_invalid_config_exits_1_naming_the_field(tmp_path: Path, text: str | None, flags: list[str],
                                                  field: str) -> None:
    args = ([str(write_yaml(tmp_path, text))] if text is not None else []) + flags
    assert_invalid(check(args), field)
    report = check_json(args)
    assert report["valid"] is False and field in [p["field"] for p in report["problems"]]
