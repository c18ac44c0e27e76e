"""Test-only fault injection for KV loads: PDLAUNCH_TEST_FAIL_TRANSFER_RATE.

Set PDLAUNCH_TEST_FAIL_TRANSFER_RATE=0.05 in a decode instance's environment and about 5% of its KV
loads fail after the handshake, through the same path a real transfer failure takes (the prefill is
told to release its blocks, the client gets a 502 naming the failure). For soak and chaos tests
only: never set it in a deployment that serves users.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping

from pdlaunch.errors import KVTransferError

ENV = "PDLAUNCH_TEST_FAIL_TRANSFER_RATE"

logger = logging.getLogger(__name__)


class TransferFaults:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        text = environ.get(ENV, "").strip()
        try:
            rate = float(text) if text else 0.0
        except ValueError:
            rate = -1.0
        if not 0.0 <= rate <= 1.0:  # NaN fails this too
            raise KVTransferError(f"{ENV}={text!r} is not a fraction in [0, 1]", field=ENV,
                                  hint="unset it (it is for tests only) or give e.g. 0.05")
        self.rate = rate
        self._random = random.Random()
        if rate:
            logger.warning("%s=%g: failing that fraction of KV loads on purpose (test only)", ENV, rate)

    def maybe_fail(self, request_id: str) -> None:
        """Raise a KVTransferError for about `rate` of the calls."""
        if self.rate and self._random.random() < self.rate:
            raise KVTransferError(f"KV load of request {request_id} failed: injected by {ENV}={self.rate:g} "
                                  "(test-only fault injection)")
