"""A decode's load writes its blocks only after the forwards the engine launched before it (decode side).

Why: the engine can let blocks go while a forward it launched still writes their KV. `LLMEngine.step()`
returns with step N on the device (async scheduling; also any step that samples nothing, only prompt chunks),
and a request of that step can lose its blocks meanwhile: an abort between steps, a stop seen in
`_finish_in_flight` after the next step was launched, a preemption. Its partial last block is uncached, so it
goes to the front of the free list and the next PD decode admitted gets it. That decode's transfer is posted
from a loader thread, unordered with the device's compute stream: landing before the old forward's last write
to that slot, it would be overwritten there for the later layers, and the decode would produce wrong tokens,
silently.

How: `start_load` marks the compute stream on the thread that launches this rank's forwards (the engine
thread; a TP rank's worker thread, which runs the mirrored start_load between its steps): an event after every
forward launched so far, so after every forward that may write the blocks, since those were launched before
the blocks were freed, and freed before they were allocated to this load (`ComputeStream.mark`). The loader
thread waits for the mark (`wait_compute`) just before it posts the first thing that writes the load's blocks:
a READ into them (pull; a staged pull straight into the blocks), the push request (the prefill WRITEs after
it; a staged push straight into the blocks), a staged chunk's scatter out of this side's slots, a resharding
load's copy of head slices. The wait thus overlaps the load's control path (handshake, block ids, a staged
chunk's READ or WRITE into slots) and never blocks a step; it is a poll bounded by the load's deadline, so a
device that never finishes fails the load naming this stage (an abort ends the wait too), with nothing posted
into its blocks: they go back as any failed load's. Cost: a load's first write may wait for the end of the
step the device ran when the load started (one decode step, or one prompt chunk); everything before that write
overlaps it.

On CPU there is no mark: the host ran a forward before step() returned. The other writers of the KV blocks
are ordered already: the CPU offload tier's loads wait for an event recorded on the compute stream
(offload/transfer.py), and the storage connector copies on the engine thread's stream, after its forwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from pdlaunch.kv_transfer.decode.load import Load
from pdlaunch.memory.platform import cuda_event, event_done

COMPUTE_STAGE = "the forwards launched before the load, which may still write its blocks"  # what a timeout names
POLL_SECONDS = 0.0002  # a CUDA event has no wait with a timeout: poll it (as a loader polls its READ)


class ComputeStream:
    """The stream this rank's forwards run on, on the KV cache's device: the launching thread's current stream
    (the device's default stream; CUDA graphs replay on it), the one offload/transfer.py orders against."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> torch.cuda.Event | None:
        """On the thread that launches the forwards (start_load): an event recorded after every forward
        launched so far; None on CPU."""
        if self.device.type != "cuda":
            return None
        event = cuda_event()
        event.record(torch.cuda.current_stream(self.device))
        return event


def wait_compute(load: Load, remaining: Callable[[Load, str], float]) -> None:
    """Loader thread, before posting anything that writes the load's blocks: return once its mark completed.
    `remaining` (LoadContext.remaining) raises KVTransferError at the load's deadline or abort, naming
    COMPUTE_STAGE. A completed mark answers at once, so later chunks of a load may call this again."""
    mark = load.compute
    if mark is None:
        return
    while not event_done(mark):
        remaining(load, COMPUTE_STAGE)
        time.sleep(POLL_SECONDS)
