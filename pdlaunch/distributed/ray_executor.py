"""The TP executor of an instance under `--backend ray`: rank 0 drives ranks 1..T-1, which are Ray
actors (ray_rank.py) placed by the launcher in the instance's placement group, through Ray actor calls.

It has TPExecutor's shape (tp_executor.py) with Ray as the control path: no pipes, no TCP link of our own.
Rank 0 hosts the rendezvous store on its node's address (parallel.master_addr, which the launcher sets
to the node Ray placed rank 0 on); the tensor collectives run over torch.distributed (gloo on CPU, NCCL
on CUDA) as everywhere else. A step is sent to every rank without waiting (calls of one caller run in
order on each actor); the replies of those calls are checked at the next health check, and a failed
one names its rank. Rank 0 joins the group only once every other rank has come to the join
(parallel_state.wait_for_joins), watching their setup calls meanwhile: a rank whose setup fails on its
way (its checkpoint, its device, its actor or node dying) is named as it fails, not after the join's
timeout. A watchdog holds each rank's `until_shutdown` call, which Ray fails at once when
the actor or its node dies: the next step then fails naming the rank, as with a dead local worker.

The launcher hands rank 0's actor the rank handles (use_rank_actors) before the engine is built; then
create_executor (executor.py) picks this executor.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.distributed.join_waits import wait_for_joins
from pdlaunch.distributed.message_stream import MalformedMessage, UnexpectedMessage
from pdlaunch.distributed.messages import ConnectorCall, Ready
from pdlaunch.distributed.parallel_state import READY_WAIT_S, SealedStore, create_store, destroy_tp_group, store_key
from pdlaunch.distributed.rank import build_rank
from pdlaunch.distributed.ray_rank import CONTROL_GROUP, ray_failure
from pdlaunch.distributed.tp_connector import TPConnector
from pdlaunch.errors import EngineError
from pdlaunch.kv_transfer.base import KVConnector
from pdlaunch.model.checkpoint import Checkpoint
from pdlaunch.runner.step_inputs import StepInputs

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle

log = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 30.0  # a rank that does not answer a connector call within this is failed
SHUTDOWN_TIMEOUT_S = 10.0  # ranks leave the group within this on shutdown
WATCH_POLL_S = 0.5
DEATH_REPORT_WAIT_S = 2.0  # after a failed collective, how long to wait for the watchdog to name the rank

_rank_actors: list[ActorHandle] = []  # ranks 1..T-1 of the instance this process runs (one per process)


def use_rank_actors(actors: list[ActorHandle]) -> None:
    """Called by the rank-0 actor before its engine is built: the handles of ranks 1..T-1, in order."""
    _rank_actors[:] = actors


def rank_actors() -> list[ActorHandle]:
    return list(_rank_actors)


class RayTPExecutor:
    """tp > 1 under Ray: this process (a Ray actor) is rank 0 of the instance's TP group."""

    def __init__(self, config: DeploymentConfig, instance: InstanceSpec, checkpoint: Checkpoint,
                 device: torch.device, dtype: torch.dtype, max_model_len: int, dtype_name: str,
                 actors: list[ActorHandle]) -> None:
        import ray

        self._ray = ray
        self.tp_size = instance.tp
        if len(actors) != self.tp_size - 1:
            raise EngineError(f"{instance.name} has TP {self.tp_size} but {len(actors)} rank actor(s) were given",
                              field="parallel.tp")
        self._actors = actors
        self.failure: str | None = None
        self._closing = threading.Event()
        self._nodes: list[str] = []  # each rank's node address, once every rank is built
        self._pending: dict[ObjectRef[None], int] = {}  # calls not yet known to have succeeded -> rank
        raw = create_store(config.parallel.master_addr, instance.master_port, self.tp_size)
        port = raw.port
        # every rank actor derives the same key from its copy of the config (deployment secret included)
        self._store = SealedStore(raw, store_key(config, instance, port))
        setups = [a.setup.remote(device.type, dtype_name, max_model_len, port) for a in actors]
        self._watches = {a.until_shutdown.options(concurrency_group=CONTROL_GROUP).remote(): r
                         for r, a in enumerate(actors, start=1)}
        try:
            wait_for_joins(self._store, self.tp_size, config.parallel.rendezvous_timeout_seconds,
                           lambda s: self._watch_setups(setups, s))
            state = build_rank(0, config, instance, checkpoint, device, dtype, max_model_len, port, self._store)
            self.runner = state.runner
            self.engine_id = state.engine_id
            ready = [self._ready(r, value) for r, value in
                     enumerate(self._get(setups, READY_WAIT_S, "setup"), start=1)]
            nodes = self._get([a.node_address.remote() for a in actors], REPLY_TIMEOUT_S, "node_address")
            self._nodes = [str(ray.util.get_node_ip_address()), *map(str, nodes)]
        except BaseException as exc:
            # A rank's failure already named (self.failure, by _watch_setups) needs no second look at the setups.
            named = self.failure is not None or not isinstance(exc, Exception)
            failed = None if named else self._failed_setup(setups)
            self._stop_ranks()
            destroy_tp_group()
            if failed is not None:  # rank 0's rendezvous timed out because that rank never came: name it
                raise failed from exc
            raise
        self._rank_engine_ids = [self.engine_id] + [r.engine_id for r in ready]
        self._side_ports: list[int | None] = [None, *(r.side_channel_port for r in ready)]
        self._side_hosts: list[str | None] = [None, *(r.side_channel_host for r in ready)]
        self._watchdog = threading.Thread(target=self._watch, name="pdlaunch-ray-tp-watchdog", daemon=True)
        self._watchdog.start()
        log.info("TP group of %d ranks ready under Ray (rank nodes %s)", self.tp_size, self._nodes)

    # -- calls -------------------------------------------------------------------------------------
    def _get(self, refs: list[ObjectRef[object]], timeout: float, what: str) -> list[object]:
        """The results of `refs` (one per rank 1..T-1), or EngineError naming the rank that failed."""
        ray = self._ray
        try:
            return list(ray.get(refs, timeout=timeout))
        except ray.exceptions.GetTimeoutError:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            late = [self._where(rank) for rank, ref in enumerate(refs, start=1) if ref not in done]
            raise EngineError(f"{', '.join(late) or 'a TP rank'} did not answer {what} within {timeout:.0f}s",
                              field="parallel.tp", hint="see that rank's log (a stuck or overloaded node)") from None
        except ray.exceptions.RayError as exc:
            for rank, ref in enumerate(refs, start=1):
                done, _ = ray.wait([ref], timeout=0)
                if done:
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError as rank_exc:
                        raise self._failed(rank, what, rank_exc) from None
            raise EngineError(f"a TP rank failed {what}: {exc}", field="parallel.tp") from None

    def _failed_setup(self, setups: list[ObjectRef[object]]) -> EngineError | None:
        """The failure of the first rank whose setup call failed (waiting DEATH_REPORT_WAIT_S for the
        others to report), or None: rank 0 failed on its own."""
        ray = self._ray
        done, _ = ray.wait(setups, num_returns=len(setups), timeout=DEATH_REPORT_WAIT_S)
        for rank, ref in enumerate(setups, start=1):
            if ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as exc:
                    return self._failed(rank, "setup", exc)
        return None

    def _watch_setups(self, setups: list[ObjectRef[object]], seconds: float) -> None:
        """Wait up to `seconds` for a rank's setup call to end before the group has formed. A setup returns
        only after its join, which waits for rank 0: one that ended failed, so raise its failure."""
        done, _ = self._ray.wait(setups, num_returns=1, timeout=seconds)
        if done:
            rank = setups.index(done[0]) + 1
            raise self._failed_setup(setups) or EngineError(
                f"{self._where(rank)} finished its setup before rank 0 joined the group", field="parallel.tp",
                hint="every rank of a TP group must run the same pdlaunch version")

    def _ready(self, rank: int, value: object) -> Ready:
        """Rank `rank`'s answer to its setup call, which must be a well-formed Ready."""
        if not isinstance(value, Ready):
            raise UnexpectedMessage(self._where(rank), value, "Ready")
        problem = value.problem()
        if problem is not None:
            raise MalformedMessage(self._where(rank), value, problem)
        return value

    def _where(self, rank: int) -> str:
        return f"TP rank {rank} (Ray actor on {self._nodes[rank]})" if rank < len(self._nodes) else \
            f"TP rank {rank} (Ray actor)"

    def _failed(self, rank: int, what: str, exc: BaseException) -> EngineError:
        self.failure = self.failure or f"{self._where(rank)} failed {what}: {ray_failure(exc)}"
        return EngineError(self.failure, field="parallel.tp", hint="see that rank's log; the instance must restart")

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        self.check_health()
        shared = self._ray.put(inputs)  # one copy in the object store for every rank
        self._pending.update({a.execute.remote(shared): r for r, a in enumerate(self._actors, start=1)})
        try:
            return self.runner.run(inputs)
        except RuntimeError as exc:
            deadline = time.monotonic() + DEATH_REPORT_WAIT_S
            while self.failure is None and time.monotonic() < deadline:
                self._check_pending()
                time.sleep(0.05)
            # No rank failed its call: a collective timing out names no peer, but the stuck rank is one whose
            # step has not finished (stopped, hung, its node stalled).
            late = sorted(set(self._pending.values()))
            stuck = f" ({', '.join(map(self._where, late))} still in its step: hung or stopped)" if late else ""
            self.failure = self.failure or f"a TP collective failed: {exc}{stuck}"
            raise EngineError(self.failure, field="parallel.tp",
                              hint="see the ranks' logs; the instance must restart") from exc

    def _check_pending(self) -> None:
        """Raise (and remember) the failure of a finished step call; drop those that succeeded."""
        if not self._pending:
            return
        done, _ = self._ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
        for ref in done:
            rank = self._pending.pop(ref)
            try:
                self._ray.get(ref)
            except self._ray.exceptions.RayError as exc:
                raise self._failed(rank, "a step", exc) from None

    def wrap_connector(self, connector: KVConnector) -> KVConnector:
        """Rank 0's connector, with every scheduler-side call mirrored to the other ranks' connectors."""
        return TPConnector(connector, self.tp_size, self._mirror, self._side_ports, self._side_hosts)

    def _mirror(self, call: ConnectorCall) -> list[object]:
        """Make `call` on the connector of every rank > 0 (in step order); their replies if it has any."""
        self.check_health()
        refs = [a.connector_call.remote(call) for a in self._actors]
        if call.reply_type is None:
            self._pending.update({ref: r for r, ref in enumerate(refs, start=1)})
            return []
        try:
            replies = self._get(refs, REPLY_TIMEOUT_S, type(call).__name__)
        except EngineError as exc:  # a rank that missed the call no longer holds what rank 0's connector does
            self.failure = self.failure or exc.message
            raise
        for rank, value in enumerate(replies, start=1):
            problem = call.reply_problem(value)
            if problem is not None:
                bad = MalformedMessage(self._where(rank), value, problem, f"reply to {type(call).__name__}")
                self.failure = self.failure or bad.message  # the rank's connector no longer matches rank 0's
                raise bad
        return replies

    def check_health(self) -> None:
        """Raise EngineError naming the rank if a rank actor died or a step call failed."""
        if self.failure is None:
            self._check_pending()
        if self.failure is not None:
            raise EngineError(self.failure, field="parallel.tp", hint="see that rank's log; the instance must restart")

    def rank_engine_ids(self) -> list[str]:
        return list(self._rank_engine_ids)

    def rank_nodes(self) -> list[str]:
        """The address of the node each rank runs on, in rank order (as Ray reports it)."""
        return list(self._nodes)

    # -- watchdog and shutdown -------------------------------------------------------------------
    def _watch(self) -> None:
        ray = self._ray
        watches = dict(self._watches)
        while watches and not self._closing.is_set():
            done, _ = ray.wait(list(watches), num_returns=1, timeout=WATCH_POLL_S)
            for ref in done:
                rank = watches.pop(ref)
                if self._closing.is_set():
                    return
                try:
                    ray.get(ref)
                    why = "shut down while the instance was serving"
                except ray.exceptions.RayError as exc:
                    why = f"is gone (the actor or its node died: {ray_failure(exc)})"
                self.failure = self.failure or f"TP rank {rank} (Ray actor on {self._nodes[rank]}) {why}"
                log.error("%s: the instance cannot serve without it", self.failure)

    def _stop_ranks(self) -> None:
        self._closing.set()
        refs = [a.shutdown.remote() for a in self._actors]
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=SHUTDOWN_TIMEOUT_S)
        if len(ready) < len(refs):
            log.warning("%d TP rank(s) did not leave the group within %.0fs; the launcher removes their actors",
                        len(refs) - len(ready), SHUTDOWN_TIMEOUT_S)

    def shutdown(self) -> None:
        """Ask every rank to leave the group, leave it, free this rank's memory. Idempotent."""
        if self._closing.is_set():
            return
        self._stop_ranks()
        destroy_tp_group()
        self.runner.release()
