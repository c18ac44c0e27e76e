"""The rendered proxy is given each instance's engine_id but for its leader pod's UID (`--engine-id
NAME=<kv_transfer.engine_id>-<leader pod>-*`): the engine_id that pod's container gets, whatever UID Kubernetes
gives it (a recreated pod has a new one), is the instance's; one of another instance's pod, or another
deployment's base, is another server's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from pdlaunch.cli import app
from pdlaunch.config.deployment_config import InstanceSpec
from pdlaunch.config.engine_ids import is_engine_of
from pdlaunch.proxy.__main__ import parse_args

UIDS = ("0f6c9e58-2b1d-4c3e-9a57-5d0c1e7b8a21", "7e21d4a0-93c5-4b6f-8d1e-2c4a9b0f3e57")  # as recreated


def _render(tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    out = tmp_path / "manifests"
    result = CliRunner().invoke(app, ["render", "kubernetes", "--model", "tiny", "--device", "cpu", *args,
                                      "--out", str(out), "--image", "pdlaunch:test"])
    assert result.exit_code == 0, result.output
    return [yaml.safe_load(path.read_text()) for path in sorted(out.glob("*.yaml"))]


def _leader_engine_ids(lws: dict[str, Any], k: int, uid: str) -> str:
    """The engine_id leader pod k of `lws` names in its /health, its args expanded as the kubelet does."""
    container = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    env = {"POD_IP": "10.0.0.9", "POD_NAME": f"{lws['metadata']['name']}-{k}", "POD_UID": uid}
    spec_json = container["args"][container["args"].index("--instance") + 1]
    return InstanceSpec.model_validate_json(re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], spec_json)).engine_id


def test_the_proxy_expects_each_leader_pods_engine_id_whatever_its_uid(tmp_path: Path) -> None:
    manifests = _render(tmp_path, "--prefill", "2", "--decode", "1", "--kv-transfer-config",
                        '{"engine_id": "dep"}', "--name", "pd")
    proxy = next(m for m in manifests if m["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = proxy["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--engine-id"] == [
        "prefill-0-0=dep-pd-prefill-0-0-*", "prefill-0-1=dep-pd-prefill-0-1-*", "decode-1-0=dep-pd-decode-1-0-*"]
    expected = parse_args(args).engine_ids
    prefill, decode = (m for m in manifests if m["kind"] == "LeaderWorkerSet")
    for lws, name, k in ((prefill, "prefill-0-0", 0), (prefill, "prefill-0-1", 1), (decode, "decode-1-0", 0)):
        for uid in UIDS:
            assert is_engine_of(_leader_engine_ids(lws, k, uid), expected[name]), (name, uid)
    assert not is_engine_of(_leader_engine_ids(prefill, 1, UIDS[0]), expected["prefill-0-0"])
    assert not is_engine_of(_leader_engine_ids(prefill, 0, UIDS[0]), expected["decode-1-0"])


def test_without_an_engine_id_the_base_follows_the_deployment_secret(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With no kv_transfer.engine_id the base comes from the deployment secret, the namespace and --name: a
    re-render with the same secret keeps it (the running proxy accepts the new pods, which take its signed
    params), a new secret or another deployment gets another (the old proxy, whose params the new pods would
    refuse, does not take them)."""
    monkeypatch.setenv("PDLAUNCH_DEPLOYMENT_SECRET", "s" * 64)

    def base(where: Path, *args: str) -> tuple[str, str]:
        manifests = _render(where, "--colocated", *args)
        proxy = next(m for m in manifests if m["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
        (lws,) = (m for m in manifests if m["kind"] == "LeaderWorkerSet")
        return parse_args(proxy["args"]).engine_ids["colocated-0-0"], _leader_engine_ids(lws, 0, UIDS[1])

    planned, pod = base(tmp_path / "a")
    assert is_engine_of(pod, planned)
    again, pod_again = base(tmp_path / "b")
    assert again == planned and is_engine_of(pod_again, planned)
    assert "s" * 16 not in planned  # the secret is not readable from /health
    for where, args in (("ns", ("--namespace", "other")), ("name", ("--name", "other"))):
        other, _ = base(tmp_path / where, *args)
        assert other.split("-")[0] != planned.split("-")[0], where
    monkeypatch.setenv("PDLAUNCH_DEPLOYMENT_SECRET", "t" * 64)
    rekeyed, pod_rekeyed = base(tmp_path / "c")
    assert not is_engine_of(pod_rekeyed, planned)
    assert is_engine_of(pod_rekeyed, rekeyed)


def test_two_groups_of_one_role_are_distinct_objects_and_instances(tmp_path: Path) -> None:
    """Two decode groups (say, different TP) render two LeaderWorkerSets, and the proxy gets each of their
    instances under a name and an engine_id of its own: the group is in the LeaderWorkerSet's and pod's name."""
    config = tmp_path / "two-decode-groups.yaml"
    config.write_text("kv_transfer: {engine_id: dep}\ninstances:\n  - {role: prefill}\n  - {role: decode}\n"
                      "  - {role: decode, count: 2, tp: 2}\n")
    manifests = _render(tmp_path, str(config), "--name", "pd")
    names = [(m["kind"], m["metadata"]["name"]) for m in manifests]
    assert len(set(names)) == len(names)
    groups = [m for m in manifests if m["kind"] == "LeaderWorkerSet"]
    assert [m["metadata"]["name"] for m in groups] == ["pd-prefill-0", "pd-decode-1", "pd-decode-2"]
    proxy = next(m for m in manifests if m["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = parse_args(proxy["args"])
    assert [d.split("=", 1)[0] for d in args.decode] == ["decode-1-0", "decode-2-0", "decode-2-1"]
    assert args.engine_ids == {"prefill-0-0": "dep-pd-prefill-0-0-*", "decode-1-0": "dep-pd-decode-1-0-*",
                               "decode-2-0": "dep-pd-decode-2-0-*", "decode-2-1": "dep-pd-decode-2-1-*"}
    for lws, k, name in ((groups[1], 0, "decode-1-0"), (groups[2], 0, "decode-2-0"), (groups[2], 1, "decode-2-1")):
        assert is_engine_of(_leader_engine_ids(lws, k, UIDS[0]), args.engine_ids[name])
        others = [planned for other, planned in args.engine_ids.items() if other != name]
        assert not any(is_engine_of(_leader_engine_ids(lws, k, UIDS[0]), planned) for planned in others)
