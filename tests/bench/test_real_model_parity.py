"""benchmarks/real_model_parity.py on CPU in float32: a random tiny checkpoint built by the script itself
matches transformers for every prompt, a GGUF file is converted and compared, a divergence is reported
with its index, and a usage mistake is one error line (exit 1, no traceback)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "real_model_parity.py"
CPU = ["--device", "cpu", "--dtype", "float32"]

pytestmark = pytest.mark.slow  # each case builds checkpoints and runs transformers next to the engine


@pytest.fixture(scope="module")
def parity() -> ModuleType:
    spec = importlib.util.spec_from_file_location("real_model_parity", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the report's postponed annotations through it
    spec.loader.exec_module(module)
    return module


def test_random_qwen3_command_matches_transformers(tmp_path: Path) -> None:
    """The command as typed on a host: build the checkpoint, compare, report."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--random", "qwen3", "--out", str(tmp_path / "q3"),
                          "--size", "tiny", *CPU, "--prompts", "2", "--tokens", "8", "--strict",
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("match (8 tokens)") == 2
    assert "2 of 2 prompts match for 8 tokens (cpu, float32, eager," in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["matched"] == 2 and all(len(r["ours"]) == 8 == len(r["transformers"]) for r in report["results"])
    cfg = json.loads((tmp_path / "q3" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["head_dim"] == 32


def test_gguf_input_and_convert_to(parity: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tests.helpers.checkpoints import make_llama32
    from tests.model.gguf_files import write_gguf

    monkeypatch.setenv("PDLAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(make_llama32(tmp_path / "hf"), tmp_path / "l32.gguf", "llama")
    assert parity.main([str(path), *CPU, "--prompts", "1", "--tokens", "8", "--strict"]) == 0
    assert "1 of 1 prompts match for 8 tokens" in capsys.readouterr().out
    assert parity.main([str(path), "--convert-to", str(tmp_path / "conv")]) == 0
    rope = json.loads((tmp_path / "conv" / "config.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0


def test_divergence_index_and_summary(parity: ModuleType) -> None:
    results = parity.compare(["a", "b", "c"], [[1], [1, 2], [3]], [[5, 6, 7], [5, 6, 7], [5, 6]],
                             [[5, 6, 7], [5, 9, 7], [5, 6, 7]])
    assert [r.match for r in results] == [True, False, False]
    assert [r.first_divergence for r in results] == [None, 1, 2]


@pytest.mark.parametrize(("argv", "text"), [
    (["--random", "qwen3"], "--random needs --out DIR"),
    (["--prompts", "0", "demo"], "--prompts must be 1.."),
    ([str(Path("/nonexistent/dir"))], "does not exist"),
])
def test_usage_mistakes_are_one_error_line(parity: ModuleType, capsys: pytest.CaptureFixture[str],
                                           argv: list[str], text: str) -> None:
    assert parity.main([*argv, *CPU]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and text in err and "Traceback" not in err


def test_a_gguf_file_without_the_gguf_package_names_convert_to(parity: ModuleType, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert parity.main([str(tmp_path / "m.gguf"), *CPU]) == 1
    err = capsys.readouterr().err
    assert "the gguf package is not installed here" in err and "--convert-to DIR" in err
