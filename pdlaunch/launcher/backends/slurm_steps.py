"""The srun steps of a `--backend slurm` deployment in its job: their names, and the cancel of a step whose srun
client was killed (launcher/backends/slurm.py's stop, when a client did not exit on SIGTERM).

srun's shepherd, which cancels a step when its client dies, is in the client's process group, so the group's
SIGKILL ends it too: the step would run on in the allocation with its node's instances (and maybe the proxy).
Such a step is found in the job by its name and the pid of the srun that started it (`scontrol show step`: a
second deployment in the same allocation uses the same names) and cancelled with `scancel JOB.STEP`.
"""

from __future__ import annotations

import subprocess
import time

from rich.console import Console
from rich.markup import escape

from pdlaunch.errors import exit_text
from pdlaunch.launcher.process import ChildProcess
from pdlaunch.launcher.readiness import POLL_S

SLURM_CALL_TIMEOUT_S = 30.0  # one scontrol/scancel call (a busy slurmctld answers slowly)
CANCEL_WAIT_S = 60.0  # a cancelled step leaves the job once slurmd has killed its processes (2-3 s seen)


def step_name(node: int) -> str:
    return f"pdlaunch-node{node}"


class SlurmCallError(Exception):
    """A scontrol/scancel call that failed or did not answer; the message says which and why."""


def slurm_call(*argv: str) -> str:
    """Run a SLURM command; its stdout. Raises SlurmCallError."""
    command = " ".join(argv)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=SLURM_CALL_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise SlurmCallError(f"`{command}` did not answer within {SLURM_CALL_TIMEOUT_S:.0f}s") from exc
    except OSError as exc:
        raise SlurmCallError(f"`{command}`: {exc.strerror or exc}") from exc
    if done.returncode != 0:
        said = " ".join((done.stderr.strip() or done.stdout.strip()).split())
        raise SlurmCallError(f"`{command}` {exit_text(done.returncode)}: {said}")
    return done.stdout


def job_steps(job: str) -> dict[str, tuple[str, int | None]]:
    """The job's steps slurmctld still lists: step id ("7.1") -> (name, pid of the srun that started it).
    scontrol, not squeue: only it says which srun started a step, so another launcher's steps of the same
    name (a second deployment in the allocation) are told apart. Raises SlurmCallError."""
    try:
        text = slurm_call("scontrol", "show", "step", job, "--oneliner")
    except SlurmCallError as exc:
        # scontrol exits 1 for a job without steps ("Job step 7. not found") or one that ended
        if "not found" in str(exc) or "Invalid job id" in str(exc):
            return {}
        raise
    listed: dict[str, tuple[str, int | None]] = {}
    for line in text.splitlines():  # "StepId=7.1 ... Name=pdlaunch-node0 ... SrunHost:Pid=login1:4242"
        fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
        pid = fields.get("SrunHost:Pid", "").rpartition(":")[2]
        if "StepId" in fields:
            listed[fields["StepId"]] = (fields.get("Name", ""), int(pid) if pid.isdigit() else None)
    return listed


def cancel_left_steps(console: Console, steps: list[ChildProcess], job: str) -> tuple[list[str], list[str]]:
    """After the kill: a step whose srun client did not end it (the client killed by a signal, here SIGKILL
    when it did not exit on SIGTERM, or not even reaped) may run on in the job with its node's processes;
    srun's shepherd, which would cancel it, died with the client's process group. Cancel each such step of
    this launcher (its name and its srun's pid) through SLURM, `scancel JOB.STEP` (SIGKILL to the step's
    processes at once), and wait up to CANCEL_WAIT_S for them to leave the job. Returns the ids cancelled
    (not one whose scancel failed and that ended by itself), and what may still run (after an error printed
    with the command to run by hand)."""
    orphans = {step.pid: step for step in steps
               if step.pid is not None and ((code := step.poll()) is None or code < 0)}
    if not orphans:
        return [], []
    try:
        listed = job_steps(job)
    except SlurmCallError as exc:
        names = [step_name(steps.index(step)) for step in orphans.values()]
        console.print(f"[red]error:[/red] could not list job {job}'s steps to cancel what the killed srun clients "
                      f"left ({escape(str(exc))}): find {', '.join(names)} in `squeue -s -j {job}` and run "
                      f"`scancel {job}.STEP` for each", highlight=False, soft_wrap=True)
        return [], names
    ours = {step_id: orphans[pid] for step_id, (name, pid) in listed.items()
            if pid in orphans and name == step_name(steps.index(orphans[pid]))}
    failed: dict[str, str] = {}
    for step_id, step in ours.items():
        how = step.describe_exit() if step.poll() is not None else "did not end even on SIGKILL"
        console.print(f"{step.name}'s srun client {how} and left its step {step_id} running in job {job}: "
                      f"cancelling it (scancel {step_id})", highlight=False, soft_wrap=True)
        try:
            slurm_call("scancel", step_id)
        except SlurmCallError as exc:
            failed[step_id] = str(exc)  # it may have ended meanwhile: the job's steps say
    remaining, deadline, unlisted = set(ours), time.monotonic() + CANCEL_WAIT_S, ""
    while remaining:
        try:
            remaining &= set(job_steps(job))
            unlisted = ""
        except SlurmCallError as exc:
            unlisted = str(exc)
        if not remaining or time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    for step_id in sorted(remaining):
        why = (failed.get(step_id) or unlisted
               or f"it is still in the job {CANCEL_WAIT_S:.0f}s after `scancel {step_id}`")
        console.print(f"[red]error:[/red] could not cancel step {step_id} ({ours[step_id].name}'s) of job {job}: "
                      f"{escape(why)}; run `scancel {step_id}` by hand (`squeue -s -j {job}` lists the job's steps)",
                      highlight=False, soft_wrap=True)
    # a step whose scancel failed but that left the job ended by itself: not "cancelled through SLURM"
    return ([step_id for step_id in ours if step_id not in remaining and step_id not in failed],
            sorted(f"step {s}" for s in remaining))
