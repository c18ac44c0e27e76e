"""How many OpenMP threads a GPU instance's own CPU tensor ops use once it serves: one.

Torch starts one intra-op thread per core. A GPU instance's host-side tensor ops are small (a step's inputs
staged for the copy to the device, block tables repeated per prompt row), yet each parallel one wakes the whole
pool, and the woken threads spin after it. On a 2x H200 host (32 cores) that cost a decode instance 2.4 cores and
made its mixed steps (a turn's prompt rows beside the running decodes) take 11.3 ms instead of 7.4 ms; its turns'
TTFT p50 fell from 35 to 29 ms with one thread (RESULTS.md, sixty-fifth session). Loading keeps the pool (a
checkpoint's host-side conversions are large); a user's OMP_NUM_THREADS is theirs and is left alone.
"""

from __future__ import annotations

import os

import torch

SERVING_THREADS = 1


def settle_host_threads(device: torch.device) -> int | None:
    """Shrink the intra-op pool of a GPU instance's process to SERVING_THREADS once its model is loaded and
    warmed; the count set, or None where nothing changed (a CPU instance, or OMP_NUM_THREADS set by the user)."""
    if device.type == "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    torch.set_num_threads(SERVING_THREADS)
    return SERVING_THREADS
