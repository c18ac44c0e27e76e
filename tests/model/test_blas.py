"""PDLAUNCH_BLAS: which BLAS library torch's products go through on CUDA (model/blas.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pdlaunch.cli import app
from pdlaunch.errors import PdlaunchError
from pdlaunch.model.blas import blas_setting, decode_capture_blas, resolved_setting, select_blas_library

PROMPT = "The quick brown fox jumps over the lazy dog and"


def _generate(path: Path, device: str) -> list[int]:
    out = CliRunner().invoke(app, ["generate", "--model", str(path), "--prompt", PROMPT, "--max-tokens", "16",
                                   "--device", device, "--dtype", "float32", "--json"])
    assert out.exit_code == 0, out.output
    ids: list[int] = json.loads(out.output.strip().splitlines()[-1])["token_ids"]
    return ids


def test_a_library_pdlaunch_cannot_select_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch,
                                                                         llama_ckpt: Path) -> None:
    """The user path: an instance started with a misspelt value stops with one line naming the variable."""
    monkeypatch.setenv("PDLAUNCH_BLAS", "cublas-lt")
    out = CliRunner().invoke(app, ["generate", "--model", str(llama_ckpt), "--prompt", PROMPT, "--max-tokens", "2",
                                   "--device", "cpu", "--dtype", "float32"])
    assert out.exit_code == 1
    assert "PDLAUNCH_BLAS: 'cublas-lt' is not a BLAS library" in out.output and "cublaslt" in out.output
    assert "Traceback" not in out.output


def test_a_valid_choice_changes_nothing_off_cuda() -> None:
    assert select_blas_library(torch.device("cpu"), {"PDLAUNCH_BLAS": "cublaslt"}) is None
    assert select_blas_library(torch.device("cpu"), {}) is None
    assert select_blas_library(torch.device("cpu"), {"PDLAUNCH_BLAS": "cublas"}) is None
    with pytest.raises(PdlaunchError) as caught:
        select_blas_library(torch.device("cpu"), {"PDLAUNCH_BLAS": "mkl"})
    assert caught.value.field == "PDLAUNCH_BLAS"


def test_the_decode_only_scope_is_a_choice_that_changes_nothing_off_cuda() -> None:
    env = {"PDLAUNCH_BLAS": " CUBLASLT-decode "}
    assert blas_setting(env) == "cublaslt-decode"
    assert blas_setting({}) == "auto" and blas_setting({"PDLAUNCH_BLAS": ""}) == "auto"
    assert select_blas_library(torch.device("cpu"), env) is None
    with decode_capture_blas(torch.device("cpu"), env) as library:
        assert library is None
    with pytest.raises(PdlaunchError) as caught:
        blas_setting({"PDLAUNCH_BLAS": "cublaslt-prefill"})
    assert caught.value.field == "PDLAUNCH_BLAS" and "cublaslt-decode" in (caught.value.hint or "")


@pytest.mark.parametrize(("env", "name", "setting"), [
    ({}, "NVIDIA H100 80GB HBM3", "cublaslt-decode"),  # measured there: DEVICE_DEFAULTS
    ({"PDLAUNCH_BLAS": "auto"}, "NVIDIA H100 PCIe", "cublaslt-decode"),
    ({}, "NVIDIA H200", "cublaslt-decode"),
    ({}, "NVIDIA A100-SXM4-80GB", "cublas"),  # not measured: torch's default
    ({"PDLAUNCH_BLAS": "cublas"}, "NVIDIA H100 80GB HBM3", "cublas"),  # the user's choice wins
    ({"PDLAUNCH_BLAS": "cublaslt"}, "NVIDIA H200", "cublaslt"),
])
def test_auto_resolves_per_device_and_an_explicit_choice_wins(env: dict[str, str], name: str, setting: str) -> None:
    assert resolved_setting(torch.device("cuda", 0), env, name=name) == setting
    assert resolved_setting(torch.device("cpu"), env, name=name) == "cublas"


@pytest.mark.gpu
@pytest.mark.gpu_serial  # `pdlaunch generate` sizes its KV cache by a share of the whole GPU
def test_cublaslt_is_selected_on_cuda_and_greedy_tokens_stay(monkeypatch: pytest.MonkeyPatch, llama_ckpt: Path) -> None:
    tf32, default = torch.backends.cuda.matmul.allow_tf32, torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        monkeypatch.setenv("PDLAUNCH_BLAS", "cublas")
        before = _generate(llama_ckpt, "cuda")
        monkeypatch.setenv("PDLAUNCH_BLAS", "cublaslt")
        after = _generate(llama_ckpt, "cuda")
        assert torch.backends.cuda.preferred_blas_library() == torch._C._BlasBackend.Cublaslt
        assert after == before
    finally:
        torch.backends.cuda.preferred_blas_library(default)
        torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.gpu
@pytest.mark.gpu_serial  # as above
def test_decode_only_cublaslt_holds_for_the_capture_and_is_restored(monkeypatch: pytest.MonkeyPatch,
                                                                    llama_ckpt: Path) -> None:
    """cublaslt-decode: cuBLASLt inside the decode graphs' capture only (also when the capture fails), torch's
    default before and after; greedy tokens through `pdlaunch generate` (which replays the graphs) unchanged."""
    tf32, default = torch.backends.cuda.matmul.allow_tf32, torch.backends.cuda.preferred_blas_library()
    env = {"PDLAUNCH_BLAS": "cublaslt-decode"}
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        assert select_blas_library(torch.device("cuda"), env) == "cublaslt-decode"
        assert torch.backends.cuda.preferred_blas_library() == default
        with decode_capture_blas(torch.device("cuda"), env) as library:
            assert library == "cublaslt"
            assert torch.backends.cuda.preferred_blas_library() == torch._C._BlasBackend.Cublaslt
        assert torch.backends.cuda.preferred_blas_library() == default
        with pytest.raises(RuntimeError, match="capture failed"):
            with decode_capture_blas(torch.device("cuda"), env):
                raise RuntimeError("capture failed")
        assert torch.backends.cuda.preferred_blas_library() == default
        monkeypatch.setenv("PDLAUNCH_BLAS", "cublas")
        before = _generate(llama_ckpt, "cuda")
        monkeypatch.setenv("PDLAUNCH_BLAS", "cublaslt-decode")
        after = _generate(llama_ckpt, "cuda")
        assert torch.backends.cuda.preferred_blas_library() == default
        assert after == before
    finally:
        torch.backends.cuda.preferred_blas_library(default)
        torch.backends.cuda.matmul.allow_tf32 = tf32
