"""kv_transfer.storage_path: a directory the storage connector's instances cannot create is a check-config problem,
so serve fails before it starts a process (each PD instance used to exit once its weights were loaded)."""

from __future__ import annotations

from pathlib import Path

from tests.config.cli_helpers import assert_invalid, check, invoke, write_yaml

CPU = ["--model", "tiny", "--device", "cpu"]


def _storage_yaml(root: Path, storage_path: str) -> Path:
    return write_yaml(root, f"kv_transfer:\n  connector: storage\n  storage_path: {storage_path!r}\n")


def test_storage_path_under_a_file_is_refused_by_check_config_and_before_serve_starts(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    config = _storage_yaml(tmp_path, str(tmp_path / "f" / "kv"))
    assert_invalid(check([str(config), *CPU]), "kv_transfer.storage_path", "is a file")
    logs = tmp_path / "logs"
    served = invoke(["serve", str(config), *CPU, "--log-dir", str(logs)])
    assert served.exit_code == 1 and "error: kv_transfer.storage_path:" in served.output, served.output
    assert "exited" not in served.output and not logs.exists(), served.output


def test_storage_path_of_an_unknown_users_home_is_refused(tmp_path: Path) -> None:
    config = _storage_yaml(tmp_path, "~pdlaunch-no-such-user/kv")
    assert_invalid(check([str(config), *CPU]), "kv_transfer.storage_path", "home directory of no user")


def test_storage_path_that_can_be_created_is_valid(tmp_path: Path) -> None:
    result = check([str(_storage_yaml(tmp_path, str(tmp_path / "a" / "kv"))), *CPU])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "a").exists()  # check-config creates nothing


def test_storage_path_is_not_checked_when_no_kv_moves(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    result = check([str(_storage_yaml(tmp_path, str(tmp_path / "f" / "kv"))), *CPU, "--colocated"])
    assert result.exit_code == 0, result.output
