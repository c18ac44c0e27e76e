"""`pdlaunch bench compare`: bad input exits 1 naming the flag; a deployment is stopped whatever ends
the run; and one small real run on CPU (demo model) of both deployments, through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from pdlaunch.bench import compare, compare_layout, rate_sweep
from pdlaunch.bench.cli import bench_app
from pdlaunch.bench.compare_config import CompareConfig
from pdlaunch.bench.compare_layout import Layout, resolve_layout
from pdlaunch.bench.matmul_ceiling import MatmulCeiling, Yardstick
from pdlaunch.bench.rate_sweep import DeploymentRun, run_deployment
from pdlaunch.errors import PdlaunchError
from pdlaunch.memory import platform

WORKLOAD = ["--num-prompts", "5", "--input-len", "12", "--output-len", "4", "--max-model-len", "64",
            "--ttft-slo-ms", "5000", "--tpot-slo-ms", "2000", "--num-warmups", "1"]


def _invoke(args: list[str]) -> Any:
    return CliRunner().invoke(bench_app, ["compare", *args])


@pytest.mark.parametrize(("args", "flag"), [
    (["--model", "/no/such/checkpoint", "--rates", "2"], "--model"),
    (["--model", "tiny", "--rates", "0,2"], "--rates"),
    (["--model", "tiny", "--rates", "-1"], "--rates"),
    (["--model", "tiny", "--rates", "two"], "--rates"),
    (["--model", "tiny", "--rates", "2", "--device", "cpu", "--gpus", "0,1"], "--gpus"),
    (["--model", "tiny", "--rates", "2", "--gpus", "0,x"], "--gpus"),
    (["--model", "tiny", "--rates", "2", "--num-prompts", "0"], "--num-prompts"),
    (["--model", "tiny", "--rates", "2", "--duration", "0"], "--duration"),
    (["--model", "tiny", "--rates", "2", "--num-prompts", "32", "--duration", "10"], "--num-prompts and --duration"),
    # the default --input-len 3072 does not fit tiny's max_model_len 2048: said before anything starts
    (["--model", "tiny", "--rates", "2", "--device", "cpu"], "--input-len"),
    (["--model", "tiny", "--rates", "2", "--device", "cpu", "--input-lens", "64,3000"], "--input-lens"),
    (["--model", "tiny", "--rates", "2", "--input-lens", "64,x"], "--input-lens"),
    (["--model", "tiny", "--rates", "2", "--input-lens", "0,64"], "--input-lens"),
    (["--model", "tiny", "--rates", "2", "--input-len", "64", "--input-lens", "64,128"],
     "--input-len and --input-lens"),
    (["--model", "tiny", "--rates", "2", "--disaggregate-min-tokens", "0"], "--disaggregate-min-tokens"),
    (["--model", "tiny", "--rates", "2", "--disaggregate-min-tokens", "8", "--disaggregate-max-queue-tokens", "0"],
     "--disaggregate-max-queue-tokens"),
    # spilling is part of the per-request disaggregation deployment: alone it has none to apply to
    (["--model", "tiny", "--rates", "2", "--disaggregate-max-queue-tokens", "4096"], "--disaggregate-max-queue-tokens"),
    (["--model", "tiny", "--rates", "2", "--disaggregate-max-itl-ms", "9"], "--disaggregate-max-itl-ms"),
    (["--model", "tiny", "--rates", "2", "--disaggregate-min-tokens", "8", "--disaggregate-max-itl-ms", "0"],
     "--disaggregate-max-itl-ms"),
    # a baseline is the colocated and PD runs of an earlier --out: only the per-request deployment runs beside it
    (["--model", "tiny", "--rates", "2", "--baseline", "/no/such/run"], "--baseline"),
    (["--model", "tiny", "--rates", "2", "--disaggregate-min-tokens", "8", "--baseline", "/no/such/run"],
     "--baseline"),
])
def test_bad_input_exits_1_naming_the_flag(tmp_path: Path, args: list[str], flag: str) -> None:
    result = _invoke([*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert f"error: {flag}" in " ".join(result.output.split())
    assert "Traceback" not in result.output


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as a 2-GPU host, for the device checks only."""
    monkeypatch.setattr(platform, "cuda_available", lambda: True)
    monkeypatch.setattr(platform, "device_count", lambda: 2)
    monkeypatch.setattr(platform, "resolve_device", lambda device: "cuda")


def _cfg(tmp_path: Path, **kw: Any) -> CompareConfig:
    return CompareConfig(model="tiny", rates=[2.0], out=tmp_path, **kw)


