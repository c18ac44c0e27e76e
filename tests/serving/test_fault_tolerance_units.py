"""Restart decisions of `pdlaunch serve` (launcher/restart_policy.py): backoff, max_restarts, role grace."""

from __future__ import annotations

import pytest

from pdlaunch.config.launcher_config import SupervisionConfig
from pdlaunch.launcher.restart_policy import (
    MAX_BACKOFF_S,
    GiveUp,
    ProcessRecord,
    Restart,
    RestartPolicy,
    RoleWatch,
    on_exit,
)


def _record(restart: bool = True) -> ProcessRecord:
    return ProcessRecord("decode-1", "decode", "instances[1].restart", restart)


def test_policy_comes_from_the_supervision_config() -> None:
    policy = RestartPolicy.from_config(SupervisionConfig(restart_backoff_seconds=0.5, max_restarts=3,
                                                         role_down_grace_seconds=7))
    assert policy == RestartPolicy(0.5, 3, 7.0)


def test_backoff_doubles_per_failed_restart_and_is_capped() -> None:
    policy = RestartPolicy(1.0, 10, 60)
    assert [policy.delay(k) for k in range(7)] == [1, 2, 4, 8, 16, MAX_BACKOFF_S, MAX_BACKOFF_S]
    assert RestartPolicy(45.0, 3, 60).delay(2) == 45.0  # a configured wait above the cap is kept as is


def test_death_of_a_ready_process_restarts_it_after_the_first_backoff() -> None:
    record = _record()
    decision = on_exit(record, "was killed by signal 9", now=100.0, policy=RestartPolicy(1.5, 5, 60))
    assert decision == Restart(at=101.5, delay=1.5)
    assert record.due == 101.5 and not record.live and record.last_exit == "was killed by signal 9"


def test_restarts_that_die_before_ready_back_off_then_give_up_at_max_restarts() -> None:
    policy = RestartPolicy(1.0, 3, 60)
    record = _record()
    assert isinstance(on_exit(record, "was killed by signal 9", 0.0, policy), Restart)
    delays = []
    for _ in range(2):  # each restart dies before it was ready
        record.due = None
        decision = on_exit(record, "exited with code 1", 0.0, policy)
        assert isinstance(decision, Restart)
        delays.append(decision.delay)
    assert delays == [2.0, 4.0]
    record.due = None
    decision = on_exit(record, "exited with code 1", 0.0, policy)
    assert isinstance(decision, GiveUp)
    assert "decode-1 exited with code 1 before it was ready again" in decision.reason
    assert "3 restart(s) in a row" in decision.reason and "supervision.max_restarts: 3" in decision.reason
    assert record.outage_cause == "was killed by signal 9" and record.last_exit == "exited with code 1"
    assert decision.reason.endswith("the outage began when it was killed by signal 9")


def test_a_restart_that_became_ready_resets_the_failure_count() -> None:
    policy = RestartPolicy(1.0, 2, 60)
    record = _record()
    on_exit(record, "was killed by signal 9", 0.0, policy)
    record.due = None
    assert isinstance(on_exit(record, "exited with code 1", 0.0, policy), Restart)  # 1 failure of 2
    record.due, record.ready = None, True  # the next restart came up and served
    decision = on_exit(record, "was killed by signal 9", 10.0, policy)
    assert decision == Restart(at=11.0, delay=1.0) and record.failures == 0


@pytest.mark.parametrize(("restart", "max_restarts", "field"), [
    (False, 5, "instances[1].restart: false"), (True, 0, "supervision.max_restarts: 0")])
def test_restart_off_gives_up_at_the_first_death(restart: bool, max_restarts: int, field: str) -> None:
    decision = on_exit(_record(restart), "exited with code 1", 0.0, RestartPolicy(1.0, max_restarts, 60))
    assert isinstance(decision, GiveUp) and decision.reason.startswith("decode-1 exited with code 1")
    assert field in decision.reason


def test_role_grace_counts_from_when_the_last_live_process_went() -> None:
    watch = RoleWatch(grace_s=5.0)
    assert watch.overdue({"prefill": True, "decode": False}, now=10.0) is None
    assert watch.overdue({"prefill": True, "decode": False}, now=15.0) is None  # exactly the grace: not yet
    assert watch.down_for("decode", 15.0) == 5.0
    assert watch.overdue({"prefill": True, "decode": False}, now=15.1) == "decode"


def test_role_back_within_grace_resets_the_clock() -> None:
    watch = RoleWatch(grace_s=5.0)
    assert watch.overdue({"decode": False}, now=0.0) is None
    assert watch.overdue({"decode": True}, now=4.0) is None
    assert watch.overdue({"decode": False}, now=6.0) is None
    assert watch.overdue({"decode": False}, now=10.0) is None
    assert watch.overdue({"decode": False}, now=11.5) == "decode" and watch.down_for("decode", 11.5) == 5.5
