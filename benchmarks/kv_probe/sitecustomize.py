"""Stage timestamps of a decode's pulls, for `bench kv-transfer` (put this folder first on PYTHONPATH and set
PDL_PROBE=1; benchmarks/kv_ab_round.sh does). At exit the decode worker prints, per stage, the median ms after
start_load over the timed loads: claim sent, READ posted, the claim's answer read, the READ first seen done, load
done (READ done and claim answered), reported finished. Run one prompt length per process: the medians pool every
load the process made."""

from __future__ import annotations

import atexit
import builtins
import collections
import os
import statistics
import time
from typing import Any

if os.environ.get("PDL_PROBE"):
    marks: dict[str, list[float]] = collections.defaultdict(list)

    def mark(name: str) -> None:
        marks[name].append(time.perf_counter())

    # Stages a load may pass more than once or not at all, each timed from its own load's start (Load.started).
    per_load: dict[str, list[float]] = collections.defaultdict(list)

    def mark_load(name: str, load: Any) -> None:
        per_load[name].append((time.monotonic() - load.started) * 1e3)

    def wrap(cls: Any, meth: str, before: str | None, after: str | None) -> None:
        orig = getattr(cls, meth)

        def timed(*a: Any, **k: Any) -> Any:
            if before:
                mark(before)
            result = orig(*a, **k)
            if after:
                mark(after)
            return result

        setattr(cls, meth, timed)

    def install() -> None:
        from pdlaunch.kv_transfer import agent
        from pdlaunch.kv_transfer.decode import context, pull, side

        wrap(side.DecodeSide, "start_load", "a_start_load", "b_start_load_returned")
        send_claim_read = context.LoadContext.send_claim_read

        def timed_send_claim_read(self: Any, load: Any, *a: Any, **k: Any) -> Any:
            mark("c_claim_send")
            call = send_claim_read(self, load, *a, **k)
            mark("d_claim_sent")
            answer = call.answer

            def timed_answer(reply: Any) -> Any:
                result = answer(reply)
                mark_load("claim answered", load)  # which of the claim's answer and the READ holds a load back
                return result

            call.answer = timed_answer
            return call

        context.LoadContext.send_claim_read = timed_send_claim_read  # type: ignore[method-assign]
        wrap(agent.KVAgent, "transfer", "e_read_post", "f_read_posted")
        if os.environ.get("PDL_PROBE") == "send":  # inside the claim's send: when it takes its kept connection
            from pdlaunch.kv_transfer.side_channel import client
            wrap(client.Connections, "take", "c1_take", "c2_taken")
        progress = pull.PullLoad.progress

        read_done: set[int] = set()

        def timed_progress(self: Any, load: Any, now: float) -> None:
            if load.xfer is not None and id(load) not in read_done and load.xfer.state() == "DONE":
                read_done.add(id(load))
                mark_load("READ first seen done", load)  # by the engine thread's poll
            before = load.state
            progress(self, load, now)
            if load.state != before:
                mark("g_load_done")

        pull.PullLoad.progress = timed_progress  # type: ignore[method-assign]
        get_finished = side.DecodeSide.get_finished

        def timed_get_finished(self: Any) -> Any:
            events = get_finished(self)
            if events.finished_recving:
                mark("h_reported_finished")
            return events

        side.DecodeSide.get_finished = timed_get_finished  # type: ignore[method-assign]

    real_import = builtins.__import__

    def importing(name: str, *a: Any, **k: Any) -> Any:
        module = real_import(name, *a, **k)
        if name == "pdlaunch.kv_transfer.factory" and not marks.get("_installed"):
            marks["_installed"] = [0.0]
            install()
        return module

    builtins.__import__ = importing

    def dump() -> None:
        starts = marks.get("a_start_load", [])
        if len(starts) < 3:
            return
        lines = []
        for name in sorted(k for k in marks if not k.startswith("_")):
            n = min(len(marks[name]), len(starts))
            ms = statistics.median((marks[name][i] - starts[i]) * 1e3 for i in range(1, n))  # the first: warm-up
            lines.append(f"  {name:22s} {ms:8.3f} ms ({len(marks[name])} marks)")
        for name, values in sorted(per_load.items()):
            ms = statistics.median(values)
            lines.append(f"  {name:22s} {ms:8.3f} ms ({len(values)} loads, from each one's start)")
        print(f"probe, decode worker {os.getpid()}, ms after start_load (median):\n" + "\n".join(lines), flush=True)

    atexit.register(dump)