@pytest.fixture
def ceiling(monkeypatch: pytest.MonkeyPatch) -> MatmulCeiling:
    """The matmul ceiling a run_compare with a fake run_deployment measures first, without its child process (a
    torch import and 12 products of 1024^3: 2-6 s a run on 2 loaded cores). The child itself is tested in
    test_matmul_ceiling.py, and the real compare runs below measure it."""
    measured = MatmulCeiling(device="cpu (1 threads)", dtype="float32", n=1024, ms=40.0, tflops=0.054)
    monkeypatch.setattr(compare_layout, "measure_in_child", lambda *_: measured)
    return measured


def test_duration_sends_as_many_seconds_of_requests_at_every_rate(tmp_path: Path) -> None:
    cfg = CompareConfig(model="tiny", rates=[24, 8, 0.1], duration=2.5, out=tmp_path)  # rates are sorted
    assert [cfg.prompts_at(i) for i in range(3)] == [1, 20, 60]  # at least one request
    assert [rate_sweep.bench_config(cfg, "http://x", i).num_prompts for i in range(3)] == [1, 20, 60]
    fixed = CompareConfig(model="tiny", rates=[8, 24], num_prompts=32, out=tmp_path)
    assert [rate_sweep.bench_config(fixed, "http://x", i).num_prompts for i in range(2)] == [32, 32]


