"""Audit 4 of user input: YAML values, flag values and JSON that once left as a traceback (or took minutes)
now end as one problem naming the key path or flag, exit 1."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.config.cli_helpers import assert_invalid, check, write_yaml

CPU = ["--model", "tiny", "--device", "cpu"]


@pytest.mark.parametrize(("text", "field", "said"), [
    ("proxy: {port: !!int abc}\n", "proxy.port", "'abc' in"),
    ("cache: {gpu_memory_utilization: !!float half}\n", "cache.gpu_memory_utilization", "is not a number"),
    ("colocated: !!bool maybe\n", "colocated", "is not a boolean"),
    ("log_dir: !!timestamp 2001-13-45\n", "log_dir", "month must be in 1..12"),
    ("instances:\n  - role: prefill\n    count: !!int two\n", "instances[0].count", "at line 3, column 12"),
    ("proxy: {port: " + "9" * 5000 + "}\n", "proxy.port", "more than 4000 digits"),
    ("model: {seed: 0x" + "f" * 5000 + "}\n", "model.seed", "more than 4000 digits"),  # hex has no length limit
])
def test_yaml_value_its_tag_cannot_read_names_the_key(tmp_path: Path, text: str, field: str, said: str) -> None:
    assert_invalid(check([str(write_yaml(tmp_path, text)), *CPU]), field, said)
