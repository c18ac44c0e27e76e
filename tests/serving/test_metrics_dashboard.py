"""examples/grafana-dashboard.json reads only series pdlaunch exports (instance series, federated by the
proxy, and the proxy's own), so no panel stays empty because of a wrong name."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import pdlaunch.metrics.instance  # noqa: F401 - registers the instance's series (alone, the test missed five)
import pdlaunch.metrics.kv_transfer  # noqa: F401 - ... and the KV transfer's
from pdlaunch.metrics.vllm_series import set_model_name
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.metrics import ProxyMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana-dashboard.json"


def _exported() -> set[str]:
    set_model_name("dashboard-test")  # every labelled vllm:* series gets its children
    proxy = ProxyMetrics(InstancePool([Instance("decode", "http://127.0.0.1:1", "decode-0")]))
    proxy.requests.labels("/v1/completions", "200").inc(0)
    rendered = text_string_to_metric_families(proxy.render().decode())  # what the proxy's /metrics answers
    return {s.name for family in [*REGISTRY.collect(), *rendered] for s in family.samples}


def test_every_series_the_dashboard_reads_is_exported() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    named = {n for e in exprs for n in re.findall(r"\b(vllm:[a-z0-9_]+|pdlaunch_[a-z0-9_]+)", e)}
    assert len(named) >= 15
    missing = sorted(named - _exported())
    assert not missing, f"the dashboard reads series nobody exports: {missing}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
