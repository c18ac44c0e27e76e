"""Push: decode announces its blocks ({"type": "push"} with this agent's metadata and block ids on the
side channel); the prefill side WRITEs them and its push_done/push_failed notification ends the load.
Works everywhere (UCX WRITEs where it cannot READ: GPUs without NVLink).

From the push request on, the prefill may WRITE into the load's blocks: a load that fails or is
aborted then drains (decode/table.py) until the prefill says nothing is in flight ("cancel_push"). So the
request goes out once the forwards the engine launched before the load ended (decode/compute_order.py):
one of them may still write a block the WRITE lands in.
"""

from __future__ import annotations

from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadStrategy


class PushLoad(LoadStrategy):
    mode = "push"

    def __init__(self, ctx: LoadContext) -> None:
        self.ctx = ctx

    def run(self, load: Load) -> None:  # the prefill side builds the descriptors
        spec = self.ctx.spec()
        pairs = [[(p[1], p[2]) for p in group] for group in load.pairs]
        self.ctx.request_push(load, [t.data_ptr() for t in spec.kv_caches], pairs, spec, last=True,
                              into_blocks=True)

    def cancel_unsent(self, load: Load) -> None:
        self.ctx.cancel_unsent_push(load)

    def cancel(self, load: Load) -> None:
        self.ctx.cancel_push(load)
