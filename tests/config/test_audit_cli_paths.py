"""Paths the file system refuses by name (too long, a NUL byte, a directory that cannot be made) are messages
naming the flag or key, from check-config and from serve, not an OSError/ValueError traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.config.cli_helpers import assert_invalid, check, invoke, write_model, write_yaml
from tests.helpers.ports import free_port

CPU = ["--model", "tiny", "--device", "cpu"]
TOO_LONG = "x" * 300  # one path component past every Linux file system's 255-byte limit


def test_log_dir_name_too_long_is_a_problem_of_check_config_and_serve(tmp_path: Path) -> None:
    log_dir = str(tmp_path / TOO_LONG / "logs")
    assert_invalid(check([*CPU, "--log-dir", log_dir]), "--log-dir", "File name too long")
    served = invoke(["serve", *CPU, "--log-dir", log_dir, "--port", str(free_port())])
    assert served.exit_code == 1 and "error: --log-dir:" in served.output, served.output
    assert sorted(tmp_path.iterdir()) == []


def test_log_dir_with_a_nul_byte_in_the_yaml_is_refused_before_serve(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, 'log_dir: "logs\\0x"\n')
    assert_invalid(check([str(path), *CPU]), "log_dir", "NUL character")
    served = invoke(["serve", str(path), *CPU, "--port", str(free_port())])
    assert served.exit_code == 1 and "error: log_dir:" in served.output, served.output


def test_serve_with_a_log_dir_the_kernel_will_not_create_names_the_flag(tmp_path: Path) -> None:
    """/proc takes no new directory, even from root, for whom check-config's permission look passes."""
    served = invoke(["serve", *CPU, "--log-dir", "/proc/pdlaunch-audit-logs", "--port", str(free_port())])
    assert served.exit_code == 1, served.output
    assert "error: --log-dir:" in served.output and "/proc/pdlaunch-audit-logs" in served.output, served.output
    assert not Path("/proc/pdlaunch-audit-logs").exists()


def test_model_path_too_long_names_the_flag_or_the_positional(tmp_path: Path) -> None:
    long_path = str(tmp_path / TOO_LONG)
    assert_invalid(check(["--model", long_path, "--device", "cpu"]), "--model", "File name too long")
    assert_invalid(check([long_path, "--device", "cpu"]), "MODEL", "is neither a model nor a config file")
    served = invoke(["serve", long_path, "--device", "cpu"])
    assert served.exit_code == 1 and "error: MODEL:" in served.output, served.output


def test_model_pointing_at_a_file_of_the_checkpoint_names_its_directory(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path)
    for inside in ("config.json", "model.safetensors"):
        assert_invalid(check(["--model", str(model_dir / inside), "--device", "cpu"]), "--model",
                       f"is a file, not a directory; point at the checkpoint directory that holds it, "
                       f"{str(model_dir)!r}")


def test_an_existing_file_named_like_a_hub_id_gets_no_download_hint(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "weights").write_text("")
    result = check(["--model", "org/weights", "--device", "cpu"])
    assert_invalid(result, "--model", "is a file, not a directory")
    assert "huggingface-cli" not in result.output and "hub id" not in result.output
