"""`TPExecutor`: an engine's model on a TP group (tp > 1), driven from the engine process, TP rank 0.

It starts the group (tp_startup.py), then hands every step's inputs to the other ranks over their links
(the messages of messages.py), runs its own shard, and returns the logits it samples from; the scheduler's
connector calls are mirrored to every rank's connector the same way. A rank that dies fails the next step
with an error naming the rank and the reason it sent (the watchdog, tp_watchdog.py); a collective that a
dead rank never joins fails with gloo at once and with NCCL at COLLECTIVE_TIMEOUT_S.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time

import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.distributed.message_stream import MessageStalled, UnexpectedMessage, check_reply, send
from pdlaunch.distributed.messages import ConnectorCall, Execute, Message, RankFailed
from pdlaunch.distributed.parallel_state import destroy_tp_group
from pdlaunch.distributed.tp_connector import TPConnector
from pdlaunch.distributed.tp_ranks import DEATH_REPORT_WAIT_S
from pdlaunch.distributed.tp_startup import SEND_TIMEOUT_S, start_group
from pdlaunch.distributed.tp_watchdog import watch
from pdlaunch.errors import EngineError
from pdlaunch.kv_transfer.base import KVConnector
from pdlaunch.model.checkpoint import Checkpoint
from pdlaunch.runner.step_inputs import StepInputs

log = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 30.0  # a rank that does not answer a connector call within this is failed


class TPExecutor:
    """tp > 1: this process is rank 0 of the instance's TP group."""

    def __init__(self, config: DeploymentConfig, instance: InstanceSpec | None, checkpoint: Checkpoint,
                 device: torch.device, dtype: torch.dtype, max_model_len: int, dtype_name: str) -> None:
        self.tp_size = instance.tp if instance is not None else config.parallel.tp
        self.failure: str | None = None
        group = start_group(config, instance, checkpoint, device, dtype, max_model_len, dtype_name)
        self._ranks = group.ranks
        self._store = group.store
        self._hosts = group.hosts
        self.runner = group.rank0.runner
        self.engine_id = group.rank0.engine_id
        self._rank_engine_ids = [self.engine_id] + [r.engine_id for r in group.ready]
        self._side_ports: list[int | None] = [None, *(r.side_channel_port for r in group.ready)]
        self._side_hosts: list[str | None] = [None, *(r.side_channel_host for r in group.ready)]
        self._watchdog = threading.Thread(target=watch, args=(self._ranks, self._fail), name="pdlaunch-tp-watchdog",
                                          daemon=True)
        self._watchdog.start()
        # A process that ends without shutdown() would wait at exit for good: multiprocessing's exit handler (run after
        # this one: registered first) SIGTERMs the workers, which ignore it (worker.py), then joins them unbounded.
        atexit.register(self._ranks.stop)
        log.info("TP group of %d ranks ready (local worker pids %s, ranks on other nodes: %s)", self.tp_size,
                 [p.pid for p in self._ranks.procs.values()], self._ranks.remote or "none")

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        self.check_health()
        self._send_all(Execute(inputs))
        try:
            return self.runner.run(inputs)
        except RuntimeError as exc:
            raise self._rank_failure(exc) from exc

    def _send_all(self, message: Message) -> None:
        for rank, conn in enumerate(self._ranks.links, start=1):
            try:
                send(conn, message)
            except BlockingIOError as exc:
                stuck = TimeoutError(f"it took none of {type(message).__name__} within {SEND_TIMEOUT_S:.0f}s "
                                     "(hung or stopped)")
                raise self._rank_failure(stuck, rank) from exc
            except OSError as exc:
                raise self._rank_failure(exc, rank) from exc

    def _fail(self, message: str) -> None:
        self.failure = self.failure or message  # the first failure is the cause (a RankFailed _mirror read)

    def _rank_failure(self, exc: BaseException, rank: int | None = None) -> EngineError:
        if self.failure is None:  # a link read stopped mid-message is out of step: nothing more is read there
            self._read_sent_reason(skip=rank if isinstance(exc, MessageStalled) else None)
        deadline = time.monotonic() + DEATH_REPORT_WAIT_S
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if isinstance(exc, MessageStalled):  # it names the rank already
            message = self.failure or str(exc)
        else:
            message = self.failure or (f"{self._ranks.where(rank)} is unreachable: {exc}" if rank is not None
                                       else f"a TP collective failed: {exc}{self._ranks.stopped()}")
        self.failure = message
        return EngineError(message, field="parallel.tp", hint="see that rank's log; the instance must restart")

    def _read_sent_reason(self, skip: int | None) -> None:
        """Fail with the reason a rank sent (RankFailed) that waits unread on its link. A rank sends it before it
        leaves the group, so it is there once a collective failed for that; the watchdog names the rank only once
        its process ended, after a teardown (connector, memory, interpreter) that may outlast DEATH_REPORT_WAIT_S."""
        for rank, conn in enumerate(self._ranks.links, start=1):
            try:
                pending = rank != skip and conn.poll(0)
            except OSError:  # closed here already
                continue
            reason = self._ranks.drain_reason(rank, conn) if pending else None
            if reason is not None:
                self._fail(f"{reason} (sent by {self._ranks.where(rank)})")
                return

    def wrap_connector(self, connector: KVConnector) -> KVConnector:
        """Rank 0's connector, with every scheduler-side call mirrored to the other ranks' connectors."""
        return TPConnector(connector, self.tp_size, self._mirror, self._side_ports, self._side_hosts)

    def _mirror(self, call: ConnectorCall) -> list[object]:
        """Make `call` on the connector of every rank > 0 (in step order); their replies if it has any."""
        self.check_health()
        self._send_all(call)
        if call.reply_type is None:
            return []
        replies: list[object] = []
        for rank, conn in enumerate(self._ranks.links, start=1):
            if not conn.poll(REPLY_TIMEOUT_S):
                raise self._rank_failure(TimeoutError(
                    f"no answer to {type(call).__name__} within {REPLY_TIMEOUT_S:.0f}s"), rank)
            try:
                message = self._ranks.read_reply(rank, conn, call)
                if isinstance(message, RankFailed):  # the rank exits right after: the instance cannot serve on
                    self._fail(message.message)
                    raise EngineError(message.message, field="parallel.tp", hint=f"see {self._ranks.log_of(rank)}; "
                                      "the instance must restart")
                replies.append(check_reply(call, message, self._ranks.where(rank)))
            except (EOFError, OSError) as exc:  # raised with the link's lock released: the watchdog may name it
                raise self._rank_failure(exc, rank) from exc
            except UnexpectedMessage as exc:  # unreadable, or no answer to `call`: the later ranks' replies stay
                self._fail(exc.message)  # unread, their links out of step (a later call would take them as its own)
                raise
        return replies

    def check_health(self) -> None:
        """Raise EngineError naming the rank if a worker died."""
        if self.failure is not None:
            raise EngineError(self.failure, field="parallel.tp", hint="see that rank's log; the instance must restart")

    def rank_engine_ids(self) -> list[str]:
        """engine_id as each rank holds it, in rank order."""
        return list(self._rank_engine_ids)

    def rank_nodes(self) -> list[str]:
        """The configured node address of each rank when the group spans nodes; else [] (/info: the host)."""
        return list(self._hosts)

    def shutdown(self) -> None:
        """Stop and reap every worker, leave the group, free this rank's memory. Idempotent."""
        if self._ranks.closing.is_set() and not self._ranks.links:
            return
        atexit.unregister(self._ranks.stop)
        self._ranks.stop()
        self._ranks.procs = {}
        self._ranks.links = []
        destroy_tp_group()
        self.runner.release()
