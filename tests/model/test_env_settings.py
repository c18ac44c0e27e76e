"""The PDLAUNCH_* variables read under pdlaunch/model: a bad value is refused with a PdlaunchError naming the
variable (its `field`) and the value, with a hint, never a bare IndexError/ValueError or a silent default. Each
parser is called directly, without a GPU."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from pdlaunch.errors import PdlaunchError
from pdlaunch.model import decode_gemm, decode_launch, fused_ops, gemv, pdl, swiglu, triton_decode, triton_prefill
from pdlaunch.model.blas import blas_setting
from pdlaunch.model.moe import fused

# Values no variable takes.
MALFORMED = [" ", "zz", "1,2", "=", ":", "tile=", "tile=abc", "-1", "0", "999999999"]


@pytest.fixture(autouse=True)
def _fresh_parsers() -> Iterator[None]:
    """The structured parsers cache a setting's result; each test starts, and leaves, them empty."""
    cached = (gemv.config_override, decode_launch.launch_override, fused.tile_override, triton_prefill._launch)
    for parser in cached:
        parser.cache_clear()
    yield
    for parser in cached:
        parser.cache_clear()


def _refused(monkeypatch: pytest.MonkeyPatch, variable: str, value: str, parse: Callable[[], object]) -> PdlaunchError:
    """The error `parse` raises with `variable` set to `value`, checked to name both and to carry a hint."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(PdlaunchError) as caught:
        parse()
    assert caught.value.field == variable
    # the value, or for a `:`-joined list the entry at fault
    assert any(repr(part) in str(caught.value) for part in [value, *value.split(":")])
    assert caught.value.hint
    return caught.value


# (variable, parser, {value: what the parser gives}); unset is the first value's result.
CHOICES: dict[str, tuple[Callable[[], object], dict[str, object]]] = {
    "PDLAUNCH_GEMV": (gemv.gemv_setting, {"auto": "auto", "cublas": "cublas", "": "auto"}),
    "PDLAUNCH_SWIGLU": (swiglu.swiglu_setting, {"auto": "auto", "cublas": "cublas", "": "auto"}),
    "PDLAUNCH_DECODE_GEMM": (decode_gemm.decode_gemm_setting, {"auto": "auto", "cublas": "cublas", "": "auto"}),
    "PDLAUNCH_FUSED_OPS": (fused_ops.fused_ops_setting, {"auto": "auto", "torch": "torch", "": "auto"}),
    "PDLAUNCH_PAGED_DECODE": (triton_decode.paged_decode_setting, {"auto": "auto", "torch": "torch", "": "auto"}),
    "PDLAUNCH_PDL": (pdl.pdl_setting, {"auto": "auto", "off": "off", "all": "all", "": "auto"}),
    "PDLAUNCH_ATTN_EARLY": (triton_decode.attention_early, {"on": True, "off": False, "": True}),
    "PDLAUNCH_FP8_QK": (triton_decode.fp8_qk_f16, {"f16": True, "bf16": False, "": True}),
    "PDLAUNCH_PAGED_PREFILL": (triton_prefill.paged_prefill_setting,
                               {"auto": "auto", "torch": "torch", "triton": "triton", "": "auto"}),
    "PDLAUNCH_MOE_BACKEND": (lambda: fused.backend(torch.zeros(1, 4), 1),
                             {"auto": "reference", "reference": "reference", "grouped_mm": "grouped_mm",
                              "triton": "triton"}),
    "PDLAUNCH_BLAS": (blas_setting, {"auto": "auto", "cublas": "cublas", "cublaslt": "cublaslt",
                                     "cublaslt-decode": "cublaslt-decode", "CuBLAS ": "cublas", "": "auto"}),
}
# Misspellings and other cases of a valid value (PDLAUNCH_BLAS alone takes any case).
TYPOS = {"PDLAUNCH_GEMV": ["cuBLAS", "cublass", "triton"], "PDLAUNCH_SWIGLU": ["CUBLAS", "cublass", "off"],
         "PDLAUNCH_DECODE_GEMM": ["Cublas", "cublas ", "off"], "PDLAUNCH_FUSED_OPS": ["Torch", "torch ", "off"],
         "PDLAUNCH_PAGED_DECODE": ["Torch", "triton", "off"], "PDLAUNCH_PDL": ["OFF", "of", "0", "false", "on"],
         "PDLAUNCH_ATTN_EARLY": ["Off", "kv", "release", "false"], "PDLAUNCH_FP8_QK": ["BF16", "bf-16", "f32"],
         "PDLAUNCH_PAGED_PREFILL": ["Torch", "fast"], "PDLAUNCH_MOE_BACKEND": ["Triton", "grouped-mm", ""],
         "PDLAUNCH_BLAS": ["cublas-lt", "lt"]}
_VALID = [(variable, value, want) for variable, (_, values) in CHOICES.items() for value, want in values.items()]
# PDLAUNCH_BLAS takes a blank value as auto (its docstring): not a bad value there.
_BAD = [(variable, value) for variable in CHOICES for value in MALFORMED + TYPOS[variable]
        if variable != "PDLAUNCH_BLAS" or value.strip()]


@pytest.mark.parametrize("variable,value,want", _VALID)
def test_a_valid_choice_parses(monkeypatch: pytest.MonkeyPatch, variable: str, value: str, want: object) -> None:
    parse, values = CHOICES[variable]
    monkeypatch.setenv(variable, value)
    assert parse() == want
    monkeypatch.delenv(variable)
    assert parse() == next(iter(values.values()))


@pytest.mark.parametrize("variable,value", _BAD)
def test_a_bad_choice_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str,
                                                     value: str) -> None:
    """Before, PDLAUNCH_GEMV, _SWIGLU, _DECODE_GEMM, _FUSED_OPS, _PAGED_DECODE, _PDL, _ATTN_EARLY and _FP8_QK
    compared against their one non-default value and took anything else (a typo such as `cuBLAS`) as the
    default."""
    parse, values = CHOICES[variable]
    error = _refused(monkeypatch, variable, value, parse)
    assert any(choice in (error.hint or "") for choice in values if choice.strip())


@pytest.mark.parametrize("variable,value,check", [
    ("PDLAUNCH_FUSED_OPS", "tourch", lambda: fused_ops.fused_available(torch.zeros(2))),
    ("PDLAUNCH_PAGED_DECODE", "troch", lambda: triton_decode.paged_decode_available(torch.zeros(1, 1, 2, 16, 1, 8))),
    ("PDLAUNCH_PDL", "of", lambda: pdl.pdl_enabled(torch.zeros(2), 2)),
])
def test_a_cpu_instance_never_reads_a_gpu_setting(monkeypatch: pytest.MonkeyPatch, variable: str, value: str,
                                                  check: Callable[[], object]) -> None:
    """On CPU tensors (outside the Triton interpreter) the callers answer without the variable: a CPU instance does
    not fail a step on a misspelt GPU setting; where the kernels could run, the same value is refused."""
    monkeypatch.setattr(pdl, "interpret_mode", lambda: False)
    monkeypatch.setattr(fused_ops, "interpret_mode", lambda: False)
    monkeypatch.setenv(variable, value)
    assert check() is False
    parse = CHOICES[variable][0]
    _refused(monkeypatch, variable, value, parse)


def test_the_interpreter_refuses_a_bad_fused_ops_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under TRITON_INTERPRET=1 (tests), CPU tensors take the kernels, so the variable is read and checked."""
    pytest.importorskip("triton")
    monkeypatch.setattr(fused_ops, "interpret_mode", lambda: True)
    _refused(monkeypatch, "PDLAUNCH_FUSED_OPS", "tourch", lambda: fused_ops.fused_available(torch.zeros(2)))


