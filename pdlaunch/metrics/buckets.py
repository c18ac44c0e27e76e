"""Histogram buckets shared by an instance's series and the proxy's (no metric objects here: the proxy imports it
without creating an instance's series in its process)."""

from __future__ import annotations

# Time to first byte (http/first_byte.py, at the instances and the proxy): fine at the low end, where the hops it
# splits are a few milliseconds each.
FIRST_BYTE_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
                      2.5, 5.0, 10.0, 30.0)
