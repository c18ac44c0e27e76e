"""`--backend ray`: an instance's rank-0 actor that Ray reports temporarily unavailable, given a bounded grace before
it counts as dead.

Ray fails a call with ActorUnavailableError (a RayActorError) when its connection to the actor broke while the GCS
still has the actor alive: a network blip, the actor's node out of touch for a while. The actor may come back, unlike
one Ray reports dead (ActorDiedError). Such a failure of the instance's `serve` call (the launcher's handle on its
end) leaves the instance as it is: it gets no work from the launcher, and the proxy's /health probe decides whether
requests go to it. The actor is asked (`node_address`, in the control group beside `serve`) once per supervision
round, one call at a time. An answer means it is back: its `serve` call is lost (Ray failed it for good), so its end
is watched through `served` (ray_instance.py), a call that returns what `serve` returns. Ray reporting it dead ends
it as any dead actor; no answer within UNREACHABLE_GRACE_S ends it naming its node and how long.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdlaunch.distributed.ray_rank import ray_failure

if TYPE_CHECKING:
    from ray import ObjectRef

# As the head watch's grace (ray_head.LOST_S), and about as long as Ray's GCS takes to declare a node dead that does
# not answer its health checks (5 checks 3 s apart by default): past that, an actor that comes back has most often
# been ended by Ray with its node, and what is left of the instance is not worth waiting for.
UNREACHABLE_GRACE_S = 15.0
# Ray's words around the reason: "The actor <hex id> is unavailable: <reason>. The task may or may not have been ..."
_RAY_FRAME = re.compile(r"^The actor \S+ is unavailable: (?P<why>.*?)\.? The task may or may not have been executed "
                        r"on the actor\.?$", re.DOTALL)


@dataclass
class Unreachable:
    """An instance whose rank-0 actor, on `node`, Ray has reported unavailable since `since` (time.monotonic())."""

    node: str
    since: float
    why: str  # Ray's reason, as unavailable_why says it
    probe: ObjectRef[str] | None = None  # the call asking the actor, while unanswered

    def said(self, name: str) -> str:
        """The line said when the instance's actor is first found unreachable."""
        return (f"{name}: its Ray actor on node {self.node} does not answer (Ray: {self.why}); the instance is kept "
                f"for up to {UNREACHABLE_GRACE_S:.0f}s in case it comes back, asked again each round meanwhile (the "
                "proxy routes by its /health)")

    def over(self, now: float) -> str | None:
        """How the instance ended once the grace is over, else None."""
        gone = now - self.since
        if gone < UNREACHABLE_GRACE_S:
            return None
        return f"lost its Ray actor: on node {self.node} it has been unreachable for {gone:.0f}s (Ray: {self.why})"


def unavailable_why(exc: BaseException) -> str:
    """Ray's reason for an ActorUnavailableError, without its frame (the actor's id, the at-most-once caveat)."""
    text = ray_failure(exc)
    found = _RAY_FRAME.match(text)
    return found.group("why").strip() if found else text
