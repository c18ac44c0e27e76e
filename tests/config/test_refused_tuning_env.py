"""The variables an instance refuses a value of at start (the GPU tuning variables, PDLAUNCH_PDL=OFF and the like,
and the test-only PDLAUNCH_TEST_FAIL_TRANSFER_RATE): check-config reports each as a problem and serve refuses it
before anything starts, with the message the instance would give, instead of the instance failing minutes later
after loading its weights. Through the CLI; the instance's message comes from the instance's own parser."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pdlaunch.config.serving_env import REFUSED_VARIABLES
from pdlaunch.errors import PdlaunchError
from pdlaunch.kv_transfer.fault import TransferFaults
from pdlaunch.model import decode_gemm, decode_launch, fused_ops, gemv, pdl, swiglu, triton_decode, triton_prefill
from pdlaunch.model.blas import blas_setting
from pdlaunch.model.moe import fused
from pdlaunch.runner.graph_setup import prompt_rows_setting
from pdlaunch.runner.mixed_graphs import max_mixed_tokens
from tests.config.cli_helpers import check, invoke, write_yaml

ROOT = Path(__file__).resolve().parents[2]
CPU = ["--model", "tiny", "--device", "cpu"]

# variable -> (a value the instance refuses, the instance's parser of the variable as it reads it at start)
INSTANCE: dict[str, tuple[str, Callable[[], object]]] = {
    "PDLAUNCH_BLAS": ("lt", blas_setting),
    "PDLAUNCH_PDL": ("OFF", pdl.pdl_setting),
    "PDLAUNCH_FUSED_OPS": ("Torch", fused_ops.fused_ops_setting),
    "PDLAUNCH_PAGED_DECODE": ("triton", triton_decode.paged_decode_setting),
    "PDLAUNCH_PAGED_PREFILL": ("fast", triton_prefill.paged_prefill_setting),
    "PDLAUNCH_GEMV": ("cuBLAS", gemv.gemv_setting),
    "PDLAUNCH_SWIGLU": ("off", swiglu.swiglu_setting),
    "PDLAUNCH_DECODE_GEMM": ("Cublas", decode_gemm.decode_gemm_setting),
    "PDLAUNCH_ATTN_EARLY": ("Off", triton_decode.attention_early),
    "PDLAUNCH_FP8_QK": ("BF16", triton_decode.fp8_qk_f16),
    "PDLAUNCH_PROMPT_ROWS": ("grouped", prompt_rows_setting),
    "PDLAUNCH_MIXED_GRAPH_TOKENS": ("2k", lambda: max_mixed_tokens(False)),
    "PDLAUNCH_MOE_BACKEND": ("Triton", lambda: fused.backend(torch.zeros(1, 4), 1)),
    "PDLAUNCH_MOE_TILE": ("block_n=33", lambda: fused.tile_override(os.environ["PDLAUNCH_MOE_TILE"])),
    "PDLAUNCH_DECODE_LAUNCH": ("tile=512", lambda: decode_launch.launch_override(os.environ["PDLAUNCH_DECODE_LAUNCH"])),
    "PDLAUNCH_GEMV_CONFIG": ("5120x2048=3,512,4", lambda: gemv.config_override(os.environ["PDLAUNCH_GEMV_CONFIG"])),
    "PDLAUNCH_PREFILL_LAUNCH": ("16,64", triton_prefill.prefill_launch),
    "PDLAUNCH_TEST_FAIL_TRANSFER_RATE": ("5%", TransferFaults),
}


def _instance_error(monkeypatch: pytest.MonkeyPatch, variable: str) -> PdlaunchError:
    value, parse = INSTANCE[variable]
    monkeypatch.setenv(variable, value)
    with pytest.raises(PdlaunchError) as refused:
        parse()
    assert refused.value.field == variable and refused.value.hint
    return refused.value


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("variable", INSTANCE)
def test_check_config_reports_what_an_instance_would_refuse_with_its_message(monkeypatch: pytest.MonkeyPatch,
                                                                             variable: str) -> None:
    error = _instance_error(monkeypatch, variable)
    result = check(CPU)
    assert result.exit_code == 1, result.output
    assert _flat(f"error: {variable}: {error.message}; {error.hint}") in _flat(result.output), result.output


@pytest.mark.parametrize("variable", ["PDLAUNCH_PDL", "PDLAUNCH_MOE_TILE", "PDLAUNCH_TEST_FAIL_TRANSFER_RATE"])
def test_serve_refuses_it_before_anything_starts(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    started: list[object] = []
    monkeypatch.setattr("pdlaunch.launcher.backends.run_deployment", lambda cfg: started.append(cfg) or 0)
    error = _instance_error(monkeypatch, variable)
    served = invoke(["serve", *CPU])
    assert served.exit_code == 1 and not started, served.output
    assert _flat(f"error: {variable}: {error.message}; {error.hint}") in _flat(served.output), served.output


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_it_is_reported_beside_the_configs_own_problems(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         command: str) -> None:
    """Beside a value a rule refuses (the config loaded) and beside one that does not parse (it did not)."""
    monkeypatch.setattr("pdlaunch.launcher.backends.run_deployment", lambda cfg: pytest.fail("serve started"))
    error = _instance_error(monkeypatch, "PDLAUNCH_PDL")
    unparsed = write_yaml(tmp_path, "cache:\n  block_size: sixteen\n")
    for args, field in (([*CPU, "--block-size", "7"], "--block-size"), ([str(unparsed), *CPU], "cache.block_size")):
        result = invoke([command, *args])
        assert result.exit_code == 1 and f"error: {field}: " in result.output, result.output
        assert _flat(f"error: PDLAUNCH_PDL: {error.message}; {error.hint}") in _flat(result.output), result.output


def test_values_the_instances_take_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = {"PDLAUNCH_BLAS": "CuBLAS ", "PDLAUNCH_PDL": "off", "PDLAUNCH_PROMPT_ROWS": "", "PDLAUNCH_MOE_TILE":
             "block_n=32:max_tokens=1", "PDLAUNCH_MIXED_GRAPH_TOKENS": "1024", "PDLAUNCH_TEST_FAIL_TRANSFER_RATE": "0"}
    for variable, value in taken.items():
        monkeypatch.setenv(variable, value)
    result = check(CPU)
    assert result.exit_code == 0, result.output
    assert not [v for v in taken if f"error: {v}" in result.output], result.output


def test_every_variable_an_instance_refuses_is_checked() -> None:
    """The package's refusals of an environment variable (env_choice, field_override, a PdlaunchError whose field
    is a PDLAUNCH_ variable) against REFUSED_VARIABLES and this file's table, so a new one cannot be missed."""
    source = "\n".join(path.read_text() for path in (ROOT / "pdlaunch").rglob("*.py")
                       if path.parent.name != "config" and path.parent.parent.name != "config")
    named = set(re.findall(r'(?:env_choice|field_override)\(\s*"(PDLAUNCH_\w+)"', source))
    named |= set(re.findall(r'field="(PDLAUNCH_\w+)"', source))
    named |= {"PDLAUNCH_BLAS", "PDLAUNCH_TEST_FAIL_TRANSFER_RATE"}  # raised with field=ENV, their module's constant
    assert named == set(REFUSED_VARIABLES) == set(INSTANCE)
