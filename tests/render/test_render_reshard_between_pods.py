"""KV moved between prefill and decode of different TP sizes is resharded, which reads whole prefill blocks (a
pull) from one address per prefill instance. In Kubernetes every instance is a pod of its own, its own host to
the transfer: `transfer_mode: auto` resolves push there on CUDA (kv_transfer/transfer_mode.py), and a prefill TP
group spread one rank per pod has an address per rank, so such a deployment would fail (or recompute) every
request's KV: render refuses it, and renders what can reshard."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.config.cli_helpers import invoke

# The field, or its flag where the flag set it.
MODE_ERROR = re.compile(r"error: (kv_transfer\.transfer_mode|--transfer-mode): ")


def render(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = invoke(["render", "kubernetes", "--model", "tiny", *args, "--out", str(tmp_path / "out"),
                     "--image", "pdlaunch:test"])
    return result.exit_code, result.output


@pytest.mark.parametrize("mode", [[], ["--transfer-mode", "auto"], ["--transfer-mode", "push"]])
def test_nixl_between_different_tp_sizes_on_cuda_without_pull_is_refused(tmp_path: Path, mode: list[str]) -> None:
    code, output = render(tmp_path, "--device", "cuda", "--prefill-tp", "1", "--decode-tp", "2", *mode)
    assert code == 1 and MODE_ERROR.search(output) and "resharded" in output, output
    assert "--transfer-mode pull" in output
    assert not (tmp_path / "out").exists()


def test_push_between_different_tp_sizes_is_refused_for_every_connector(tmp_path: Path) -> None:
    code, output = render(tmp_path, "--device", "cpu", "--prefill-tp", "2", "--decode-tp", "1",
                          "--transfer-mode", "push")
    assert code == 1 and MODE_ERROR.search(output), output
    code, output = render(tmp_path, "--device", "cuda", "--prefill-tp", "2", "--decode-tp", "1",
                          "--kv-connector", "mooncake", "--transfer-mode", "push")
    assert code == 1 and MODE_ERROR.search(output), output


def test_a_prefill_group_spread_over_pods_cannot_feed_another_decode_tp(tmp_path: Path) -> None:
    code, output = render(tmp_path, "--device", "cuda", "--prefill-tp", "4", "--decode-tp", "2",
                          "--transfer-mode", "pull", "--gpus-per-node", "2")
    assert code == 1 and "error: --prefill-tp: prefill TP 4" in output, output  # the flag typed, not instances[0].tp
    assert "one pod per rank" in output


def test_a_prefill_groups_own_tp_spread_over_pods_is_named_by_its_key(tmp_path: Path) -> None:
    config = tmp_path / "d.yaml"
    config.write_text("model: {path: tiny}\ndevice: cuda\nkv_transfer: {transfer_mode: pull}\ninstances:\n"
                      "  - {role: prefill, count: 1, tp: 4}\n  - {role: decode, count: 1, tp: 2}\n")
    result = invoke(["render", "kubernetes", str(config), "--gpus-per-node", "2", "--out", str(tmp_path / "out"),
                     "--image", "pdlaunch:test"])
    assert result.exit_code == 1 and "error: instances[0].tp: prefill TP 4" in result.output, result.output


@pytest.mark.parametrize("args", [
    ["--device", "cuda", "--prefill-tp", "1", "--decode-tp", "2", "--transfer-mode", "pull"],  # decode can READ
    ["--device", "cuda", "--prefill-tp", "1", "--decode-tp", "2", "--kv-connector", "mooncake"],  # pulls to reshard
    ["--device", "cpu", "--prefill-tp", "1", "--decode-tp", "2"],  # auto pulls between CPU KV caches
    ["--device", "cuda", "--tp", "4", "--gpus-per-node", "2"],  # spread, but the same TP: no resharding
    ["--device", "cuda", "--prefill-tp", "1", "--decode-tp", "2", "--colocated"],  # no KV moves
])
def test_what_can_reshard_or_moves_no_resharded_kv_renders(tmp_path: Path, args: list[str]) -> None:
    code, output = render(tmp_path, *args)
    assert code == 0, output
