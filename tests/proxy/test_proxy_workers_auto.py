"""proxy.workers: auto (the default): one proxy worker per 8 CPUs the proxy may use where it runs (its affinity,
bounded by a cgroup CPU quota: a Kubernetes CPU limit), 1 to 4; resolved by `python -m pdlaunch.proxy --workers
auto` itself and logged with the reason. Explicit counts are unchanged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.proxy_workers import auto_workers, cgroup_cpu_quota, usable_cpus
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.__main__ import parse_args
from tests.config.cli_helpers import check
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_proxy_failures import ScriptedInstance


@pytest.mark.parametrize(("cpus", "workers"), [(1, 1), (2, 1), (8, 1), (15, 1), (16, 2), (24, 3), (32, 4), (192, 4)])
def test_auto_is_one_worker_per_8_usable_cpus_from_1_to_4(cpus: int, workers: int) -> None:
    auto = auto_workers(affinity=cpus, root=None)
    assert (auto.workers, auto.usable_cpus) == (workers, cpus)
    assert auto.why == f"auto: {cpus} usable CPU{'s' if cpus > 1 else ''}"


V2_ROOT = "0::/\n"  # /proc/self/cgroup in a container with its own cgroup namespace (cgroup v2)
V1_ROOT = "4:memory:/\n3:cpu,cpuacct:/\n2:cpuset:/\n"  # the same under cgroup v1


def _cgroup(tmp_path: Path, files: dict[str, str], self_cgroup: str = V2_ROOT) -> tuple[Path, Path]:
    """A fake cgroup mount under tmp_path/sys (its `files`) and the process's /proc/self/cgroup (`self_cgroup`)."""
    for name, text in {**{f"sys/{name}": text for name, text in files.items()}, "self_cgroup": self_cgroup}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path / "sys", tmp_path / "self_cgroup"


def test_a_cgroup_v2_cpu_limit_bounds_the_affinity(tmp_path: Path) -> None:
    root, own = _cgroup(tmp_path, {"cpu.max": "200000 100000\n"})  # a Kubernetes limit of 2 CPUs on 64 cores
    assert cgroup_cpu_quota(root, own) == 2.0
    auto = auto_workers(affinity=64, root=root, self_cgroup=own)
    assert (auto.workers, auto.usable_cpus) == (1, 2) and "CPU quota 2 of 64 CPUs" in auto.why, auto
    assert auto.line() == "1 worker (auto: 2 usable CPUs, CPU quota 2 of 64 CPUs)"
    big = auto_workers(affinity=64, root=_cgroup(tmp_path / "b", {"cpu.max": "1650000 100000"})[0],
                       self_cgroup=own)  # 16.5 CPUs
    assert (big.workers, big.usable_cpus) == (2, 16)


