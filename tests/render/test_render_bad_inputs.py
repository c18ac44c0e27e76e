"""Bad input to `pdlaunch render kubernetes` and to the cluster backends' settings (check-config), the way a
user types it: each ends in exit 1 and a message naming the flag or field, never a traceback, a hang, or
manifests Kubernetes would refuse."""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import Result

from tests.config.cli_helpers import check, invoke

LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def render(out: Path, *args: str, image: str = "pdlaunch:test") -> Result:
    return invoke(["render", "kubernetes", "--model", "tiny", "--device", "cpu", *args, "--out", str(out),
                   "--image", image])


def refused(result: Result, flag: str) -> None:
    assert result.exit_code == 1, result.output
    assert f"error: {flag}:" in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", ["abc-", "Bad_Name", "a.b", "", "1abc", "a" * 41])
def test_a_name_kubernetes_refuses_as_a_name_or_label_value_is_refused(tmp_path: Path, name: str) -> None:
    result = render(tmp_path / "out", "--name", name)
    refused(result, "--name")
    assert "at most 40 characters" in result.output and not (tmp_path / "out").exists()


def test_the_longest_name_renders_names_and_labels_kubernetes_takes(tmp_path: Path) -> None:
    assert render(tmp_path / "out", "--name", "a" * 39 + "b").exit_code == 0
    for path in (tmp_path / "out").glob("*.yaml"):
        manifest: dict[str, Any] = yaml.safe_load(path.read_text())
        name = manifest["metadata"]["name"]
        assert DNS_1123_LABEL.fullmatch(name), name
        if manifest["kind"] == "LeaderWorkerSet":  # its StatefulSets' pods get `<name>-<hash>` labels
            assert len(name) <= 52, name
        for value in manifest["metadata"]["labels"].values():
            assert LABEL_VALUE.fullmatch(value) and len(value) <= 63, value


@pytest.mark.parametrize("namespace", ["Foo_Bar", "", "a.b", "x" * 64, "-ns"])
def test_a_namespace_kubernetes_refuses_is_refused(tmp_path: Path, namespace: str) -> None:
    refused(render(tmp_path / "out", "--namespace", namespace), "--namespace")


@pytest.mark.parametrize("image", ["", "Bad Image:tag", "UPPER:1", "pdlaunch:", "x:tag\n", "a//b", "pd@sha256:12",
                                   "ghcr.io/Org/pd:1"])
def test_an_image_reference_the_kubelet_cannot_parse_is_refused(tmp_path: Path, image: str) -> None:
    refused(render(tmp_path / "out", image=image), "--image")


@pytest.mark.parametrize("image", ["pdlaunch", "localhost:5000/team/pd:1.0", "GHCR.io/org/pd_x:v1.2-rc",
                                   "registry.example.com/a/b@sha256:" + "a" * 64])
def test_image_references_the_kubelet_parses_render(tmp_path: Path, image: str) -> None:
    assert render(tmp_path / "out", image=image).exit_code == 0


def test_an_out_that_is_a_file_is_named_not_a_traceback(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    refused(render(file), "--out")
    refused(render(file / "sub"), "--out")


def test_an_out_holding_an_earlier_render_is_refused_not_mixed_in(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert render(out, "--name", "first").exit_code == 0
    assert render(out, "--name", "first").exit_code == 0  # the same objects again: overwritten
    result = render(out, "--name", "second")
    refused(result, "--out")
    assert "00-secret-first-deployment.yaml" in result.output
    assert not list(out.glob("*second*"))


def test_ports_outside_the_port_range_are_refused(tmp_path: Path) -> None:
    refused(render(tmp_path / "out", "--port", "0"), "--port")
    refused(render(tmp_path / "out", "--port", "70000"), "--port")
    config = tmp_path / "deploy.yaml"
    config.write_text("kv_transfer: {side_channel_port: 65530}\nparallel: {tp: 8}\n")
    result = render(tmp_path / "out", str(config))
    refused(result, "kv_transfer.side_channel_port")
    assert "outside 1..65535" in result.output


def test_a_port_the_leader_pod_binds_twice_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text("instances: [{role: prefill, base_port: 5600}, {role: decode}]\n")
    result = render(tmp_path / "out", str(config))
    refused(result, "instances[0].base_port")
    assert "collides with kv_transfer.side_channel_port" in result.output


def test_more_ranks_than_any_deployment_is_refused_before_rendering(tmp_path: Path) -> None:
    result = render(tmp_path / "out", "--prefill", "20000")
    refused(result, "--prefill")
    assert "more than 16384" in result.output and not (tmp_path / "out").exists()


def test_error_lines_show_what_the_user_typed_verbatim(tmp_path: Path) -> None:
    result = render(tmp_path / "out", "--name", "a[b]x")  # not taken as console markup
    refused(result, "--name")
    assert "'a[b]x'" in result.output


@pytest.mark.parametrize(("address", "text"), [("127.0.0.1:99999", "outside 1..65535"),
                                               ("127.0.0.1:0", "outside 1..65535"),
                                               ("http://127.0.0.1:6379", "scheme"),
                                               ("head node:6379", "not an IP address or host name"),
                                               ("10.0.0.999:6379", "not a valid IPv4 address")])
def test_a_malformed_ray_address_is_named_before_any_connect(address: str, text: str) -> None:
    result = check(["--model", "tiny", "--device", "cpu", "--backend", "ray", "--ray-address", address])
    refused(result, "--ray-address")
    assert text in result.output and "no Ray cluster answers" not in result.output


def test_a_slurm_node_address_other_nodes_cannot_reach_is_named(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("""#!/bin/sh
case "$1 $2" in
  "show hostnames") printf 'gpu07\\ngpu08\\n' ;;
  "show node") echo "NodeName=$4 NodeAddr=gpu!$4 State=IDLE" ;;
esac
""")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755 | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    result = check(["--model", "tiny", "--device", "cpu", "--backend", "slurm"])
    refused(result, "--backend")
    assert "'gpu!gpu07'" in result.output and "NodeAddr" in result.output


def test_a_short_deployment_secret_in_the_environment_is_named_not_blamed_on_the_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDLAUNCH_DEPLOYMENT_SECRET", "abc")
    result = render(tmp_path / "out", "--name", "pd-llama")
    refused(result, "PDLAUNCH_DEPLOYMENT_SECRET")
    assert "3 characters, fewer than 16" in result.output and "--name" not in result.output
    assert not (tmp_path / "out").exists()


def test_the_deployment_secret_from_the_environment_reaches_the_secret(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDLAUNCH_DEPLOYMENT_SECRET", "s" * 16)
    assert render(tmp_path / "out").exit_code == 0
    secret = yaml.safe_load((tmp_path / "out" / "00-secret-pdlaunch-deployment.yaml").read_text())
    assert secret["stringData"]["deployment-secret"] == "s" * 16
