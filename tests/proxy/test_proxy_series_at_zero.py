"""The proxy's labelled counters of failures an operator alerts on exist at 0 from the start, for every label value
this proxy can count: stalls and retried legs per role of its instances, migrations per reason. A series that appears
only with its first event hides that event from Prometheus' rate() and increase() (they need a sample before it), so
increase(pdlaunch_proxy_migrations_total[5m]) > 0 missed the first migration after the proxy started."""

from __future__ import annotations

from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.metrics import ProxyMetrics


def _lines(*instances: Instance) -> set[str]:
    return set(ProxyMetrics(InstancePool(list(instances))).render().decode().splitlines())


def test_pd_proxy_exports_its_failure_counters_at_zero_before_any_request() -> None:
    lines = _lines(
        Instance("prefill", "http://127.0.0.1:1", "prefill-0"), Instance("decode", "http://127.0.0.1:2", "decode-0")
    )
    for reason in ("died", "stalled"):
        assert f'pdlaunch_proxy_migrations_total{{reason="{reason}"}} 0.0' in lines
    for role in ("prefill", "decode"):
        assert f'pdlaunch_proxy_stalls_detected_total{{role="{role}"}} 0.0' in lines
        assert f'pdlaunch_proxy_legs_retried_total{{reason="instance_gone",role="{role}"}} 0.0' in lines
    for reason in ("stalled", "recompute"):  # only a prefill leg is given up for these
        assert f'pdlaunch_proxy_legs_retried_total{{reason="{reason}",role="prefill"}} 0.0' in lines
        assert f'pdlaunch_proxy_legs_retried_total{{reason="{reason}",role="decode"}} 0.0' not in lines


def test_colocated_proxy_has_no_series_of_roles_it_does_not_serve() -> None:
    lines = _lines(Instance("colocated", "http://127.0.0.1:1", "colocated-0"))
    assert 'pdlaunch_proxy_stalls_detected_total{role="colocated"} 0.0' in lines
    assert 'pdlaunch_proxy_legs_retried_total{reason="instance_gone",role="colocated"} 0.0' in lines
    assert not [line for line in lines if 'role="prefill"' in line or 'role="decode"' in line]