def test_a_base_config_with_per_request_disaggregation_is_refused(tmp_path: Path) -> None:
    """The PD row means every request disaggregated: a --config that sets proxy.disaggregate_min_tokens would make
    it something else under the same label."""
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  path: tiny\nproxy:\n  disaggregate_min_tokens: 64\n")
    result = _invoke(["--model", "tiny", "--device", "cpu", "--rates", "2", "--input-len", "12", "--config", str(base),
                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    flat = " ".join(result.output.split())
    assert "error: --config: the base config sets proxy.disaggregate_min_tokens: 64" in flat
    assert "pass --disaggregate-min-tokens N" in flat and "Traceback" not in result.output


def test_gpu_checks(two_gpus: None, tmp_path: Path) -> None:
    layout = resolve_layout(_cfg(tmp_path))
    assert (layout.device, layout.gpus, layout.colocated, layout.prefill, layout.decode) == ("cuda", [0, 1], 2, 1, 1)
    for kw, flag, words in [
        (dict(gpus=[0, 5]), "--gpus", "GPU 5 does not exist"),
        (dict(gpus=[1, 1]), "--gpus", "listed twice"),
        (dict(gpus=[0, 1], decode=2), "--gpus", "need 3 GPUs"),
        (dict(gpus=[0, 1], colocated_instances=1), "--colocated-instances", "1 colocated instances on 2 GPUs"),
    ]:
        with pytest.raises(PdlaunchError) as info:
            resolve_layout(_cfg(tmp_path, **kw))
        assert info.value.field == flag and words in info.value.message
    result = _invoke(["--model", "tiny", "--rates", "2", "--gpus", "0,7", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "error: --gpus: GPU 7 does not exist" in " ".join(result.output.split())


class _FakeDeployment:
    """Records start/stop; stands in for launcher.Deployment so no process starts."""

    made: list[_FakeDeployment] = []

    def __init__(self, cfg: Any, console: Any) -> None:
        self.proxy_url = "http://127.0.0.1:9"
        self.cfg = cfg
        self.plan = SimpleNamespace(instances=[])  # no instance to read /metrics from
        self.children: list[Any] = []
        self.stops: list[bool] = []
        _FakeDeployment.made.append(self)

    def start(self, ready_timeout: float, **_: object) -> bool:
        return True

    def dead_child(self) -> None:
        return None

    def stop(self, drain: bool = True) -> None:
        self.stops.append(drain)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("boom")])
def test_deployment_is_stopped_when_the_run_is_interrupted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           exc: BaseException) -> None:
    def measure(*_: Any) -> Any:
        raise exc

    _FakeDeployment.made = []
    monkeypatch.setattr(rate_sweep, "Deployment", _FakeDeployment)
    monkeypatch.setattr(rate_sweep, "measure", measure)
    layout = Layout(device="cpu", gpus=[], colocated=2, prefill=1, decode=1)
    with pytest.raises(type(exc)):
        run_deployment(_cfg(tmp_path), layout, "pd", Console(quiet=True))
    assert [d.stops for d in _FakeDeployment.made] == [[False]]  # stopped once, without waiting for a drain


class _DeadChild:
    """A ChildProcess that ended with SIGKILL (-9), the launcher's own kill: no outside kill, no reason logged."""

    name, pid, log_path = "decode-0", 4242, Path("decode-0.log")

    def tail(self, lines: int) -> list[str]:
        return ["CUDA error: out of memory"]

    def poll(self) -> int:
        return -9

    def outside_kill(self) -> None:
        return None

    def exit_reason(self) -> None:
        return None


def test_a_process_lost_during_a_rate_fails_the_run_naming_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class Dying(_FakeDeployment):
        def dead_child(self) -> Any:
            return _DeadChild(), -9

    def measure(*_: Any) -> Any:
        return None, [], {"errors": [""], "ttfts": [0.1], "e2els": [0.2], "output_lens": [4], "duration": 1.0,
                          "completed": 1, "request_throughput": 1.0, "median_ttft_ms": 100.0, "p99_ttft_ms": 100.0,
                          "median_tpot_ms": 33.0, "p99_tpot_ms": 33.0, "p99_itl_ms": 33.0}

    _FakeDeployment.made = []
    monkeypatch.setattr(rate_sweep, "Deployment", Dying)
    monkeypatch.setattr(rate_sweep, "measure", measure)
    console = Console(record=True, width=200)
    layout = Layout(device="cpu", gpus=[], colocated=2, prefill=1, decode=1)
    with pytest.raises(PdlaunchError) as info:
        run_deployment(_cfg(tmp_path), layout, "pd", console)
    assert "the pd deployment lost a process: decode-0 (pid 4242) was killed by signal 9" in info.value.message
    assert "CUDA error: out of memory" in console.export_text()
    assert [d.stops for d in _FakeDeployment.made] == [[False]]


def _leftovers(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (the deployments' log folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


@pytest.mark.e2e
@pytest.mark.timeout(240)
@pytest.mark.slow
def test_compare_demo_on_cpu_runs_both_deployments_and_stops_them(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = _invoke(["--model", "tiny", "--device", "cpu", "--rates", "4,8", *WORKLOAD, "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "colocated x2" in text and "PD 1P1D" in text and "goodput" in text and "TPOT" in text
    assert "keeps >= 90% of requests within the SLOs" in text
    assert "colocated deployment stopped: 3 processes reaped" in text
    assert "pd deployment stopped: 3 processes reaped" in text

    doc = json.loads((out / "compare.json").read_text())
    assert doc["settings"]["rates"] == [4.0, 8.0] and doc["within_slo_share"] == 0.9
    assert [d["kind"] for d in doc["deployments"]] == ["colocated", "pd"]
    # what each instance's steps could hold, as the deployments ran (the defaults here)
    assert doc["deployments"][0]["steps"] == {
        "colocated": {"max_num_batched_tokens": 8192, "prompt_tokens_while_decoding": 1024}}
    assert doc["deployments"][1]["steps"] == {
        "prefill": {"max_num_batched_tokens": 8192, "prompt_tokens_while_decoding": 1024},
        "decode": {"max_num_batched_tokens": 2048, "prompt_tokens_while_decoding": 1024}}
    assert "steps: colocated 8192 tokens, 1024 prompt tokens beside decodes" in " ".join(text.split())
    assert "steps: prefill 8192 tokens; decode 2048 tokens, 1024 prompt tokens beside decodes" in " ".join(text.split())
    # generous SLOs on an idle demo model: every request is within, so PD passes at both rates
    assert doc["pd_highest_rate_within_slo"] == 8.0
    for dep in doc["deployments"]:
        assert dep["stopped"] is True and len(dep["pids"]) == 3
        for pid in dep["pids"]:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert [p["rate"] for p in dep["points"]] == [4.0, 8.0]
        for point, raw in zip(dep["points"], dep["raw"]):
            assert point["completed"] == point["num_prompts"] == point["within_slo"] == 5
            assert point["goodput"] == pytest.approx(5 / raw["duration"])
            assert point["within_share"] == 1.0
            assert point["ttft_p50_ms"] > 0 and point["tpot_p99_ms"] >= point["tpot_p50_ms"] > 0
            assert raw["output_lens"] == [4] * 5  # ignore_eos: exactly --output-len tokens
            assert raw["input_lens"] == [12] * 5
            assert point["tight_within_slo"] <= 5 and point["itl_p99_ms"] > 0
            assert 0 < point["load"]["prefill_util"] <= 1 and 0 < point["load"]["decode_util"] <= 1
            assert point["load"]["prefill_tokens_per_s"] > 0 and point["load"]["decode_batch"] >= 1
            compute = point["prefill_compute"]  # the prefill steps' FLOP rate against the CPU's matmul rate
            assert compute["tflops"] == pytest.approx(
                point["load"]["prefill_tokens_per_s"] * doc["prefill_yardstick"]["flops_per_token"] / 1e12)
            assert compute["of_matmul"] == pytest.approx(
                compute["tflops"] / doc["prefill_yardstick"]["ceiling"]["tflops"])
    # the same workload for both deployments at each rate: same seed, same send schedule
    colocated, pd = doc["deployments"]
    for a, b in zip(colocated["raw"], pd["raw"]):
        assert a["seed"] == b["seed"] and a["request_rate"] == b["request_rate"]
    assert [r["seed"] for r in pd["raw"]] == [0, 1]
    assert _leftovers(str(out)) == []
    # two instances split one way only: the advice is the PD run's own 1P1D, measured by it, not run again
    advisor = doc["advisor"]
    assert advisor["split"] == "1P1D" and advisor["measured_by"] == "PD 1P1D" and advisor["num_gpus"] == 2
    assert [r["measured_goodput"] for r in advisor["per_rate"]] == [p["goodput"] for p in pd["points"]]
    # the per-rate prediction replays the PD run's own requests: its rates, send times, prompt lengths
    assert [w["rate"] for w in advisor["workloads"]] == [p["rate"] for p in pd["points"]]
    for w, raw, point in zip(advisor["workloads"], pd["raw"], pd["points"]):
        answered = [t for t, err in zip(raw["start_times"], raw["errors"]) if not err]
        assert w["arrivals_s"] == pytest.approx([t - min(answered) for t in answered])
        assert w["prompt_lens"] == [12] * len(answered) and w["ttft_overhead_s"] >= 0
        assert w["decode_step_ms"] == point["load"]["decode_step_ms"]
    assert "P:D advisor: advice for 2 GPUs: 1P1D" in " ".join(text.split()) and "ITL" in text
    cap = doc["advisor"]["prompt_tokens_while_decoding"]  # the prompt tokens a step beside decodes keep TPOT
    assert isinstance(cap, int) and cap >= 0
    assert f"at most {cap} prompt tokens a step keep" in " ".join(text.split())
    assert "before lowering scheduler.prompt_tokens_while_decoding, now 1024" in " ".join(text.split())
    assert doc["prefill_yardstick"]["ceiling"]["device"].startswith("cpu (")
    assert "matmul ceiling: 1024^3 float32 on cpu" in text and "TFLOP/s" in text
    for dep in doc["deployments"]:  # each deployment's figures were saved as soon as it was done
        assert json.loads((out / f"{dep['kind']}.json").read_text())["points"] == [
            {k: v for k, v in p.items() if k not in ("within_share", "tight_within_share")} for p in dep["points"]]
    plot = out / "goodput.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot: matplotlib is not installed" in text and not plot.exists()
    else:
        assert plot.stat().st_size > 0


@pytest.mark.e2e
@pytest.mark.timeout(360)
@pytest.mark.slow
def test_a_mixed_workload_runs_pd_with_per_request_disaggregation_too(tmp_path: Path) -> None:
    """--input-lens 8,40 --disaggregate-min-tokens 24: colocated, PD and PD with per-request disaggregation, each
    sent the same mix; in the third the proxy runs the 8-token prompts on the decode alone, the 40-token ones PD.
    A base config's step limits and API key reach every deployment, the report and compare's own requests."""
    out = tmp_path / "mix"
    base = tmp_path / "base.yaml"
    # an API key in the base config: compare's own requests must send it (they got 401 before)
    base.write_text("scheduler:\n  max_num_batched_tokens: 512\n  prompt_tokens_while_decoding: 16\n"
                    "security:\n  api_key: sk-compare-test\n")
    base.chmod(0o600)
    workload = [a for a in WORKLOAD if a not in ("--input-len", "12", "--num-prompts", "5")]
    result = _invoke(["--model", "tiny", "--device", "cpu", "--rates", "4", *workload, "--num-prompts", "6",
                      "--input-lens", "8,40", "--disaggregate-min-tokens", "24", "--config", str(base),
                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "steps: colocated 512 tokens, 16 prompt tokens beside decodes" in text
    assert "conditional deployment stopped: 3 processes reaped" in text
    assert "prompts of < 24 uncached tokens on the decode alone" in text
    doc = json.loads((out / "compare.json").read_text())
    assert [d["kind"] for d in doc["deployments"]] == ["colocated", "pd", "conditional"]
    for dep in doc["deployments"]:
        assert dep["stopped"] is True
        assert {limits["max_num_batched_tokens"] for limits in dep["steps"].values()} == {512}
        assert {limits["prompt_tokens_while_decoding"] for limits in dep["steps"].values()} == {16}
        (raw,) = dep["raw"]
        assert sorted(raw["input_lens"]) == [8, 8, 8, 40, 40, 40] and raw["input_len_mix"] == [8, 40]
        (point,) = dep["points"]
        assert point["completed"] == 6
        # long stalls counted at the client and at the streaming instances, printed when there were any
        gaps = sum(1 for itls in raw["itls"] for gap in itls if gap >= 0.05)
        assert point["long_itl_gaps"] == gaps and point["load"]["long_token_gaps"] >= 0
        at_instances = round(point["load"]["long_token_gaps"])
        if gaps or at_instances or round(point["load"]["slow_decode_steps"]):
            assert f"{gaps} token gaps >= 50 ms ({at_instances} at the instances" in text
    pd, conditional = doc["deployments"][1:]
    assert pd["points"][0]["load"]["decisions"] is None  # the always-PD proxy is not asked
    decisions = conditional["points"][0]["load"]["decisions"]  # the 6 requests and the 1 warm-up
    assert sum(decisions.values()) == 7 and decisions["decode_only"] >= 3 and decisions["pd"] >= 3
    assert f"{decisions['decode_only']} on a decode alone and {decisions['pd']} PD" in text
    (row,) = doc["conditional_against_best"]
    best = max(doc["deployments"][:2], key=lambda d: d["points"][0]["goodput"])
    assert row["rate"] == 4.0 and row["goodput"] == conditional["points"][0]["goodput"]
    assert row["best_other"] == best["label"] and row["best_other_goodput"] == best["points"][0]["goodput"]
    assert row["at_least_best"] == (row["goodput"] >= row["best_other_goodput"])
    assert "rate 4/s: per-request disaggregation" in text
    assert set(doc["conditional_capacity"]) == {"relaxed", "tight"}  # the highest rates kept within, per SLO set
    assert "highest rate keeping >= 90% of requests within the SLOs, of the rates measured: relaxed:" in text
    # KV moved over the rate: none between colocated instances, less with the short prompts on the decode alone
    colocated_bytes, pd_bytes, cond_bytes = (d["points"][0]["load"]["kv_bytes"] for d in doc["deployments"])
    assert colocated_bytes == 0 and 0 < cond_bytes < pd_bytes
    assert row["kv_bytes"] == cond_bytes and row["pd_kv_bytes"] == pd_bytes
    assert f"KV moved {cond_bytes:,.0f} B against PD's {pd_bytes:,.0f} B" in text
    computed = [d["points"][0]["load"]["prompt_tokens_computed"] for d in doc["deployments"]]
    assert all(c > 0 for c in computed)
    assert doc["advisor"]["measured_by"] == "PD 1P1D"  # the advice comes from the always-PD run
    assert _leftovers(str(out)) == []
    # An A/B of the per-request deployment's settings: only it runs again, beside the first run's other two.
    again = tmp_path / "again"
    result = _invoke(["--model", "tiny", "--device", "cpu", "--rates", "4", *workload, "--num-prompts", "6",
                      "--input-lens", "8,40", "--disaggregate-min-tokens", "16", "--config", str(base),
                      "--baseline", str(out), "--out", str(again)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"colocated and PD runs reused from {out}" in text
    assert "conditional deployment stopped: 3 processes reaped" in text and "pd deployment stopped" not in text
    redo = json.loads((again / "compare.json").read_text())
    assert [d["kind"] for d in redo["deployments"]] == ["colocated", "pd", "conditional"]
    assert redo["deployments"][:2] == doc["deployments"][:2]
    assert "prompts of < 16 uncached tokens on the decode alone" in text
    assert _leftovers(str(again)) == []


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_sigterm_while_starting_stops_the_deployment(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    log = open(tmp_path / "compare.out", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdlaunch", "bench", "compare", "--model", "tiny", "--device", "cpu", "--rates", "2",
         *WORKLOAD, "--out", str(out)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(_leftovers(str(out))) < 2:  # both colocated instances run (the proxy comes once they are ready)
            assert proc.poll() is None, (tmp_path / "compare.out").read_text()
            assert time.monotonic() < deadline, "gave up after 60s waiting for the colocated instances to start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
    text = (tmp_path / "compare.out").read_text()
    assert "interrupted: the running deployment was stopped" in text
    assert _leftovers(str(out)) == []
    assert not (out / "compare.json").exists()


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_sigterm_during_a_rate_stops_it_promptly(tmp_path: Path) -> None:
    """The stop signal sets a flag (an exception raised wherever the main thread was could leave an HTTP client's
    pool lock held, and the run's cleanup wait on it for good); the rate's requests look at it and end at once."""
    out = tmp_path / "cmp"
    log = open(tmp_path / "compare.out", "w")
    workload = [*WORKLOAD]
    workload[workload.index("--num-prompts") + 1] = "400"  # 200 s of arrivals at 2/s: far longer than the test
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdlaunch", "bench", "compare", "--model", "tiny", "--device", "cpu", "--rates", "2",
         *workload, "--out", str(out)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while "400 requests to" not in (tmp_path / "compare.out").read_text():  # the rate's requests are under way
            assert proc.poll() is None, (tmp_path / "compare.out").read_text()
            assert time.monotonic() < deadline, "gave up after 120s waiting for the first rate to start"
            time.sleep(0.2)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
        assert time.monotonic() - signalled < 30, "the stop waited for the rate"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
    text = " ".join((tmp_path / "compare.out").read_text().split())
    assert "interrupted: the running deployment was stopped and its processes reaped; no report (no deployment " \
        "run had finished)" in text, text
    assert "colocated deployment stopped" in text and "Traceback" not in text, text
    assert _leftovers(str(out)) == []
    assert not (out / "colocated.json").exists() and not (out / "compare.json").exists()


def _measured_run(kind: str, layout: Layout) -> DeploymentRun:
    """A run whose PD figures make the advisor prefer 2P1D of 3: prefill 30000 tokens/s (9.8 req/s of 3072
    tokens per GPU), decode t(b) = 5 + 0.125 b ms (64 sequences at 13 ms for 128 tokens: 38 req/s per GPU)."""
    from pdlaunch.bench.engine_load import EngineLoad
    from pdlaunch.bench.goodput import RatePoint

    points = [RatePoint(rate=2.0, num_prompts=10, completed=10, within_slo=10, duration_s=5.0, goodput=2.0,
                        served=2.0, ttft_p50_ms=100, ttft_p99_ms=200, tpot_p50_ms=8, tpot_p99_ms=9,
                        load=EngineLoad(wall_s=5.0, prefill_util=0.2, decode_util=0.3, prefill_tokens_per_s=30000.0,
                                        decode_batch=batch, decode_step_ms=5 + 0.125 * batch))
              for batch in (16.0, 64.0)]
    return DeploymentRun(kind=kind, label=compare_layout.label(kind, layout),  # type: ignore[arg-type]
                                 description=compare_layout.describe(kind, layout), prefill=layout.prefill,
                                 decode=layout.decode, points=points)


@pytest.mark.parametrize("run_advised", [True, False])
def test_the_advised_split_runs_when_it_is_not_the_pd_split(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            run_advised: bool, ceiling: MatmulCeiling) -> None:
    ran: list[tuple[str, int, int]] = []

    def fake_run(cfg: CompareConfig, layout: Layout, kind: str, console: Any,
                 yardstick: Yardstick | None, **_: object) -> DeploymentRun:
        assert yardstick is not None and yardstick.ceiling == ceiling  # measured before the first deployment
        ran.append((kind, layout.prefill, layout.decode))
        return _measured_run(kind, layout)

    monkeypatch.setattr(compare, "run_deployment", fake_run)
    cfg = _cfg(tmp_path, device="cpu", prefill=1, decode=2, run_advised=run_advised,
               input_len=1024)
    comparison = compare.run_compare(cfg, Console(quiet=True))
    runs, advice = comparison.runs, comparison.advice
    assert advice is not None and advice.best.label == "2P1D" and advice.num_gpus == 3
    assert advice.decode_sequences == 64.0  # the tiny model's max_num_seqs caps the fit's 80
    expected = [("colocated", 1, 2), ("pd", 1, 2)] + ([("advised", 2, 1)] if run_advised else [])
    assert ran == expected and [r.kind for r in runs] == [k for k, *_ in expected]
    assert (tmp_path / "advised.json").exists() == run_advised


@pytest.mark.usefixtures("ceiling")
def test_no_advised_run_when_no_split_meets_the_slos_and_the_report_says_why(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    """Review 76F: a decode step over the TPOT target at batch 1 gives every split an SLO rate of 0; the tie went
    to 2P1D, which then ran as "advised" on an all-zero prediction."""
    from pdlaunch.bench.compare_report import report_comparison

    ran: list[str] = []

    def fake_run(cfg: CompareConfig, layout: Layout, kind: str, console: Any,
                 yardstick: Yardstick | None, **_: object) -> DeploymentRun:
        ran.append(kind)
        run = _measured_run(kind, layout)
        for point in run.points:  # t(b) = 20 + 0.125 b ms: 20.125 ms at batch 1, over the 15 ms TPOT target
            assert point.load is not None and point.load.decode_batch is not None
            point.load.decode_step_ms = 20 + 0.125 * point.load.decode_batch
        return run

    monkeypatch.setattr(compare, "run_deployment", fake_run)
    cfg = _cfg(tmp_path, device="cpu", prefill=1, decode=2, input_len=1024)
    console = Console(width=200, record=True)
    comparison = compare.run_compare(cfg, console)
    assert ran == ["colocated", "pd"] and not (tmp_path / "advised.json").exists()
    reason = "a batch-1 decode step takes 20.1 ms, 5.1 ms over the TPOT target of 15 ms"
    report_comparison(console, cfg, comparison.runs, comparison.advice, comparison.yardstick)
    text = " ".join(console.export_text().split())
    assert f"advised split not run: no split meets the relaxed SLOs: {reason}" in text, text
    advisor = json.loads((tmp_path / "compare.json").read_text())["advisor"]
    assert advisor["split"] is None and advisor["measured_by"] is None and advisor["unmet"] == reason
    assert advisor["advised_run_skipped"] == f"no split meets the relaxed SLOs: {reason}"
    assert advisor["sentence"].startswith(f"advice for 3 GPUs: no split meets the SLOs: {reason}")


@pytest.mark.usefixtures("ceiling")
def test_the_json_says_why_an_advised_split_was_not_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pdlaunch.bench.compare_report import compare_document

    monkeypatch.setattr(compare, "run_deployment", lambda cfg, layout, kind, *_, **__: _measured_run(kind, layout))
    cfg = _cfg(tmp_path, device="cpu", prefill=1, decode=2, input_len=1024, run_advised=False)
    comparison = compare.run_compare(cfg, Console(quiet=True))
    advisor = compare_document(cfg, comparison.runs, comparison.advice)["advisor"]
    assert isinstance(advisor, dict) and advisor["split"] == "2P1D" and advisor["measured_by"] is None
    assert advisor["advised_run_skipped"] == "--no-run-advised"
    cfg = _cfg(tmp_path / "run", device="cpu", prefill=1, decode=2, input_len=1024)
    comparison = compare.run_compare(cfg, Console(quiet=True))
    advisor = compare_document(cfg, comparison.runs, comparison.advice)["advisor"]
    assert isinstance(advisor, dict) and advisor["measured_by"] == "PD 2P1D adv." and \
        advisor["advised_run_skipped"] is None


def test_the_itl_threshold_reaches_the_conditional_deployment_only(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, device="cpu", input_len=12, disaggregate_min_tokens=8, disaggregate_max_itl_ms=8.5)
    layout = resolve_layout(cfg)
    assert compare_layout.deployment_config(cfg, layout, "conditional").proxy.disaggregate_max_itl_ms == 8.5
    assert compare_layout.deployment_config(cfg, layout, "pd").proxy.disaggregate_max_itl_ms is None
    described = compare_layout.describe("conditional", layout, 8, None, 8.5)
    assert "none while its streams wait >= 8.5 ms a token" in described
    point = SimpleNamespace(load=SimpleNamespace(decisions={"pd": 2, "decode_only": 3, "pd_decode_busy": 1}))
    assert rate_sweep._decisions_text(point) == (  # type: ignore[arg-type]  # noqa: SLF001
        ", 3 on a decode alone and 3 PD (1 of them because the decode had no TPOT headroom)")


def test_the_rate_line_says_where_long_token_gaps_arose() -> None:
    def point(client: int, instances: float | None, slow: float = 0.0) -> SimpleNamespace:
        load = SimpleNamespace(long_token_gaps=instances, slow_decode_steps=slow) if instances is not None else None
        return SimpleNamespace(long_itl_gaps=client, load=load)

    assert rate_sweep._gaps_text(point(0, 0.0)) == ""  # type: ignore[arg-type]  # noqa: SLF001
    assert rate_sweep._gaps_text(point(31, 0.0)) == (  # type: ignore[arg-type]  # noqa: SLF001
        ", 31 token gaps >= 50 ms (0 at the instances)")
    assert rate_sweep._gaps_text(point(0, 4.0)) == (  # type: ignore[arg-type]  # noqa: SLF001
        ", 0 token gaps >= 50 ms (4 at the instances)")
    assert rate_sweep._gaps_text(point(2, None)) == ", 2 token gaps >= 50 ms"  # type: ignore[arg-type]  # noqa: SLF001
    assert rate_sweep._gaps_text(point(31, 31.0, 1.0)) == (  # type: ignore[arg-type]  # noqa: SLF001
        ", 31 token gaps >= 50 ms (31 at the instances, 1 slow decode steps)")


def _baseline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ran: list[str], **kw: Any) -> CompareConfig:
    """An earlier run's --out (colocated and PD, run by a fake run_deployment) and the report's compare.json."""
    from pdlaunch.bench.compare_report import compare_document

    def fake_run(cfg: CompareConfig, layout: Layout, kind: str, console: Any,
                 yardstick: Yardstick | None, **_: object) -> DeploymentRun:
        ran.append(kind)
        return _measured_run(kind, layout)

    monkeypatch.setattr(compare, "run_deployment", fake_run)
    earlier = _cfg(tmp_path / "earlier", device="cpu", input_len=1024, run_advised=False, **kw)
    comparison = compare.run_compare(earlier, Console(quiet=True))
    (earlier.out / "compare.json").write_text(json.dumps(compare_document(earlier, comparison.runs,
                                                                          comparison.advice)))
    return earlier


@pytest.mark.usefixtures("ceiling")
def test_a_baseline_run_reuses_its_colocated_and_pd_runs_and_runs_only_per_request_disaggregation(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ran: list[str] = []
    earlier = _baseline(tmp_path, monkeypatch, ran)
    assert ran == ["colocated", "pd"]
    ran.clear()
    cfg = _cfg(tmp_path / "now", device="cpu", input_len=1024, disaggregate_min_tokens=256,
               disaggregate_max_queue_tokens=4096, baseline=earlier.out)
    comparison = compare.run_compare(cfg, Console(quiet=True))
    assert ran == ["conditional"]  # the advised split is not run either: its advice is the baseline's PD run's
    assert [r.kind for r in comparison.runs] == ["colocated", "pd", "conditional"]
    assert comparison.advice is not None and comparison.advice.num_gpus == 2  # from the baseline's PD run
    for kind in ("colocated", "pd"):  # the new --out holds every deployment the report shows
        assert (cfg.out / f"{kind}.json").read_text() == (earlier.out / f"{kind}.json").read_text()
    assert (cfg.out / "conditional.json").exists()


@pytest.mark.usefixtures("ceiling")
@pytest.mark.parametrize(("change", "setting"), [
    ({"rates": [4.0]}, "rates"), ({"num_prompts": 20}, "num_prompts"), ({"tpot_slo_ms": 10.0}, "tpot_slo_ms"),
    ({"seed": 3}, "seed"),
])
def test_a_baseline_of_another_workload_is_refused_naming_the_setting(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, change: dict[str, Any], setting: str) -> None:
    ran: list[str] = []
    earlier = _baseline(tmp_path, monkeypatch, ran)
    ran.clear()
    settings: dict[str, Any] = {"model": "tiny", "rates": [2.0], "device": "cpu", "input_len": 1024, **change}
    cfg = CompareConfig(out=tmp_path / "now", disaggregate_min_tokens=256, baseline=earlier.out, **settings)
    with pytest.raises(PdlaunchError, match=f"ran with {setting} ") as info:
        compare.run_compare(cfg, Console(quiet=True))
    assert info.value.field == "--baseline" and ran == []  # nothing ran


@pytest.mark.usefixtures("ceiling")
def test_a_baseline_whose_files_do_not_parse_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    earlier = _baseline(tmp_path, monkeypatch, [])
    (earlier.out / "pd.json").write_text("{not json")
    cfg = _cfg(tmp_path / "now", device="cpu", input_len=1024, disaggregate_min_tokens=256, baseline=earlier.out)
    with pytest.raises(PdlaunchError, match="could not read the baseline run") as info:
        compare.run_compare(cfg, Console(quiet=True))
    assert info.value.field == "--baseline"
