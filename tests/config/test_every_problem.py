"""A value that does not parse does not hide the cross-field problems: all are reported at once."""

from __future__ import annotations

import pytest

from pdlaunch.config.loader import load_valid_deployment
from pdlaunch.errors import ConfigError
from tests.config.cli_helpers import check, check_json


def test_field_errors_and_rule_problems_together() -> None:
    args = ["--model", "tiny", "--device", "cpu", "--block-size", "7", "--transfer-mode", "sideways",
            "--enable-cumem-allocator", "--decode", "0"]
    result = check(args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    fields = {p["field"] for p in check_json(args)["problems"]}
    assert fields == {"--block-size", "--transfer-mode", "--enable-cumem-allocator", "instances"}


def test_serve_path_reports_them_too() -> None:
    with pytest.raises(ConfigError) as info:
        load_valid_deployment(None, {"model.path": "tiny", "device": "cpu", "cache.block_size": 12,
                                     "proxy.port": "x", "instances[decode].count": 0})
    assert {field for field, _ in info.value.problems} == {"--block-size", "--port", "instances"}
