"""Both prefills gone (each refused the connection: the leg went to the second once the first refused it): the 503
no_instance under kv_transfer.load_failure_policy fail, and the WARNING under recompute, name each prefill that was
gone. Before, only the last one tried was named (`prefill-1 is gone (...), and no other prefill instance is ready`),
so the message read as if prefill-0 were fine."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest

from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy import instances
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.helpers.probes import first_probes_over
from tests.proxy.test_shutting_down_instance import _Decode
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_proxy_hardening import SECRET


@contextmanager
def _two_refusing_prefills(decode: _Decode, policy: str) -> Iterator[str]:
    """The proxy's URL, in front of two prefills that refuse the connection (nothing listens; both set ready, as
    their last probe before they went saw them) and `decode`."""
    ports = PortAllocator("127.0.0.1")
    with ExitStack() as stack, pytest.MonkeyPatch.context() as patch:
        patch.setattr(instances, "HEALTH_INTERVAL_S", 3600.0)
        patch.setattr(instances, "STARTING_INTERVAL_S", 3600.0)
        d = stack.enter_context(ThreadServer(decode.app, ports.free("decode")))
        pool = InstancePool([Instance("prefill", f"http://127.0.0.1:{ports.free('p0')}", "prefill-0"),
                             Instance("prefill", f"http://127.0.0.1:{ports.free('p1')}", "prefill-1"),
                             Instance("decode", d.url, "decode-0")])
        probes_over = first_probes_over(pool, patch)
        app = build_proxy_app(pool, 60.0, deployment_secret=SECRET, load_failure_policy=policy)
        proxy = stack.enter_context(ThreadServer(app, ports.free("proxy")))
        wait_for(probes_over, "the proxy's first probes of each instance", 30)
        pool.instances[0].state = pool.instances[1].state = "ready"
        yield proxy.url


def _post(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": "go", "max_tokens": 4}, timeout=30)


def test_under_policy_fail_the_503_names_both_gone_prefills() -> None:
    decode = _Decode()
    with _two_refusing_prefills(decode, "fail") as url:
        answer = _post(url)
    assert answer.status_code == 503, answer.text
    message = answer.json()["error"]["message"]
    assert "prefill-0" in message and "prefill-1" in message, message
    assert decode.bodies == []


def test_under_policy_recompute_the_warning_names_both_gone_prefills(caplog: pytest.LogCaptureFixture) -> None:
    decode = _Decode()
    with _two_refusing_prefills(decode, "recompute") as url, caplog.at_level(logging.WARNING, "pdlaunch.proxy"):
        answer = _post(url)
    assert answer.status_code == 200, answer.text
    said = [r.getMessage() for r in caplog.records if "the decode computes the prompt itself" in r.getMessage()]
    assert len(said) == 1 and "prefill-0" in said[0] and "prefill-1" in said[0], said
