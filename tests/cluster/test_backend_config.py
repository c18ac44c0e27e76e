"""What `--backend slurm` reads from the allocation (config/backend.py), with a stand-in `scontrol`:
fast checks of node order, addresses, kept devices, and each thing that can be missing."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from pdlaunch.config.backend import with_backend_nodes
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.topology_config import NodeConfig
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.backends.slurm import cpus_per_node, srun_argv
from tests.config.cli_helpers import check, check_json, invoke
from tests.helpers.ports import free_port

ALLOCATION = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu[07-08]"}


@pytest.fixture
def scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `scontrol` on PATH that knows gpu07 (NodeAddr 127.0.0.1) and gpu08 (127.0.0.2); it logs its calls."""
    calls = tmp_path / "calls"
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text(f"""#!/bin/sh
echo "$@" >> {calls}
case "$1 $2" in
  "show hostnames") case "$3" in "gpu[07-08]") printf 'gpu07\\ngpu08\\n' ;; gpu07) echo gpu07 ;; *) exit 1 ;; esac ;;
  "show node") case "$4" in gpu07) a=127.0.0.1 ;; gpu08) a=127.0.0.2 ;; *) exit 1 ;; esac
               echo "NodeName=$4 Arch=x86_64 NodeAddr=$a NodeHostName=$4 State=IDLE" ;;
  *) exit 2 ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    srun = script.parent / "srun"  # found on PATH; never run here
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
    return calls


def test_nodes_come_from_the_allocation_in_order(scontrol: Path) -> None:
    cfg = DeploymentConfig.model_validate({"launcher": {"backend": "slurm"},
                                           "parallel": {"nodes": [{"address": "10.9.9.9", "devices": [0, 1]}]}})
    out = with_backend_nodes(cfg, ALLOCATION)
    assert out.parallel.nodes == [NodeConfig(address="127.0.0.1", devices=[0, 1]), NodeConfig(address="127.0.0.2")]
    assert out.kv_transfer.side_channel_host == "0.0.0.0"
    assert out.security.deployment_secret and len(out.security.deployment_secret) >= 16
    assert "show hostnames gpu[07-08]" in scontrol.read_text()
    assert with_backend_nodes(cfg, {**ALLOCATION, "PDLAUNCH_DEPLOYMENT_SECRET": "x" * 20}).security.deployment_secret \
        is None  # the steps inherit the environment's secret
    local = DeploymentConfig()
    assert with_backend_nodes(local, {}) is local


def test_the_storage_connectors_side_channel_host_is_left_as_set(scontrol: Path) -> None:
    """storage opens no side channel: the allocation's nodes do not rewrite a field it never reads, which would
    then be warned about as set by the user (config/rules/no_effect.py)."""
    cfg = DeploymentConfig.model_validate({"launcher": {"backend": "slurm"}, "kv_transfer": {"connector": "storage"}})
    out = with_backend_nodes(cfg, ALLOCATION)
    assert out.kv_transfer.side_channel_host == "127.0.0.1"
    assert "side_channel_host" not in out.kv_transfer.model_fields_set
    mooncake = cfg.model_copy(update={"kv_transfer": cfg.kv_transfer.model_copy(update={"connector": "mooncake"})})
    assert with_backend_nodes(mooncake, ALLOCATION).kv_transfer.side_channel_host == "0.0.0.0"


def test_what_is_missing_is_named(scontrol: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slurm = DeploymentConfig.model_validate({"launcher": {"backend": "slurm"}})
    with pytest.raises(PdlaunchError, match="inside a SLURM allocation") as outside:
        with_backend_nodes(slurm, {})
    assert outside.value.field == "launcher.backend"
    three = DeploymentConfig.model_validate({"launcher": {"backend": "slurm"}, "parallel": {"nodes": [
        {"address": "a"}, {"address": "b"}, {"address": "c"}]}})
    with pytest.raises(PdlaunchError, match="lists 3 nodes but the SLURM allocation has 2") as short:
        with_backend_nodes(three, ALLOCATION)
    assert short.value.field == "parallel.nodes"
    with pytest.raises(PdlaunchError, match="scontrol show hostnames"):
        with_backend_nodes(slurm, {**ALLOCATION, "SLURM_JOB_NODELIST": "other[1-2]"})
    (scontrol.parent / "bin" / "srun").unlink()
    monkeypatch.setenv("PATH", str(scontrol.parent / "bin"))
    with pytest.raises(PdlaunchError, match="needs `srun` on PATH"):
        with_backend_nodes(slurm, ALLOCATION)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(PdlaunchError, match="needs `scontrol` on PATH"):
        with_backend_nodes(slurm, ALLOCATION)


def test_each_step_gets_its_nodes_cpus() -> None:
    assert cpus_per_node("72(x2),36", 3) == [72, 72, 36]
    assert cpus_per_node("8", 2) == [8, None]
    assert cpus_per_node(None, 2) == [None, None]
    assert cpus_per_node("weird", 1) == [None]
    argv = srun_argv(1, 36)
    assert argv[:4] == ["srun", "--nodes=1", "--ntasks=1", "--relative=1"]
    assert "--cpus-per-task=36" in argv and argv[-2:] == ["--node-rank", "1"]
    assert not any(a.startswith("--cpus-per-task") for a in srun_argv(0, None))


def test_check_config_inside_an_allocation(scontrol: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ALLOCATION.items():
        monkeypatch.setenv(key, value)
    example = Path(__file__).resolve().parents[2] / "examples" / "slurm" / "pd-1p1d.yaml"
    report = check_json([str(example), "--model", "tiny", "--device", "cpu", "--port", str(free_port())])
    assert report["valid"] is True, json.dumps(report["problems"])
    assert [n["address"] for n in report["config"]["parallel"]["nodes"]] == ["127.0.0.1", "127.0.0.2"]
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu07")
    result = check([str(example), "--model", "tiny", "--device", "cpu"])
    assert result.exit_code == 1 and "instances[1].node" in result.output  # decode on a node not allocated


def test_smoke_refuses_the_slurm_backend(scontrol: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ALLOCATION.items():
        monkeypatch.setenv(key, value)
    result = invoke(["smoke", "--model", "tiny", "--device", "cpu", "--backend", "slurm", "--port",
                     str(free_port())])
    assert result.exit_code == 1 and "smoke runs its deployment on this machine" in result.output


def test_a_group_on_a_node_past_the_allocation_says_how_many_nodes_to_allocate(
        scontrol: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The nodes under --backend slurm are the allocation's, not a parallel.nodes the user wrote: a one-node
    `salloc`/`sbatch` for the two-node example said only `use an index into parallel.nodes`, a list it has none of."""
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu07")
    example = Path(__file__).resolve().parents[2] / "examples" / "slurm" / "pd-1p1d.yaml"
    result = check([str(example), "--model", "tiny", "--device", "cpu", "--port", str(free_port())])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "instances[1].node: node 1 is not in the SLURM allocation, which has 1 node" in text, text
    assert "allocate 2 nodes (sbatch/salloc --nodes 2)" in text, text
    assert "or set node: 0" in text and "parallel.nodes" not in text, text
