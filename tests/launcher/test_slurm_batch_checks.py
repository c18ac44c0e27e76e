"""What the `--backend slurm` batch process checks and what it leaves to each node's step (config/validate.py's
checked_on_nodes, launcher/backends/slurm_node.py): salloc's shell runs on a login node, here one without GPUs,
while the nodes have 8. The batch process must not resolve `device: auto` on its own machine (it became cpu for
every node), nor refuse sleep mode / the cumem allocator, nor check GPU memory or RAM there; each node's step
still does, and says the device it resolved. No GPU is needed: each machine's devices are patched
(pdlaunch/memory/host_devices.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.rules import host_memory
from pdlaunch.config.validate import validate_deployment
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.backends import slurm_node
from pdlaunch.launcher.backends.slurm import DEPLOYMENT_ENV
from pdlaunch.memory import host_devices
from tests.launcher.free_ports import free_on_both

GIB = 1 << 30
GPU_FIELDS = ("device", "model.enable_sleep_mode", "model.enable_cumem_allocator", "instances", "instances[0]",
              "instances[1]")


def sees(monkeypatch: pytest.MonkeyPatch, gpus: int, gib: float = 80.0) -> None:
    """This machine, with `gpus` CUDA devices of `gib` GiB (cumem and sleep mode work where CUDA does)."""
    monkeypatch.setattr(host_devices, "cuda_available", lambda: gpus > 0)
    monkeypatch.setattr(host_devices, "device_count", lambda: gpus)
    monkeypatch.setattr(host_devices, "device_total_bytes", lambda index=0: int(gib * GIB))
    monkeypatch.setattr(host_devices, "is_cumem_allocator_available", lambda: gpus > 0)
    monkeypatch.setattr(host_devices, "is_sleep_mode_available", lambda: gpus > 0)


def batch_cfg(tmp_path: Path, device: str, **model: Any) -> DeploymentConfig:
    """What config/backend.py makes of a 1P1D config inside a two-node allocation: every port fixed."""
    base = free_on_both(60, "slurm batch checks test")
    return DeploymentConfig.model_validate({
        "launcher": {"backend": "slurm"}, "device": device, "log_dir": str(tmp_path / "logs"),
        "model": {"path": "tiny", **model}, "security": {"deployment_secret": "slurm-batch-checks-secret-0123"},
        "proxy": {"host": "0.0.0.0", "port": base},
        "parallel": {"nodes": [{"address": "127.0.0.1"}, {"address": "127.0.0.2"}], "master_port": base + 1},
        "kv_transfer": {"side_channel_host": "0.0.0.0", "side_channel_port": base + 10},
        "instances": [{"role": "prefill", "node": 0, "base_port": base + 30},
                      {"role": "decode", "node": 1, "base_port": base + 40}],
    })


def on_node(cfg: DeploymentConfig, node: int) -> DeploymentConfig:
    """Node `node`'s step's config (slurm_node.node_config), or the PdlaunchError its checks raise."""
    return slurm_node.node_config(cfg.model_dump_json(), node)


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_the_batch_process_on_a_login_node_leaves_device_and_sleep_mode_to_the_nodes(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, device: str) -> None:
    sees(monkeypatch, 0)
    problems, resolved = validate_deployment(batch_cfg(tmp_path, device, enable_sleep_mode=True), target=None)
    assert problems == []
    assert resolved.device == device  # auto is not this machine's cpu: each node resolves it
    assert resolved.model.dtype == ("auto" if device == "auto" else "bfloat16")
    assert not resolved.model.enable_cumem_allocator  # each node turns it on for sleep mode, if it has CUDA

    sees(monkeypatch, 8)  # the nodes
    for node in (0, 1):
        served = on_node(resolved, node)
        assert served.device == "cuda" and served.model.dtype == "bfloat16"
        assert served.model.enable_sleep_mode and served.model.enable_cumem_allocator


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_a_node_without_gpus_still_refuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, device: str) -> None:
    sees(monkeypatch, 0)
    _, resolved = validate_deployment(batch_cfg(tmp_path, device, enable_sleep_mode=True), target=None)
    with pytest.raises(PdlaunchError) as err:  # the node is as GPU-less as the login node
        on_node(resolved, 1)
    message = err.value.message
    assert "model.enable_sleep_mode: sleep mode is not supported on current platform" in message, message
    assert "model.enable_cumem_allocator" not in message, message  # the user gave no --enable-cumem-allocator
    if device == "cuda":  # the step's GPU count, and the allocation that would give it one
        assert "parallel.nodes[1]: node 1 (127.0.0.2) needs 1 GPU(s)" in message, message
        assert "its srun step sees 0" in message and "--gres=gpu:1" in message, message
    assert err.value.hint == "checked on node 1 (127.0.0.2)"


def test_gpu_memory_is_checked_on_the_nodes_not_the_batch_host(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    """The batch script's machine (or a login node) with a small GPU: its memory is not the nodes'."""
    sees(monkeypatch, 1, gib=0.001)
    problems, resolved = validate_deployment(batch_cfg(tmp_path, "cuda"), target=None)
    assert [field for field, _ in problems if field in GPU_FIELDS] == []

    sees(monkeypatch, 8, gib=0.001)  # nodes whose GPUs are too small: each step says so
    with pytest.raises(PdlaunchError) as err:
        on_node(resolved, 0)
    assert "instances[0]: prefill needs" in err.value.message and "but the budget is" in err.value.message
    sees(monkeypatch, 8)
    assert on_node(resolved, 0).device == "cuda"


def test_ram_is_checked_on_the_nodes_and_config_only_rules_in_the_batch_process(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sees(monkeypatch, 0)
    monkeypatch.setattr(host_memory, "available_memory_bytes", lambda: 1 << 20)  # 1 MiB free, on every machine
    problems, resolved = validate_deployment(batch_cfg(tmp_path, "cpu"), target=None)
    assert problems == []
    with pytest.raises(PdlaunchError, match="instances: the 1 CPU rank.s. on this machine need about"):
        on_node(resolved, 1)

    # What the config alone says stays the batch process's: sleep mode on --device cpu
    problems, _ = validate_deployment(batch_cfg(tmp_path, "cpu", enable_sleep_mode=True), target=None)
    assert [field for field, _ in problems] == ["model.enable_sleep_mode"]


def test_the_step_says_its_device_or_one_error_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    sees(monkeypatch, 0)
    _, resolved = validate_deployment(batch_cfg(tmp_path, "auto", enable_sleep_mode=True), target=None)
    monkeypatch.setenv(DEPLOYMENT_ENV, resolved.model_dump_json())
    served: list[DeploymentConfig] = []
    monkeypatch.setattr(slurm_node, "run_serve", lambda cfg: served.append(cfg) or 0)

    sees(monkeypatch, 8)
    assert slurm_node.main(["--node-rank", "1"]) == 0
    assert [cfg.device for cfg in served] == ["cuda"]
    assert capsys.readouterr().out.splitlines() == ["node 1: device cuda"]

    sees(monkeypatch, 0)
    assert slurm_node.main(["--node-rank", "1"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.splitlines()) == 1, out
    assert out.err.startswith("error: node 1: model.enable_sleep_mode: sleep mode is not supported"), out.err
    assert "Traceback" not in out.err


def test_the_nodes_addresses_are_bound_on_the_nodes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """proxy.host set to node 0's own address, which a login node does not have: node 0's step binds it."""
    sees(monkeypatch, 0)
    cfg = batch_cfg(tmp_path, "cpu")
    cfg.proxy.host = "192.0.2.1"  # TEST-NET-1: an address of no machine here
    problems, resolved = validate_deployment(cfg, target=None)
    assert problems == []
    with pytest.raises(PdlaunchError, match=r"proxy.host: 192.0.2.1 is not an address of this machine"):
        on_node(resolved, 0)
    assert on_node(resolved, 1).proxy.host == "192.0.2.1"  # node 1 runs no proxy


@pytest.mark.parametrize("raw", ['{"device": "tpu"', '{"device": "tpu"}', '[]'])
def test_a_corrupt_deployment_in_the_steps_environment_is_one_error_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], raw: str) -> None:
    """Cut short, a value out of range, not an object: the step says so on one line and exits 1, no traceback."""
    monkeypatch.setenv(DEPLOYMENT_ENV, raw)
    monkeypatch.setattr(slurm_node, "run_serve", lambda cfg: pytest.fail("a corrupt deployment must not serve"))
    assert slurm_node.main(["--node-rank", "1"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.splitlines()) == 1, out
    assert out.err.startswith(f"error: node 1: {DEPLOYMENT_ENV}: "), out.err
    assert "pdlaunch serve --backend slurm" in out.err and "Traceback" not in out.err


def test_a_corrupt_deployment_is_named_without_its_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The step's output is a log file the batch process repeats: the value's secret must not appear in it."""
    raw = batch_cfg(tmp_path, "cpu").model_dump_json()
    secret = "slurm-batch-checks-secret-0123"
    for corrupt in (raw[:raw.index(secret) + 20], raw.replace(secret, "short")):
        monkeypatch.setenv(DEPLOYMENT_ENV, corrupt)
        assert slurm_node.main(["--node-rank", "0"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: node 0: {DEPLOYMENT_ENV}: does not hold a valid deployment"), err
        assert "slurm-batch" not in err and "short" not in err, err


@pytest.mark.parametrize("rank", ["-1", "2"])
def test_a_node_rank_outside_the_allocation_is_one_error_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str], rank: str) -> None:
    monkeypatch.setenv(DEPLOYMENT_ENV, batch_cfg(tmp_path, "cpu").model_dump_json())
    monkeypatch.setattr(slurm_node, "run_serve", lambda cfg: pytest.fail("no node of the deployment to serve"))
    assert slurm_node.main(["--node-rank", rank]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: node {rank}: node rank {rank} is not among the deployment's 2 nodes"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
