"""The proxy pool's health probes, counted: a test that sets an instance's state by hand must wait until that
instance's first probes are over, or a probe ending later sets the state again (a refused one marks a ready instance
down). The proxy probes every instance twice at start: once in its lifespan (pool.check_all), then its monitor's loop
at once (start_monitor); with HEALTH_INTERVAL_S and STARTING_INTERVAL_S (an instance not yet seen ready)
patched long, no other probe comes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from pdlaunch.proxy.instances import Instance, InstancePool

FIRST_PROBES = 2  # check_all's, then the monitor loop's first


def first_probes_over(pool: InstancePool, patch: pytest.MonkeyPatch) -> Callable[[], bool]:
    """Whether every instance of `pool` has had its FIRST_PROBES probes, counted as the proxy runs them (patch before
    the proxy app starts)."""
    ended: Counter[str] = Counter()
    check = pool._check

    async def counted(client: httpx.AsyncClient, instance: Instance) -> None:
        try:
            await check(client, instance)
        finally:
            ended[instance.name] += 1

    patch.setattr(pool, "_check", counted)
    return lambda: all(ended[i.name] >= FIRST_PROBES for i in pool.instances)