def _gemv() -> object:
    return gemv.config_for("NVIDIA H200", 5120, 2048)


def _decode() -> object:
    return decode_launch.with_override(decode_launch.choose_launch(1, 8, 128, num_sms=132), 1)


def _moe() -> object:
    return fused.tile_for(torch.zeros(1, 64), 1)


STRUCTURED: dict[str, tuple[Callable[[], object], list[str]]] = {
    # Right number of fields and wrong types, too few, too many, out of range; `²` made int() raise ValueError
    # (str.isdigit takes it), other scripts' digits (`٤` is 4) were taken as numbers, and a 0xK shape, which no
    # weight has, was taken as an override that never applies.
    "PDLAUNCH_GEMV_CONFIG": (_gemv, ["5120x2048=a,b,c", "5120x2048=4,512", "5120x2048=4,512,4,1", "5120=4,512,4",
                                     "5120x2048x1=4,512,4", "5120x2048=4,512,3", "5120x2048=-4,512,4",
                                     "5120x2048=4,512,²", "²x2048=4,512,4", "5120x2048=4,512,٤", "0x2048=4,512,4",
                                     "5120x0=4,512,4", "5120x2048=4,512,4:zz"]),
    "PDLAUNCH_DECODE_LAUNCH": (_decode, ["tile=x:splits=y", "tile", "tile=64=1", "tile=64,max_seqs=1", "tile=-64",
                                         "tile=0", "tile=999999999", "max_seqs=0", "tile=48", "tile=²", "tile=٦٤",
                                         "num_warps=٨"]),
    "PDLAUNCH_MOE_TILE": (_moe, ["block_n=x:swap_ab=y", "block_n", "block_n=32=1", "block_n=32,max_tokens=1",
                                 "block_n=-32", "block_n=0", "block_n=999999999", "swap_ab=2", "block_n=²",
                                 "swap_ab=²", "block_n=٣٢", "swap_ab=١"]),
    "PDLAUNCH_PREFILL_LAUNCH": (triton_prefill.prefill_launch, ["a,b,c,d", "16,64,4", "16,64,4,2,1", "16,64,4,-2",
                                                                "0,64,4,2", "999999999,64,4,2", "16,64,4,²",
                                                                "١٦,64,4,2", "16,64,٤,2"]),
}
_STRUCTURED_BAD = [(variable, value) for variable, (_, own) in STRUCTURED.items()
                   for value in MALFORMED + own if value != ":" or variable == "PDLAUNCH_PREFILL_LAUNCH"]


