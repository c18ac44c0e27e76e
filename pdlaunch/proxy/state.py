"""What every proxy route shares, in one typed object on the app (`app.state.proxy_state`)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from pdlaunch.proxy.disaggregate import Disaggregation
from pdlaunch.proxy.instances import InstancePool
from pdlaunch.proxy.migrate import Migrations
from pdlaunch.proxy.prefill_leg import PrefillLegs
from pdlaunch.proxy.prefix import PrefixRouter
from pdlaunch.proxy.upstream import Proxy


@dataclass
class ProxyState:
    proxy: Proxy  # the calls to instances, the metrics, the HTTP client (upstream.py)
    prefill_legs: PrefillLegs  # prefill legs under their own deadline (prefill_leg.py)
    migrations: Migrations  # decode legs that move when their decode fails (migrate.py)
    disaggregation: Disaggregation  # PD or decode only, per request (disaggregate.py)
    router: PrefixRouter  # instances by cached prefix, and what each caches of a prompt (prefix.py)

    @property
    def pool(self) -> InstancePool:
        return self.proxy.pool

    def forwarded_headers(self, request: Request, request_id: str | None = None) -> dict[str, str]:
        """Headers of a call to an instance on behalf of `request`: the internal token, or, in front of
        foreign instances with a key (no deployment secret), the client's own Authorization."""
        headers = {"X-Request-Id": request_id} if request_id is not None else {}
        headers.update(self.proxy.upstream_headers)
        if not self.proxy.upstream_headers and "authorization" in request.headers:
            headers["Authorization"] = request.headers["authorization"]
        return headers


def state_of(request: Request) -> ProxyState:
    state = request.app.state.proxy_state
    if not isinstance(state, ProxyState):
        raise TypeError("the proxy app carries no ProxyState (build it with build_proxy_app)")
    return state
