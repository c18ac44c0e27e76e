"""`bench compare` report from synthetic runs: table, verdicts, JSON, and the plot with or without matplotlib."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from pdlaunch.bench import compare_report
from pdlaunch.bench.advisor import DecodePoint, advise
from pdlaunch.bench.compare_conditional import conditional_capacity
from pdlaunch.bench.compare_config import CompareConfig
from pdlaunch.bench.engine_load import EngineLoad
from pdlaunch.bench.goodput import RatePoint, highest_rate_within
from pdlaunch.bench.matmul_ceiling import MatmulCeiling, PrefillShare, Yardstick
from pdlaunch.bench.rate_sweep import DeploymentRun
from pdlaunch.errors import PdlaunchError


def _point(rate: float, within: int, goodput: float) -> RatePoint:
    load = EngineLoad(wall_s=10.0, prefill_util=rate / 10, decode_util=0.25, prefill_tokens_per_s=30000.0,
                      decode_batch=8 * rate, decode_step_ms=5 + rate)
    return RatePoint(rate=rate, num_prompts=100, completed=100, within_slo=within, duration_s=10.0, goodput=goodput,
                     served=rate, ttft_p50_ms=130.0, ttft_p99_ms=410.0, tpot_p50_ms=13.5, tpot_p99_ms=21.0,
                     tight_within_slo=within // 2, tight_goodput=goodput / 2, itl_p99_ms=4 * rate, load=load,
                     prefill_compute=PrefillShare(tflops=60.0 * rate, of_matmul=60.0 * rate / 700.0))


YARDSTICK = Yardstick(input_len=3072, flops_per_token=2e9,
                      ceiling=MatmulCeiling(device="cuda:0 (NVIDIA H200)", dtype="bfloat16", n=8192, ms=1.57,
                                            tflops=700.0))


def _runs() -> list[DeploymentRun]:
    return [
        DeploymentRun(kind="colocated", label="colocated x2", description="2 colocated (GPU 0,1)",
                      points=[_point(2, 80, 1.6), _point(4, 50, 2.05), _point(8, 4, 0.3)]),
        DeploymentRun(kind="pd", label="PD 1P1D", description="1P (GPU 0) + 1D (GPU 1)", prefill=1, decode=1,
                      points=[_point(2, 100, 2.0), _point(4, 95, 3.8), _point(8, 60, 4.8)]),
    ]


def _cfg(tmp_path: Path) -> CompareConfig:
    return CompareConfig(model="tiny", rates=[2, 4, 8], out=tmp_path)


def test_report_prints_table_and_verdicts_and_writes_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_matplotlib() -> None:
        raise PdlaunchError("--plot needs matplotlib, which is not installed")

    monkeypatch.setattr(compare_report, "require_matplotlib", no_matplotlib)
    console = Console(width=80, record=True)
    doc = compare_report.report_comparison(console, _cfg(tmp_path), _runs(), yardstick=YARDSTICK)
    text = console.export_text()
    rows = [line.split() for line in text.splitlines()]
    assert ["4", "colocated", "x2", "2.05", "4.00", "130", "410", "13.5", "21.0", "50%"] in rows
    assert ["PD", "1P1D", "3.80", "4.00", "130", "410", "13.5", "21.0", "95%"] in rows
    # the second table: goodput relaxed and tight, ITL p99, prefill and decode utilisation
    assert ["8", "colocated", "x2", "0.30", "0.15", "32.0", "80%", "25%"] in rows
    assert ["PD", "1P1D", "2.00", "1.00", "8.0", "20%", "25%"] in rows
    # the third: the prefill steps' FLOP rate with its share of the matmul ceiling
    assert ["8", "colocated", "x2", "480", "69%"] in rows and ["PD", "1P1D", "120", "17%"] in rows
    flat = " ".join(text.split())
    assert "2 GFLOP per token of 3072-token prompts" in flat
    assert "matmul ceiling: a 8192^3 bfloat16 product on cuda:0 (NVIDIA H200): 700 TFLOP/s" in flat
    assert "2 colocated (GPU 0,1) keeps < 90% of requests within the SLOs already at 2 req/s" in text
    assert "1P (GPU 0) + 1D (GPU 1) keeps >= 90% of requests within the SLOs up to 4 req/s" in text
    assert "no plot: matplotlib is not installed (pip install 'pdlaunch[bench]')" in text
    assert not (tmp_path / "goodput.png").exists()
    on_disk = json.loads((tmp_path / "compare.json").read_text())
    assert on_disk == json.loads(json.dumps(doc))
    assert on_disk["pd_highest_rate_within_slo"] == 4
    colocated, pd = on_disk["deployments"]
    assert colocated["highest_rate_within_slo"] is None and pd["highest_rate_within_slo"] == 4
    assert [p["within_share"] for p in pd["points"]] == [1.0, 0.95, 0.6]
    assert [p["tight_within_share"] for p in pd["points"]] == [0.5, 0.47, 0.3]
    assert pd["highest_rate_within_tight_slo"] is None and on_disk["conditional_capacity"] is None
    assert on_disk["settings"]["ttft_slo_ms"] == 400 and on_disk["settings"]["tpot_slo_ms"] == 15
    assert on_disk["settings"]["tight_ttft_slo_ms"] == 1000 and on_disk["settings"]["tight_tpot_slo_ms"] == 10
    assert pd["points"][2]["tight_goodput"] == 2.4 and pd["points"][2]["itl_p99_ms"] == 32.0
    assert pd["points"][0]["load"]["prefill_util"] == 0.2 and on_disk["advisor"] is None
    assert pd["points"][2]["prefill_compute"] == {"tflops": 480.0, "of_matmul": 480.0 / 700.0}
    assert on_disk["prefill_yardstick"]["ceiling"]["tflops"] == 700.0
    assert on_disk["prefill_yardstick"]["flops_per_token"] == 2e9


def test_per_request_disaggregation_is_set_against_the_better_of_the_other_two(tmp_path: Path) -> None:
    runs = [*_runs(), DeploymentRun(kind="conditional", label="PD 1P1D cond.", description="1P + 1D, < 256 local",
                                    prefill=1, decode=1,
                                    points=[_point(2, 100, 2.0), _point(4, 90, 3.5), _point(8, 70, 5.0)])]
    cfg = CompareConfig(model="tiny", rates=[2, 4, 8], out=tmp_path, input_lens=[64, 3072],
                        disaggregate_min_tokens=256)
    console = Console(width=100, record=True)
    doc = compare_report.report_comparison(console, cfg, runs, yardstick=YARDSTICK)
    flat = " ".join(console.export_text().split())
    rows = doc["conditional_against_best"]
    assert [(r["rate"], r["best_other"], r["best_other_goodput"], r["at_least_best"]) for r in rows] == [
        (2, "PD 1P1D", 2.0, True), (4, "PD 1P1D", 3.8, False), (8, "PD 1P1D", 4.8, True)]
    assert rows[1]["tight_goodput"] == 1.75 and rows[1]["best_other_tight"] == "PD 1P1D"
    assert "rate 4/s: per-request disaggregation 3.500/s against 3.800/s of PD 1P1D (0.921x, below it)" in flat
    assert "rate 8/s: per-request disaggregation 5.000/s against 4.800/s of PD 1P1D (1.042x, at least as good)" in flat
    assert rows[2]["ratio"] == pytest.approx(5.0 / 4.8)
    assert "GFLOP per token of 64/3072-token prompts (equal shares)" in flat
    assert [d["kind"] for d in doc["deployments"]] == ["colocated", "pd", "conditional"]
    # the highest rates that keep 90% within: relaxed 4 req/s both; tight (half within) none anywhere
    assert doc["conditional_capacity"] == {
        "relaxed": {"conditional": 4.0, "best_other": "PD 1P1D", "best_other_rate": 4.0, "at_least_best": True},
        "tight": {"conditional": None, "best_other": "colocated x2", "best_other_rate": None, "at_least_best": None}}
    assert ("highest rate keeping >= 90% of requests within the SLOs, of the rates measured: relaxed: per-request "
            "disaggregation 4 req/s against 4 req/s of PD 1P1D (at least as good); tight: per-request "
            "disaggregation none against none of colocated x2 (neither keeps it at the lowest rate)") in flat


def _tight(point: RatePoint, within: int) -> RatePoint:
    return point.model_copy(update={"tight_within_slo": within})


def test_capacity_is_the_highest_rate_kept_within_each_slo_set() -> None:
    colocated, pd = _runs()  # relaxed: colocated none, PD 4 req/s
    colocated.points = [_tight(p, w) for p, w in zip(colocated.points, (95, 91, 10))]   # tight: 4 req/s
    pd.points = [_tight(p, w) for p, w in zip(pd.points, (100, 100, 92))]              # tight: 8 req/s
    cond = DeploymentRun(kind="conditional", label="PD 1P1D cond.", description="1P + 1D, < 256 local",
                         points=[_tight(_point(2, 100, 2.0), 100), _tight(_point(4, 92, 3.7), 89),
                                 _tight(_point(8, 95, 7.6), 99)])  # relaxed 8 req/s; tight 2 (4 misses: 89%)
    assert highest_rate_within(pd.points, tight=True) == 8
    capacity = conditional_capacity([colocated, pd, cond])
    assert capacity is not None
    assert capacity["relaxed"].model_dump() == {"conditional": 8.0, "best_other": "PD 1P1D", "best_other_rate": 4.0,
                                                "at_least_best": True}
    assert capacity["tight"].model_dump() == {"conditional": 2.0, "best_other": "PD 1P1D", "best_other_rate": 8.0,
                                              "at_least_best": False}
    cond.points = [_tight(p, 10) for p in cond.points[:1]]  # misses the tight set at its lowest rate
    capacity = conditional_capacity([colocated, pd, cond])
    assert capacity is not None and capacity["tight"].at_least_best is False
    assert conditional_capacity([colocated, pd]) is None  # no conditional run


def test_without_a_ceiling_the_rate_is_shown_and_the_share_is_not(tmp_path: Path) -> None:
    runs = _runs()
    for run in runs:
        for point in run.points:
            point.prefill_compute = PrefillShare(tflops=1.5, of_matmul=None)
    blind = Yardstick(input_len=3072, flops_per_token=2e9, no_ceiling="the matmul ceiling on cuda failed")
    console = Console(width=80, record=True)
    compare_report.report_comparison(console, _cfg(tmp_path), runs, yardstick=blind)
    text = console.export_text()
    assert ["PD", "1P1D", "1.5", "-"] in [line.split() for line in text.splitlines()]
    assert "matmul ceiling: none (the matmul ceiling on cuda failed)" in " ".join(text.split())


def test_the_advised_split_is_shown_predicted_against_measured(tmp_path: Path) -> None:
    # 1P1D measured; the advice for 2 GPUs is the same split, so the PD run is its measurement
    points = [DecodePoint(batch=16, step_ms=7.0), DecodePoint(batch=64, step_ms=13.0)]
    advice = advise(2, 3000, 100, 15.0, 30000.0, points, 64)  # prefill 10 req/s; decode 64 seqs / 1.3 s
    assert advice.best.label == "1P1D" and advice.best.sustained_rate == pytest.approx(10.0)
    console = Console(width=120, record=True)
    doc = compare_report.report_comparison(console, _cfg(tmp_path), _runs(), advice)
    text = console.export_text()
    assert "P:D advisor: advice for 2 GPUs: 1P1D, predicted to sustain 10.00 req/s" in " ".join(text.split())
    rows = [line.split() for line in text.splitlines()]
    assert ["4", "4.00", "3.80"] in rows and ["8", "8.00", "4.80"] in rows  # rate, predicted, measured
    advisor = json.loads((tmp_path / "compare.json").read_text())["advisor"]
    assert advisor == json.loads(json.dumps(doc["advisor"]))
    assert advisor["split"] == "1P1D" and advisor["measured_by"] == "PD 1P1D" and advisor["slo_set"] == "relaxed"
    assert [(r["rate"], r["predicted_goodput"], r["measured_goodput"]) for r in advisor["per_rate"]] == [
        (2, 2.0, 2.0), (4, 4.0, 3.8), (8, 8.0, 4.8)]
    assert advisor["prefill_tokens_per_s"] == 30000.0 and len(advisor["splits"]) == 1
    # (15 - 13) ms left beside the 64 streams at 30 tokens/ms: 60 prompt tokens a step
    assert advisor["prompt_tokens_while_decoding"] == 60 and advisor["cap_batch"] == 64
    assert ("at most 60 prompt tokens a step keep 64 streams within TPOT 15 ms by the prefill's rate alone, not "
            "counting a step's host work: measure it before lowering scheduler.prompt_tokens_while_decoding"
            ) in " ".join(text.split())


def test_plot_is_written_with_matplotlib(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    advice = advise(2, 3000, 100, 15.0, 30000.0, [DecodePoint(batch=16, step_ms=7.0)], 64)
    path = compare_report.write_goodput_plot(_cfg(tmp_path), _runs(), tmp_path / "goodput.png", advice)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
