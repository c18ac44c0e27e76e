"""A process whose restarts keep failing under a large supervision.max_restarts (a user who wants serve to keep
trying) waits MAX_BACKOFF_S between them for as long as it takes: the backoff never overflows into a traceback
that ends serve (after 1024 failures in a row, about 8.5 hours at 30 s each)."""

from __future__ import annotations

from pdlaunch.launcher.restart_policy import MAX_BACKOFF_S, ProcessRecord, Restart, RestartPolicy, on_exit


def test_thousands_of_failed_restarts_keep_the_capped_backoff() -> None:
    policy = RestartPolicy(backoff_s=0.5, max_restarts=100_000, grace_s=1e9)
    record = ProcessRecord("decode-0", "decode", "instances[1].restart", restart=True)
    now = 0.0
    decision = on_exit(record, "was killed by signal 9", now, policy)  # it was ready: the outage begins
    for _ in range(2000):
        assert isinstance(decision, Restart)
        now = decision.at
        decision = on_exit(record, "exited with code 3", now, policy)  # each restart dies before it is ready
    assert isinstance(decision, Restart) and decision.delay == MAX_BACKOFF_S and record.failures == 2000
    assert record.outage_cause == "was killed by signal 9"
