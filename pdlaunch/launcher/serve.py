"""`pdlaunch serve`: start a deployment, supervise it, stop it cleanly.

Exit codes: 0 after Ctrl-C/SIGTERM (in-flight requests drained, children reaped, ports free);
1 when startup failed, or while serving (launcher/supervisor.py) when a dead process may not be
restarted, its restarts keep failing, or a role stayed without a live instance past the grace
(named, with its log file and last log lines).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from rich.console import Console
from rich.markup import escape

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.proxy_workers import workers_text
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.log_tail import LogUnreadable
from pdlaunch.launcher.output import LossyOutput
from pdlaunch.launcher.process import ChildProcess
from pdlaunch.launcher.readiness import ChildExited
from pdlaunch.launcher.supervisor import SupervisionFailed, Supervisor
from pdlaunch.model.demo import resolve_model_path
from pdlaunch.signal_flag import SignalFlag

SUPERVISE_POLL_S = 0.2
LOG_TAIL_LINES = 20


_Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None  # what signal.signal returns


class StopRequested(BaseException):
    """A stop signal inside StopSignals.raising(): the work under way ends (not an Exception: no `except
    Exception` in that work may swallow it)."""


class StopSignals:
    """SIGINT/SIGTERM/SIGHUP (or the `signals` given) set a flag instead of raising (inside `raising()` they raise
    as well); a second signal asks to skip the drain. A SIGHUP that is ignored (nohup) stays ignored. `requested` is
    a SignalFlag: a threading.Event set by the handler hung the launcher for good when the signal landed inside its
    own wait."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)) -> None:
        self.signals = signals
        self.requested = SignalFlag()
        self.forced = False
        self.signal_name = ""
        self.on_second: Callable[[], None] | None = None  # said once when a second signal hurries the stop
        self._previous: dict[int, _Handler] = {}
        self._raising = False

    def _handle(self, signum: int, _: FrameType | None) -> None:
        if self.requested.is_set() and not self.forced:
            self.forced = True
            if self.on_second is not None:
                self.on_second()
        self.signal_name = signal.Signals(signum).name
        self.requested.set()
        if self._raising:
            self._raising = False  # once: the cleanup of the work it ends is not cut short by a second signal
            raise StopRequested(self.signal_name)

    def check(self) -> None:
        """StopRequested when a stop signal came: for the points between steps of work that looks at no flag."""
        if self.requested.is_set():
            raise StopRequested(self.signal_name)

    @contextmanager
    def raising(self) -> Iterator[None]:
        """Inside the block a stop signal also raises StopRequested: for work that never looks at `requested`
        and may take minutes (fetching or converting the model)."""
        self.check()
        self._raising = True
        try:
            yield
        finally:
            self._raising = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                    continue  # started under nohup: a closed terminal must not stop the deployment
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def report_failure(console: Console, message: str, child: ChildProcess) -> None:
    console.print(f"[red]error:[/red] {escape(message)}; stopping the deployment", highlight=False, soft_wrap=True)
    try:
        lines = child.tail(LOG_TAIL_LINES)
    except LogUnreadable as exc:  # a hung file system: said, and the stop goes on
        console.print(f"{child.name}: {exc}", highlight=False, markup=False, soft_wrap=True)
        return
    if lines:
        console.print(f"last {len(lines)} lines of {child.log_path}:", highlight=False, markup=False, soft_wrap=True)
        for line in lines:
            console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)


def report_child_exit(console: Console, exc: ChildExited) -> None:
    report_failure(console, exc.message, exc.child)


def run_serve(cfg: DeploymentConfig) -> int:
    # soft_wrap: without a TTY (nohup, systemd) rich wrapped every line at 80 columns, splitting one message over two
    # log lines (`...then stopping; Ctrl-C` / `again to stop at once`) that a grep for it then missed. LossyOutput: a
    # status line that cannot be written (a full disk, a closed pipe) is lost, not the deployment (output.py).
    console = Console(soft_wrap=True, file=LossyOutput(sys.stdout).as_text_io())
    deployment = Deployment(cfg, console)
    with StopSignals() as signals:
        try:
            if not _model_fetched(console, deployment, signals):
                console.print(f"{signals.signal_name} received while fetching or converting the model; stopping")
                deployment.stop(drain=False)
                return _say_stopped(console, deployment)
            if not deployment.start(should_stop=signals.requested.is_set):
                console.print(f"{signals.signal_name or 'stop'} received while starting; stopping")
                deployment.stop(drain=not signals.forced, hurry=lambda: signals.forced)
                return _say_stopped(console, deployment)
            _announce(console, deployment)
            with Supervisor(deployment, console) as supervisor:
                while not signals.requested.wait(SUPERVISE_POLL_S):
                    supervisor.tick()
            console.print(f"{signals.signal_name} received: draining in-flight requests "
                          f"(up to {deployment.drain_timeout_s:g}s), then stopping; Ctrl-C again to stop at once",
                          highlight=False)
            signals.on_second = lambda: console.print("second signal: stopping now", highlight=False)
            deployment.stop(drain=not signals.forced, hurry=lambda: signals.forced)
            return _say_stopped(console, deployment)
        except (ChildExited, SupervisionFailed) as exc:
            report_failure(console, exc.message, exc.child)
            deployment.stop(drain=False)
            return 1
        except PdlaunchError:
            deployment.stop(drain=False)
            raise
        finally:
            deployment.stop(drain=not signals.forced)


def _model_fetched(console: Console, deployment: Deployment, signals: StopSignals) -> bool:
    """Fetch or convert a built-in or GGUF model (cached: start() then finds it at once) where a stop signal
    ends it; False when one did."""
    try:
        with signals.raising():
            resolve_model_path(deployment.cfg.model.path, say=lambda text: console.print(f"[dim]{text}[/dim]"))
    except StopRequested:
        return False
    return True


def _say_stopped(console: Console, deployment: Deployment) -> int:
    """0 and "all processes reaped" when they were; 1 naming the ones a SIGKILL left running."""
    if not deployment.left_running:
        console.print("stopped: all processes reaped", highlight=False)
        return 0
    console.print(f"[red]error:[/red] stopped, but {', '.join(deployment.left_running)} still run(s) after SIGKILL "
                  "(stuck in the kernel: a device or network filesystem wait); `ps -o pid,stat,wchan -p PID` shows "
                  "where, and they may still hold their ports and GPU memory", highlight=False, soft_wrap=True)
    return 1


def _announce(console: Console, deployment: Deployment) -> None:
    if deployment.proxy_url is None:
        console.print(f"node {deployment.cfg.parallel.node_rank}: instances ready; the proxy runs on node 0")
        return
    console.print(f"[green]ready[/green]: OpenAI API at [bold]{deployment.proxy_url}/v1[/bold] "
                  f"(model {deployment.cfg.model.path!r}; proxy workers {workers_text(deployment.cfg.proxy.workers)}; "
                  f"logs in {deployment.log_dir}); Ctrl-C to stop",
                  soft_wrap=True)
