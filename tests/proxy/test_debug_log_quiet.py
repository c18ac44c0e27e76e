"""A proxy at PDLAUNCH_LOG_LEVEL=debug writes its own line per request, not the HTTP client's: httpx logged each
health probe at INFO (two lines a second) and httpcore ~10 DEBUG lines a call, 97% of a debug proxy's log."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from pdlaunch.proxy.__main__ import quiet_http_client_logs

CLIENT_LOGGERS = ("httpx", "httpcore", "httpcore.http11", "httpcore.connection")


@pytest.fixture
def debug_root() -> Iterator[None]:
    """The root logger at DEBUG, as the proxy's basicConfig sets it under PDLAUNCH_LOG_LEVEL=debug; every level
    this test touches is put back."""
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in CLIENT_LOGGERS]
    saved = [lg.level for lg in loggers]
    logging.getLogger().setLevel(logging.DEBUG)
    for name in CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)


@pytest.mark.usefixtures("debug_root")
def test_a_debug_proxy_logs_no_http_client_chatter() -> None:
    quiet_http_client_logs()
    for name in CLIENT_LOGGERS:
        lg = logging.getLogger(name)
        assert not lg.isEnabledFor(logging.INFO), name
        assert lg.isEnabledFor(logging.WARNING), name  # a client's warning still shows
    assert logging.getLogger("pdlaunch.proxy").isEnabledFor(logging.DEBUG)  # the proxy's own per-request line


@pytest.mark.usefixtures("debug_root")
def test_an_info_proxy_logs_no_http_client_chatter_either() -> None:
    logging.getLogger().setLevel(logging.INFO)
    quiet_http_client_logs()
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