@pytest.mark.parametrize("variable,value", _STRUCTURED_BAD)
def test_a_bad_structured_setting_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str,
                                                                 value: str) -> None:
    """(`:` is an empty list of entries for the three `:`-joined variables: no override, as when unset.)"""
    _refused(monkeypatch, variable, value, STRUCTURED[variable][0])


def test_valid_gemv_configs_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDLAUNCH_GEMV_CONFIG", "5120x2048=16,256,4: 2048 x 4096 = 4,512,8")
    assert gemv.config_for("NVIDIA H200", 5120, 2048) == (16, 256, 4)
    assert gemv.config_for("NVIDIA H200", 2048, 4096) == (4, 512, 8)
    for setting in ("", ":"):
        monkeypatch.setenv("PDLAUNCH_GEMV_CONFIG", setting)
        assert gemv.config_for("NVIDIA H200", 5120, 2048) == (4, 512, 4)  # the table's


def test_valid_decode_launches_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    default = decode_launch.choose_launch(1, 8, 128, num_sms=132)
    monkeypatch.setenv("PDLAUNCH_DECODE_LAUNCH", "tile=32:splits=4:short_tiles=0:num_warps=8:max_seqs=1")
    launch = decode_launch.with_override(default, 1)
    assert (launch.tile, launch.splits, launch.short_tiles, launch.num_warps) == (32, 4, 0, 8)
    assert decode_launch.with_override(default, 2) == default
    monkeypatch.setenv("PDLAUNCH_DECODE_LAUNCH", "")
    assert decode_launch.with_override(default, 1) == default


def test_valid_moe_tiles_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    default = fused.tile_for(torch.zeros(1, 64), 1)
    monkeypatch.setenv("PDLAUNCH_MOE_TILE", "block_n=32:swap_ab=1:down_num_stages=5:max_tokens=1")
    tile = fused.tile_for(torch.zeros(1, 64), 1)
    assert (tile.block_n, tile.swap_ab, tile.down_num_stages) == (32, True, 5)
    assert fused.tile_for(torch.zeros(2, 64), 2) == fused.DEFAULT_TILES[0]
    monkeypatch.setenv("PDLAUNCH_MOE_TILE", "")
    assert fused.tile_for(torch.zeros(1, 64), 1) == default


@pytest.mark.parametrize("setting,want", [("", (16, 64, 0, 2)), ("32,64,8,3", (32, 64, 8, 3)),
                                          ("16, 128, 0, 1", (16, 128, 0, 1))])
def test_valid_prefill_launches_parse(monkeypatch: pytest.MonkeyPatch, setting: str,
                                      want: tuple[int, int, int, int]) -> None:
    monkeypatch.setenv("PDLAUNCH_PREFILL_LAUNCH", setting)
    launch = triton_prefill.prefill_launch()
    assert (launch.block_q, launch.block_n, launch.num_warps, launch.num_stages) == want


@pytest.mark.parametrize("value,want", [("", "auto"), ("auto", "auto"), ("off", "off"), ("ungrouped", "ungrouped")])
def test_prompt_rows_settings_parse(monkeypatch: pytest.MonkeyPatch, value: str, want: str) -> None:
    from pdlaunch.runner.graph_setup import prompt_rows_setting

    monkeypatch.setenv("PDLAUNCH_PROMPT_ROWS", value)
    assert prompt_rows_setting() == want


@pytest.mark.parametrize("value", ["Off", "of", "grouped", "zz", "0"])
def test_a_bad_prompt_rows_setting_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """It compared against `off` and `ungrouped` and took anything else (`Off`) as auto."""
    from pdlaunch.runner.graph_setup import prompt_rows_setting

    _refused(monkeypatch, "PDLAUNCH_PROMPT_ROWS", value, prompt_rows_setting)
