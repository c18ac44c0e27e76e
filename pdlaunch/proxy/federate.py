"""The proxy's /metrics also serves every instance's series, so one scrape target covers a deployment.

Instance ports are picked at start (and a restarted instance may move), so users should not have to
discover them: at each scrape the proxy fetches every ready instance's /metrics (internal token, short
timeout, all at once) and re-emits each sample with `instance` (its name, e.g. decode-0) and `role`
labels added. Sums across instances are the dashboard's job (`sum by (role) (...)`); vLLM's series
keep their own labels (model_name, engine, finished_reason). An instance that does not answer whole in
time (SCRAPE_TIMEOUT_S for the whole answer: a trickle would hold every scrape), or answers more than
SCRAPE_MAX_BYTES, or whose text is not Prometheus exposition that renders again (a line halfway that does not parse, a
family another instance gave another type, a sample with a timestamp that is not a finite number), is left out of that
scrape and counted in pdlaunch_proxy_federation_errors; the rest is served all the same.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Collection, Iterator

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from pdlaunch.config.problems import with_article
from pdlaunch.http.answers import AnswerTooLarge, fetch
from pdlaunch.proxy.instances import Instance, InstancePool

SCRAPE_TIMEOUT_S = 2.0
SCRAPE_MAX_BYTES = 64 << 20  # an instance's exposition is under 1 MiB; vLLM's histograms per model, a few


class _Fetched(Collector):
    """Families already fetched and relabelled, merged by name across instances."""

    def __init__(self, families: Collection[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


async def _scrape(client: httpx.AsyncClient, instance: Instance, headers: dict[str, str]) -> str | None:
    try:
        status, content = await fetch(client, "GET", instance.url + "/metrics", headers=headers,
                                      timeout_s=SCRAPE_TIMEOUT_S, max_bytes=SCRAPE_MAX_BYTES)
    except (httpx.HTTPError, TimeoutError, AnswerTooLarge):
        return None
    return content.decode(errors="replace") if status == 200 else None


def _merge(families: dict[str, Metric], text: str, instance: Instance) -> None:
    """Add `instance`'s series to `families`; ValueError (and nothing added) for text that is not Prometheus
    exposition throughout, whose family of a name already merged has another type, or that does not render again
    (a sample timestamp of NaN or +Inf, which the parser takes, would fail the whole /metrics answer)."""
    extra = {"instance": instance.name, "role": instance.role}
    parsed = list(text_string_to_metric_families(text))  # all of it first: a bad line halfway adds nothing
    for family in parsed:
        merged = families.get(family.name)
        if merged is not None and merged.type != family.type:
            raise ValueError(f"{family.name} is {with_article(family.type)} here and {with_article(merged.type)} on "
                             "another instance")
        for sample in family.samples:
            if sample.timestamp is not None and not math.isfinite(float(sample.timestamp)):
                raise ValueError(f"{sample.name} has the timestamp {sample.timestamp}: not a finite number")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fetched(parsed))
    try:  # rendered alone first: what fails here would fail every instance's scrape, and the proxy's own series
        generate_latest(registry)
    except Exception as exc:  # noqa: BLE001 - whatever generate_latest raises, the instance is left out
        raise ValueError(f"its series do not render: {type(exc).__name__}: {exc}") from None
    for family in parsed:
        merged = families.get(family.name)
        if merged is None:
            merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            merged.add_sample(sample.name, {**sample.labels, **extra}, sample.value, sample.timestamp,
                              sample.exemplar)


async def instance_metrics(client: httpx.AsyncClient, pool: InstancePool, headers: dict[str, str]) -> tuple[bytes, int]:
    """(exposition text of every ready instance's series with instance/role labels, instances missed)."""
    ready = [i for i in pool.instances if i.state == "ready"]
    texts = await asyncio.gather(*(_scrape(client, i, headers) for i in ready))
    families: dict[str, Metric] = {}
    missed = 0
    for instance, text in zip(ready, texts):
        if text is None:
            missed += 1
            continue
        try:
            _merge(families, text, instance)
        except ValueError:  # not Prometheus text (a foreign instance's 200 of something else), or not rendering
            missed += 1
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fetched(families.values()))
    return generate_latest(registry), missed
