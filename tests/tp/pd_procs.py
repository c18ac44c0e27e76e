"""Prefill and decode LLMEngines of chosen TP sizes, each in its own (non-daemon) process.

Non-daemon because an engine with tp > 1 spawns its worker ranks; the engine process reaps them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pdlaunch.config.deployment_config import InstanceSpec
from tests.kv_transfer.engine_procs import EngineProcess, build_engine, pd_config
from tests.kv_transfer.rpc import ProcessRPC, _serve, context


class TPEngineProcess(EngineProcess):
    def __init__(self, config, instance: InstanceSpec) -> None:  # type: ignore[no-untyped-def]
        ctx = context()
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, build_engine,
                                                     (config.model_dump_json(), instance.model_dump_json())),
                                daemon=False)
        self.proc.start()
        try:
            self.info = self._result("start")
        except BaseException:
            ProcessRPC.close(self)
            raise


def tp_pd_pair(model: Path, prefill_tp: int, decode_tp: int, mode: str = "pull", lease_s: float = 60.0,
               **overrides: object) -> Iterator[tuple[TPEngineProcess, TPEngineProcess]]:
    """Yields once: (prefill, decode) engine processes of those TP sizes (`overrides`: config fields, as
    build_config takes them); both closed afterwards."""
    config = pd_config(str(model), "nixl", mode, **overrides)
    config.kv_transfer.kv_lease_seconds = lease_s
    prefill = TPEngineProcess(config, InstanceSpec(role="prefill", port=1, tp=prefill_tp,
                                                   engine_id=f"P-tp{prefill_tp}"))
    try:
        decode = TPEngineProcess(config, InstanceSpec(role="decode", port=2, tp=decode_tp,
                                                      engine_id=f"D-tp{decode_tp}"))
        try:
            yield prefill, decode
        finally:
            decode.close()
    finally:
        prefill.close()
