"""Prefill side: the decode agents this engine knows. Those it pushed to (their full metadata: it
WRITEs into their memory) and those that READ from it (their connection info only, "listen"), so that
a sleep can ask each to drop this engine's metadata ("forget" notification).

Each agent is kept with the decode engine it belongs to (the `reader` of its push or listen request):
when a decode engine dies, its launcher asks us to forget it (`forget_engine`) before it restarts the
instance, since our UCX mapping of its memory would keep that memory allocated on its GPU.
"""

from __future__ import annotations

import logging
import threading

from pdlaunch.kv_transfer.messages import ForgetAnswer, ForgetRequest, ListenAnswer, ListenRequest
from pdlaunch.kv_transfer.notifications import Forget
from pdlaunch.kv_transfer.notifications import encode_notification as encode
from pdlaunch.kv_transfer.transport import TransferAgent

logger = logging.getLogger(__name__)


class DecodePeers:
    def __init__(self, agent: TransferAgent) -> None:
        self.agent = agent
        self._peers: dict[str, tuple[str, str]] = {}  # decode agent name -> (loaded name, its metadata hex)
        self._listeners: dict[str, str] = {}  # decode agents that READ from us: name -> loaded name
        self._engines: dict[str, str] = {}  # decode agent name (of _peers or _listeners) -> its engine id
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The decode agents pushed to (their metadata is loaded here)."""
        with self._lock:
            return sorted(self._peers)

    def engines(self) -> list[str]:
        """The decode engines whose agents are loaded here (pushed to, or reading from us)."""
        with self._lock:
            return sorted(set(self._engines.values()))

    def peer(self, name: str, metadata_hex: str, engine_id: str) -> str:
        """The decode agent `name` (of decode engine `engine_id`) loaded with `metadata_hex`. A decode that woke
        up registered new memory (its staging buffer, or on CPU its KV tensors, moved): its push carries new
        metadata, which replaces the stale one. Under the lock: two pushes of a woken decode must not load it
        twice."""
        with self._lock:
            loaded = self._peers.get(name)
            if loaded is not None and loaded[1] == metadata_hex:
                return loaded[0]
            if loaded is not None:
                self.agent.forget_remote(loaded[0])
            listener = self._listeners.pop(name, None)
            if listener is not None:  # its connection info only: the full metadata replaces it
                self.agent.forget_remote(listener)
            self._peers[name] = (self.agent.add_remote(bytes.fromhex(metadata_hex)), metadata_hex)
            self._engines[name] = engine_id
            return self._peers[name][0]

    def listen(self, message: ListenRequest) -> ListenAnswer:
        """A decode that READs from us (pull) gives its connection info, so that `tell_to_forget` can
        reach it; we never load its memory's metadata in pull mode."""
        with self._lock:
            if message.agent_name not in self._peers and message.agent_name not in self._listeners:
                self._listeners[message.agent_name] = self.agent.add_remote(bytes.fromhex(message.agent_metadata))
                self._engines[message.agent_name] = message.reader
        return ListenAnswer(listening=True)

    def forget(self, message: ForgetRequest) -> ForgetAnswer:
        """A decode agent is about to free the memory it registered (sleep): drop its metadata, so
        that UCX closes the mappings it opened of that memory (a mapped buffer stays allocated)."""
        with self._lock:
            loaded = self._peers.pop(message.agent_name, None)
            if loaded is not None:
                self._engines.pop(message.agent_name, None)
                self.agent.forget_remote(loaded[0])
        return ForgetAnswer(forgot=loaded is not None)

    def forget_engine(self, engine_id: str) -> int:
        """Decode engine `engine_id` died: drop the metadata of each of its agents (pushed to or reading from
        us), so that UCX unmaps its memory (agent.py); returns how many agents went. PrefillSide.forget_engine
        stopped that engine's pushes and ended its holds first; pushes to other engines go on (their agents stay)."""
        forgotten = 0
        with self._lock:
            names = [name for name, engine in self._engines.items() if engine == engine_id]
            for name in names:
                del self._engines[name]
                pushed = self._peers.pop(name, None)  # an agent is pushed to or listening, never both (peer())
                remote = pushed[0] if pushed is not None else self._listeners.pop(name, None)
                if remote is None:
                    continue
                try:
                    self.agent.forget_remote(remote)
                    forgotten += 1
                except Exception as exc:  # noqa: BLE001 (an error type per transport): the others still go
                    logger.warning("could not drop the metadata of decode agent %s (engine %s): %s", remote,
                                   engine_id, exc)
        if forgotten:
            logger.info("dropped the metadata of %d agent(s) of decode engine %s: it ended", forgotten, engine_id)
        return forgotten

    def tell_to_forget(self, kv_epoch: int) -> None:
        """Before this prefill frees the memory it registered (sleep): ask every decode it pushed to
        or that reads from it, by notification, to drop this agent's metadata of `kv_epoch` (their
        mapping of that memory goes with it). A decode that cannot be reached is logged and skipped."""
        with self._lock:
            loaded = [name for name, _ in self._peers.values()] + list(self._listeners.values())
        message = encode(Forget(kind="forget", agent_name=self.agent.name, kv_epoch=kv_epoch))
        for name in loaded:
            try:
                self.agent.notify(name, message)
            except Exception as exc:  # noqa: BLE001 (a NIXL error type per backend): sleep goes on
                logger.warning("could not ask decode agent %s to forget this prefill before sleep: %s", name, exc)
