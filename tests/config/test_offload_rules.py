"""The KV offload tier (`--kv-offload-gb`) with what every instance refuses at start (engine/llm_engine.py
`_create_offload`): check-config refuses it first, naming the flag, as serve would fail only once its instances had
started and loaded their weights."""

from __future__ import annotations

from pathlib import Path

from tests.config.cli_helpers import assert_invalid, check, write_yaml

CPU = ["--model", "tiny", "--device", "cpu"]


def test_offload_without_prefix_caching_is_refused() -> None:
    assert_invalid(check([*CPU, "--kv-offload-gb", "1", "--no-enable-prefix-caching"]), "--kv-offload-gb",
                   "needs prefix caching")
    assert check([*CPU, "--kv-offload-gb", "1"]).exit_code == 0
    assert check([*CPU, "--no-enable-prefix-caching"]).exit_code == 0  # no offload tier: nothing needs the cache


def test_offload_in_a_group_of_tp_2_is_refused() -> None:
    assert_invalid(check([*CPU, "--kv-offload-gb", "1", "--decode-tp", "2"]), "--kv-offload-gb",
                   "TP 1 only: instances[1] (decode, TP 2)")
    assert check([*CPU, "--decode-tp", "2"]).exit_code == 0


def test_a_group_of_tp_2_with_no_instance_starts_no_offload_tier(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "colocated: true\ninstances:\n  - {role: colocated}\n"
                                  "  - {role: colocated, count: 0, tp: 2}\n")
    assert check([*CPU, str(config), "--kv-offload-gb", "1"]).exit_code == 0
    config.write_text("colocated: true\ninstances:\n  - {role: colocated}\n  - {role: colocated, tp: 2}\n")
    assert_invalid(check([*CPU, str(config), "--kv-offload-gb", "1"]), "--kv-offload-gb", "instances[1] (colocated")
