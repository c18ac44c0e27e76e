"""`bench compare` reads every instance's and the proxy's /metrics around each rate (LoadProbe). A page that is not
pdlaunch's (another server on the port, a decision count of +Inf) is an error naming its URL; it was a ValueError or
OverflowError out of the Prometheus parser, a traceback in the middle of a compare run."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from pdlaunch.bench.engine_load import LoadProbe
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.ports import PortAllocator
from tests.serving.helpers import ThreadServer

HTML = "<html><body>dashboard</body></html>\n"
DECISIONS = ("# TYPE pdlaunch_proxy_disaggregation_decisions_total counter\n"
             'pdlaunch_proxy_disaggregation_decisions_total{decision="pd"} +Inf\n')


def _app(page: str) -> FastAPI:
    app = FastAPI()
    app.get("/metrics")(lambda: PlainTextResponse(page))
    return app


def test_an_instance_page_that_is_not_prometheus_text_names_the_url() -> None:
    with ThreadServer(_app(HTML), PortAllocator("127.0.0.1").free("fake")) as fake:
        probe = LoadProbe([("prefill", fake.url)], {})
        try:
            with pytest.raises(PdlaunchError) as caught:
                probe.start()
        finally:
            probe.close()
    assert caught.value.render().startswith(f"{fake.url}/metrics is not the metrics page of a pdlaunch instance: ")


def test_a_proxy_decision_count_of_infinity_names_the_url() -> None:
    with ThreadServer(_app(DECISIONS), PortAllocator("127.0.0.1").free("fake")) as fake:
        probe = LoadProbe([], {})
        probe.proxy_url = fake.url
        try:
            with pytest.raises(PdlaunchError) as caught:
                probe.start()
        finally:
            probe.close()
    assert caught.value.render().startswith(f"{fake.url}/metrics is not the metrics page of a pdlaunch proxy: ")
    assert "the proxy's log says what runs there" in caught.value.render()
