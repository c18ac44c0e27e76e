"""The proxy's health check takes a 200 /health as healthy only from the instance it expects: one that names
another role, or another engine_id than the one the launcher planned for it (or that with -rN after a restart),
is another server at the instance's address (another deployment's instance, one that moved node): the instance
gets no requests until its own answer comes back. A vLLM instance's empty 200 still counts as healthy."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.responses import JSONResponse, Response

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.__main__ import parse_args
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_proxy_failures import ScriptedInstance


class SaysWhoItIs(ScriptedInstance):
    """A scripted instance whose /health body the test sets; None: an empty 200, as vLLM answers."""

    def __init__(self, role: str, engine_id: str | None) -> None:
        super().__init__(role)
        self.own: dict[str, object] = {"status": "ok", "role": role, "engine_id": engine_id, "itl_ms": 0}
        self.body: dict[str, object] | None = None if engine_id is None else self.own

    async def health(self) -> Any:
        return Response(status_code=200) if self.body is None else JSONResponse(self.body)


class Setup:
    def __init__(self, url: str, log: Path, prefill: SaysWhoItIs, decode: SaysWhoItIs) -> None:
        self.url, self.log, self.prefill, self.decode = url, log, prefill, decode

    def instance(self, name: str) -> dict[str, Any]:
        listed: list[dict[str, Any]] = httpx.get(f"{self.url}/instances", timeout=5).json()
        return next(i for i in listed if i["name"] == name)

    def wait_state(self, name: str, state: str) -> dict[str, Any]:
        def in_state() -> dict[str, Any] | None:
            seen = self.instance(name)
            return seen if seen["state"] == state else None

        found: dict[str, Any] = wait_for(in_state, f"the proxy to see {name} {state}", 30)
        return found


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A proxy process with prefill-0 and decode-0 (pdlaunch-like, their engine_ids passed by --engine-id) and
    prefill-1 (vLLM-like: an empty 200, no --engine-id)."""
    ports = PortAllocator("127.0.0.1")
    prefill, decode = SaysWhoItIs("prefill", "dep-prefill-0"), SaysWhoItIs("decode", "dep-decode-0")
    vllm = SaysWhoItIs("prefill", None)
    log_file = tmp_path_factory.mktemp("proxy") / "proxy.log"
    with ThreadServer(prefill.app, ports.free("p0")) as p0, ThreadServer(decode.app, ports.free("d0")) as d0, \
            ThreadServer(vllm.app, ports.free("p1")) as p1, open(log_file, "w") as log:
        port = ports.free("proxy")
        proc = subprocess.Popen([sys.executable, "-m", "pdlaunch.proxy", "--port", str(port),
                                 "--prefill", f"prefill-0={p0.url}", "--engine-id", "prefill-0=dep-prefill-0",
                                 "--decode", f"decode-0={d0.url}", "--engine-id", "decode-0=dep-decode-0",
                                 "--prefill", f"prefill-1={p1.url}"], stdout=log, stderr=subprocess.STDOUT)
        try:
            setup = Setup(f"http://127.0.0.1:{port}", log_file, prefill, decode)
            wait_for(lambda: _answers(setup.url), "the proxy to answer /instances", 60)
            yield setup
        finally:
            proc.terminate()
            proc.wait(10)


@pytest.fixture()
def setup(proxy: Setup) -> Iterator[Setup]:
    """Every instance ready, answering as itself, before and after each test."""
    for name in ("prefill-0", "decode-0", "prefill-1"):
        proxy.wait_state(name, "ready")
    yield proxy
    proxy.prefill.body, proxy.decode.body = proxy.prefill.own, proxy.decode.own
    for name in ("prefill-0", "decode-0"):
        proxy.wait_state(name, "ready")


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/instances", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _complete(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": "ok", "stream": True, "max_tokens": 3}, timeout=10)


def test_an_empty_200_is_healthy_and_each_names_its_engine(setup: Setup) -> None:
    assert setup.instance("prefill-1")["detail"] == ""  # the vLLM-like instance: nothing to check
    assert setup.instance("prefill-0")["engine_id"] == "dep-prefill-0"


def test_another_engine_id_at_the_address_gets_no_requests(setup: Setup) -> None:
    setup.prefill.body = {"status": "ok", "role": "prefill", "engine_id": "other-deployment-prefill-0"}
    seen = setup.wait_state("prefill-0", "unhealthy")
    assert "other-deployment-prefill-0" in seen["detail"] and "dep-prefill-0" in seen["detail"], seen
    wait_for(lambda: any("prefill-0" in line and "marked unhealthy" in line and "other-deployment-prefill-0" in line
                         for line in setup.log.read_text().splitlines()), "the proxy's log line naming what answered")
    before = len(setup.prefill.requests)
    for _ in range(4):
        assert _complete(setup.url).status_code == 200
    assert len(setup.prefill.requests) == before, "a request went to the server that is not prefill-0"
    setup.prefill.body = {**setup.prefill.own, "engine_id": "dep-prefill-0-r2"}  # restarted: still itself
    assert setup.wait_state("prefill-0", "ready")["engine_id"] == "dep-prefill-0-r2"


def test_another_role_at_the_address_gets_no_requests(setup: Setup) -> None:
    setup.decode.body = {**setup.decode.own, "role": "prefill"}
    assert "role 'prefill'" in setup.wait_state("decode-0", "unhealthy")["detail"]
    r = _complete(setup.url)
    assert r.status_code == 503 and "no decode instance is ready" in r.text, r.text


def test_the_launcher_passes_the_engine_ids_it_planned(tmp_path: Path) -> None:
    cfg = DeploymentConfig.model_validate({"device": "cpu", "model": {"path": "tiny"}, "proxy": {"port": 0},
                                           "instances": [{"role": "prefill"}, {"role": "decode"}]})
    deployment = Deployment(cfg, log_dir=tmp_path)
    args = parse_args(deployment._proxy_argv()[3:])
    assert args.engine_ids == {p.spec.name: p.spec.engine_id for p in deployment.plan.instances}
    assert args.engine_ids["prefill-0"] == f"{cfg.kv_transfer.engine_id}-prefill-0"


@pytest.mark.parametrize(("flag", "says"), [("nobody=abc", "no instance is named 'nobody'"),
                                            ("p0", "expected NAME=ENGINE_ID"),
                                            ("p0=", "expected NAME=ENGINE_ID")])
def test_engine_id_flag_names_an_instance(flag: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--prefill", "p0=http://a:1", "--decode", "http://b:2", "--engine-id", flag])
    assert says in capsys.readouterr().err
