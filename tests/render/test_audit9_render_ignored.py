"""Settings of where the deployment's processes run, which `pdlaunch render kubernetes` took and dropped without a
word: Kubernetes starts the pods and places them, so `--backend ray` (and its --ray-address), `--backend slurm`,
`--node-rank` and `parallel.nodes` (with each group's `node`) are not in the manifests. A user who passed them
expected the pods to use them; render now names each one it leaves out, as a warning (the manifests are valid)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.config.cli_helpers import invoke
from tests.render.test_render_bad_inputs import render


def warnings_of(output: str) -> list[str]:
    return [" ".join(line.split()) for line in output.splitlines() if line.startswith("warning:")]


@pytest.mark.parametrize(("args", "field", "says"), [
    (["--backend", "ray", "--ray-address", "10.0.0.5:6379"], "--backend",
     "ray has no effect on the manifests: Kubernetes starts and places the pods"),
    (["--backend", "slurm"], "--backend", "slurm has no effect on the manifests"),
    (["--node-rank", "1"], "--node-rank", "has no effect on the manifests: every pod runs its own instance"),
])
def test_a_flag_of_where_processes_run_is_named_as_left_out(tmp_path: Path, args: list[str], field: str,
                                                            says: str) -> None:
    result = render(tmp_path / "out", *args)
    assert result.exit_code == 0, result.output
    found = warnings_of(result.output)
    assert len(found) == 1 and found[0].startswith(f"warning: {field}: {says}"), result.output
    assert (tmp_path / "out").is_dir()


def test_the_nodes_of_a_config_are_named_as_left_out(tmp_path: Path) -> None:
    config = tmp_path / "two-nodes.yaml"
    config.write_text("parallel: {nodes: [{address: 10.0.0.1}, {address: 10.0.0.2}]}\n"
                      "instances: [{role: prefill, node: 0}, {role: decode, node: 1}]\n")
    result = render(tmp_path / "out", str(config))
    assert result.exit_code == 0, result.output
    assert warnings_of(result.output) == [
        "warning: parallel.nodes: 2 nodes have no effect on the manifests: Kubernetes places the pods (each "
        "instance group's `node` too); leave parallel.nodes out of a config you render, or pick nodes with a "
        "nodeSelector added to the manifests"], result.output


def test_a_plain_render_warns_of_nothing(tmp_path: Path) -> None:
    result = render(tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert warnings_of(result.output) == [], result.output


def test_the_devices_of_a_group_are_named_as_left_out(tmp_path: Path) -> None:
    # examples/gpu-1p1d-single.yaml shares GPU 0 at gpu_memory_utilization 0.45: its pods get a GPU each, and the
    # instances would use under half of it, without a word
    config = tmp_path / "one-gpu.yaml"
    config.write_text("device: cuda\nmodel: {path: tiny}\ncache: {gpu_memory_utilization: 0.45}\n"
                      "instances: [{role: prefill, devices: [0]}, {role: decode, devices: [0]}, "
                      "{role: decode, count: 0, devices: [1]}]\n")
    result = invoke(["render", "kubernetes", str(config), "--out", str(tmp_path / "out"), "--image", "pd:1"])
    assert result.exit_code == 0, result.output
    found = warnings_of(result.output)
    assert [w.split(":")[1] for w in found] == [" instances[0].devices", " instances[1].devices"], result.output
    assert found[0].startswith("warning: instances[0].devices: [0] has no effect on the manifests: Kubernetes gives "
                               "each pod GPUs of its own (nvidia.com/gpu), numbered from 0 in the pod; leave it "
                               "out of a config you render"), found
    assert "cache.gpu_memory_utilization 0.45" in found[0], found
    cpu = tmp_path / "cpu.yaml"
    cpu.write_text("device: cpu\nmodel: {path: tiny}\ninstances: [{role: prefill, devices: [0]}, {role: decode}]\n")
    result = render(tmp_path / "out-cpu", str(cpu))
    assert result.exit_code == 0, result.output
    assert warnings_of(result.output) == ["warning: instances[0].devices: [0] has no effect on the manifests: CPU "
                                          "pods (device cpu) use no GPU; leave it out of a config you render"]


def test_the_addresses_a_config_binds_are_named_as_left_out(tmp_path: Path) -> None:
    # the pods bind every interface and advertise their pod's address, whatever the config says
    config = tmp_path / "hosts.yaml"
    config.write_text("kv_transfer: {side_channel_host: 10.0.0.5}\nparallel: {master_addr: 10.0.0.6}\n")
    result = render(tmp_path / "out", str(config), "--host", "10.0.0.7")
    assert result.exit_code == 0, result.output
    assert [w.split(": ")[1] for w in warnings_of(result.output)] == [
        "--host", "kv_transfer.side_channel_host", "parallel.master_addr"], result.output
    assert "warning: --host: 10.0.0.7 has no effect on the manifests: the proxy's pod binds every interface" \
        in warnings_of(result.output)[0]
    assert render(tmp_path / "out2", "--host", "0.0.0.0").output.count("warning:") == 0


def test_a_side_channel_host_where_no_side_channel_opens_is_named_as_ignored_for_what_it_is(tmp_path: Path) -> None:
    # The storage connector moves KV through files, and colocated instances move none: neither opens a side channel,
    # but the warning said each pod binds "its KV side channel" on every interface. (Render refuses prefill and decode
    # pods over storage, whose files no other pod sees: kubernetes.storage_connector_problems.)
    said: dict[str, list[str]] = {}
    for connector in ("storage", "nixl"):
        config = tmp_path / f"{connector}.yaml"
        config.write_text(f"colocated: true\nkv_transfer: {{connector: {connector}, side_channel_host: 10.0.0.5}}\n")
        result = render(tmp_path / connector, str(config))
        assert result.exit_code == 0, result.output
        said[connector] = warnings_of(result.output)
        assert "its KV side channel" not in result.output, result.output
    assert said["storage"] == [
        "warning: kv_transfer.side_channel_host: 10.0.0.5 has no effect with the storage connector: it moves KV "
        "through files in kv_transfer.storage_path and opens no side channel, so no pod binds or advertises this "
        "address; leave it out of a config you render"], said
    assert said["nixl"] == [
        "warning: kv_transfer.side_channel_host: 10.0.0.5 has no effect: every instance is colocated, so no KV moves "
        "between instances and no pod opens a KV side channel; leave it out of a config you render"], said
    config = tmp_path / "pd.yaml"  # prefill and decode pods over nixl do open one, on every interface
    config.write_text("kv_transfer: {side_channel_host: 10.0.0.5}\n")
    assert warnings_of(render(tmp_path / "pd", str(config)).output) == [
        "warning: kv_transfer.side_channel_host: 10.0.0.5 has no effect on the manifests: each pod binds its KV side "
        "channel on every interface and advertises its pod's address (status.podIP); leave it out of a config you "
        "render"]