def test_no_quota_leaves_the_affinity(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(*_cgroup(tmp_path / "max", {"cpu.max": "max 100000\n"})) is None
    assert cgroup_cpu_quota(*_cgroup(tmp_path / "none", {})) is None  # no cgroup files at all
    assert cgroup_cpu_quota(*_cgroup(tmp_path / "v1none", {"cpu/cpu.cfs_quota_us": "-1\n",
                                                            "cpu/cpu.cfs_period_us": "100000\n"}, V1_ROOT)) is None
    auto = auto_workers(affinity=32, root=tmp_path / "max" / "sys", self_cgroup=tmp_path / "max" / "self_cgroup")
    assert (auto.workers, auto.line()) == (4, "4 workers (auto: 32 usable CPUs)")
    assert usable_cpus(8, 0.5) == 1  # half a CPU: still one


def test_a_cgroup_v1_cfs_quota_bounds_the_affinity(tmp_path: Path) -> None:
    root, own = _cgroup(tmp_path, {"cpu,cpuacct/cpu.cfs_quota_us": "1600000\n",
                                   "cpu,cpuacct/cpu.cfs_period_us": "100000"}, V1_ROOT)
    assert cgroup_cpu_quota(root, own) == 16.0
    assert auto_workers(affinity=96, root=root, self_cgroup=own).workers == 2


def test_the_quota_is_the_processs_own_cgroups_the_smallest_up_to_the_root(tmp_path: Path) -> None:
    """A process in a nested cgroup (systemd slice, a pod without its own cgroup namespace): its cgroup is the one
    /proc/self/cgroup names, and a parent's quota bounds it too. The mount's own cpu.max is not the process's."""
    pod = "kubepods.slice/kubepods-pod1.slice/cri-abc.scope"
    root, own = _cgroup(tmp_path, {"kubepods.slice/cpu.max": "6400000 100000\n",  # the node's pods: 64 CPUs
                                   "kubepods.slice/kubepods-pod1.slice/cpu.max": "300000 100000\n",  # the pod: 3
                                   f"{pod}/cpu.max": "max 100000\n"}, f"0::/{pod}\n")
    assert cgroup_cpu_quota(root, own) == 3.0
    auto = auto_workers(affinity=96, root=root, self_cgroup=own)
    assert (auto.workers, auto.usable_cpus) == (1, 3) and "CPU quota 3 of 96 CPUs" in auto.why, auto
    v1_root, v1_own = _cgroup(tmp_path / "v1", {"cpu/docker/cpu.cfs_quota_us": "800000", "cpu/docker/cpu.cfs_period_us":
                                                "100000", "cpu/docker/c1/cpu.cfs_quota_us": "2400000",
                                                "cpu/docker/c1/cpu.cfs_period_us": "100000"}, "2:cpu:/docker/c1\n")
    assert cgroup_cpu_quota(v1_root, v1_own) == 8.0  # the parent's 8 CPUs bound the container's 24
    assert auto_workers(affinity=64, root=v1_root, self_cgroup=v1_own).workers == 1


def test_a_v1_container_sees_its_own_cgroup_at_the_mount(tmp_path: Path) -> None:
    """Docker without a cgroup namespace: /proc/self/cgroup names the host's path, but the container's cpu mount
    holds its own cgroup's files at its top."""
    root, own = _cgroup(tmp_path, {"cpu,cpuacct/cpu.cfs_quota_us": "400000", "cpu,cpuacct/cpu.cfs_period_us":
                                   "100000"}, "5:cpu,cpuacct:/docker/0123abcd\n")
    assert cgroup_cpu_quota(root, own) == 4.0


def test_unreadable_cgroup_files_fall_back_to_the_affinity(tmp_path: Path) -> None:
    root, own = _cgroup(tmp_path, {"a/cpu.max": "garbage\n", "a/b/cpu.max": "100000\n"}, "0::/a/b\n")
    assert cgroup_cpu_quota(root, own) is None
    assert cgroup_cpu_quota(root, tmp_path / "no-proc") is None  # no /proc/self/cgroup: the mount's own files
    (root / "a" / "b" / "cpu.max").unlink()
    (root / "a" / "b" / "cpu.max").mkdir()  # a directory where the file should be: unreadable
    assert auto_workers(affinity=16, root=root, self_cgroup=own).line() == "2 workers (auto: 16 usable CPUs)"
    assert cgroup_cpu_quota(root, own) is None


def test_the_config_takes_auto_by_default_or_a_count() -> None:
    assert DeploymentConfig.model_validate({"model": {"path": "tiny"}}).proxy.workers == "auto"
    for value, read in (("auto", "auto"), (4, 4), ("4", 4), (64, 64)):
        cfg = DeploymentConfig.model_validate({"model": {"path": "tiny"}, "proxy": {"workers": value}})
        assert cfg.proxy.workers == read
    for bad in (0, 65, "many", True, 2.5):
        with pytest.raises(ValueError, match="proxy.workers|must be auto or a whole number from 1 to 64"):
            DeploymentConfig.model_validate({"model": {"path": "tiny"}, "proxy": {"workers": bad}})


def test_check_config_accepts_and_shows_auto(tmp_path: Path) -> None:
    here = auto_workers()
    result = check(["--model", "tiny", "--proxy-workers", "auto"])
    assert result.exit_code == 0, result.output
    assert f"workers auto -> {here.workers} here ({here.why})" in result.output, result.output
    (tmp_path / "d.yaml").write_text("model: {path: tiny}\nproxy: {workers: 3}\n")
    result = check([str(tmp_path / "d.yaml")])
    assert result.exit_code == 0 and "workers 3 " in result.output, result.output
    result = check(["--model", "tiny", "--proxy-workers", "lots"])
    assert result.exit_code == 1 and "--proxy-workers: must be auto or a whole number from 1 to 64, got 'lots'" \
        in result.output, result.output


def test_the_proxy_refuses_a_bad_workers_value_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--colocated", "http://127.0.0.1:1", "--workers", "auto"]).workers == "auto"
    assert parse_args(["--colocated", "http://127.0.0.1:1", "--workers", "3"]).workers == 3
    with pytest.raises(SystemExit) as exited:
        parse_args(["--colocated", "http://127.0.0.1:1", "--workers", "some"])
    assert exited.value.code == 1
    assert "--workers must be 1 to 64, or auto (got 'some')" in capsys.readouterr().err


@pytest.mark.slow
def test_the_proxy_started_with_workers_auto_says_how_many_and_serves(tmp_path: Path) -> None:
    """`python -m pdlaunch.proxy --workers auto`, as the launcher starts it by default: it logs the count it
    resolved and why (the count this machine gives: 1 on a 2-core CI runner), then answers through PD."""
    ports = PortAllocator("127.0.0.1")
    prefill, decode = ScriptedInstance("prefill"), ScriptedInstance("decode")
    port = ports.free("proxy")
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "proxy.log"
    with ThreadServer(prefill.app, ports.free("prefill")) as p, ThreadServer(decode.app, ports.free("decode")) as d, \
            open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pdlaunch.proxy", "--port", str(port), "--prefill", p.url,
                                 "--decode", d.url, "--workers", "auto"], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "Uvicorn running" in log_path.read_text() or proc.poll() is not None,
                     "the proxy to listen", 120)
            r = httpx.post(url + "/v1/completions", json={"prompt": "ok", "stream": True}, timeout=60)
            assert r.status_code == 200 and '"t2"' in r.text and "[DONE]" in r.text, r.text
        finally:
            proc.terminate()
            proc.wait(60)
    text = log_path.read_text()
    assert f"proxy: {auto_workers().line()}" in text, text[-2000:]
