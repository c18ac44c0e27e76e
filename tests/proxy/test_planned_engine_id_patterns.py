"""A planned engine_id with a part only the instance's start fills in (`*`): a Kubernetes pod's UID
("<base>-<leader pod>-*"), another node's launcher's own base ("*-<name>"). The proxy takes an answer naming
the same id with any such part as the instance's (a pod recreated with a new UID is still it), and one naming
another base, pod, name or role as another server's, as it does an exact planned id's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.engine_ids import is_engine_of, is_engine_of_named
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.proxy.__main__ import parse_args
from pdlaunch.proxy.instances import Instance, InstancePool, foreign_answer

POD = "dep-pd-prefill-0-0-*"  # kv_transfer.engine_id "dep", leader pod pd-prefill-0-0
UID, NEW_UID = "0f6c9e58-2b1d-4c3e-9a57-5d0c1e7b8a21", "7e21d4a0-93c5-4b6f-8d1e-2c4a9b0f3e57"


@pytest.mark.parametrize("engine_id", [f"dep-pd-prefill-0-0-{UID}", f"dep-pd-prefill-0-0-{NEW_UID}",
                                       f"dep-pd-prefill-0-0-{UID}-r2"])
def test_a_pod_of_the_instance_with_any_uid_is_it(engine_id: str) -> None:
    assert is_engine_of(engine_id, POD)


@pytest.mark.parametrize("engine_id", [f"other-pd-prefill-0-0-{UID}", f"dep-pd-prefill-0-1-{UID}",
                                       f"dep-pd-prefill-0-10-{UID}", f"dep-pd-decode-1-0-{UID}",
                                       "dep-pd-prefill-0-0-", "dep-pd-prefill-0-0", f"x-dep-pd-prefill-0-0-{UID}",
                                       None, 7])
def test_another_base_pod_or_no_uid_is_not(engine_id: object) -> None:
    assert not is_engine_of(engine_id, POD)


def test_another_nodes_instance_is_known_by_its_name_whatever_that_nodes_base() -> None:
    for engine_id in ("9b2c0e41d7aa4f0c8e35f1d2a6b7c8d9-prefill-1", "ours-prefill-1", "ours-prefill-1-r3"):
        assert is_engine_of(engine_id, "*-prefill-1") and is_engine_of_named(engine_id, "prefill-1", None)
    for engine_id in ("prefill-1", "ours-prefill-10", "ours-prefill-0", "ours-prefill-1-rx"):
        assert not is_engine_of(engine_id, "*-prefill-1") and not is_engine_of_named(engine_id, "prefill-1", None)


def test_an_exact_planned_id_is_still_exact() -> None:
    assert is_engine_of("dep-prefill-0", "dep-prefill-0") and is_engine_of("dep-prefill-0-r1", "dep-prefill-0")
    assert not is_engine_of("dep-prefill-0-x", "dep-prefill-0") and not is_engine_of("dep-prefill-00", "dep-prefill-0")


def test_the_mismatch_says_what_the_star_stands_for() -> None:
    instance = Instance(role="prefill", url="http://p:1", name="prefill-0-0", planned_engine_id=POD)
    assert foreign_answer(instance, {"role": "prefill", "engine_id": f"dep-pd-prefill-0-0-{UID}"}) == ""
    said = foreign_answer(instance, {"role": "prefill", "engine_id": f"old-pd-prefill-0-0-{UID}"})
    assert f"engine_id 'old-pd-prefill-0-0-{UID}'" in said and f"engine_id {POD!r} (*: any text" in said, said
    assert "role 'decode'" in foreign_answer(instance, {"role": "decode", "engine_id": f"dep-pd-prefill-0-0-{UID}"})


def _check(instance: Instance, body: dict[str, object]) -> None:
    """One health probe of `instance`, whose /health answers 200 with `body`."""
    async def probe() -> None:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
        async with httpx.AsyncClient(transport=transport) as client:
            await InstancePool([instance]).check_all(client)

    asyncio.run(probe())


def test_the_proxy_takes_a_recreated_pod_and_refuses_another_instances() -> None:
    args = parse_args(["--prefill", "prefill-0-0=http://pd-prefill-0-0.pd-prefill-0:8100", "--engine-id",
                       f"prefill-0-0={POD}", "--decode", "http://d:2"])
    instance = Instance(role="prefill", url="http://pd-prefill-0-0.pd-prefill-0:8100", name="prefill-0-0",
                        planned_engine_id=args.engine_ids["prefill-0-0"])
    _check(instance, {"status": "ok", "role": "prefill", "engine_id": f"dep-pd-prefill-0-0-{UID}"})
    assert (instance.state, instance.engine_id) == ("ready", f"dep-pd-prefill-0-0-{UID}")
    _check(instance, {"status": "ok", "role": "prefill", "engine_id": f"dep-pd-prefill-0-1-{UID}"})
    assert instance.state == "unhealthy" and "another server" in instance.detail
    _check(instance, {"status": "ok", "role": "prefill", "engine_id": f"dep-pd-prefill-0-0-{NEW_UID}"})
    assert (instance.state, instance.engine_id) == ("ready", f"dep-pd-prefill-0-0-{NEW_UID}")


def test_the_launcher_passes_another_nodes_instance_by_its_name(tmp_path: Path) -> None:
    """Node 0 runs the proxy and prefill-0; node 1's launcher draws its own base for decode-0 (the config sets
    none): the proxy expects decode-0's /health to name some base then -decode-0, as node 0's launcher does."""
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "model": {"path": "tiny"}, "log_dir": str(tmp_path), "proxy": {"port": 0},
        "kv_transfer": {"side_channel_host": "0.0.0.0"}, "security": {"deployment_secret": "planned-ids-secret-0123"},
        "parallel": {"nodes": [{"address": "127.0.0.1"}, {"address": "127.0.0.2"}]},
        "instances": [{"role": "prefill"}, {"role": "decode", "node": 1, "base_port": 9200}]})
    args = parse_args(Deployment(cfg, log_dir=tmp_path)._proxy_argv()[3:])
    assert args.engine_ids == {"prefill-0": f"{cfg.kv_transfer.engine_id}-prefill-0", "decode-0": "*-decode-0"}
