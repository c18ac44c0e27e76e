"""The `pdlaunch` command: one function per command, wiring only.

Every command turns a PdlaunchError into one readable message and exit code 1 (never a traceback
for a user mistake). The work lives in the modules each command calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from pdlaunch import __version__
from pdlaunch.bench.cli import bench_app
from pdlaunch.config.command_line import PdlaunchGroup, parse_strictly
from pdlaunch.config.flags import with_serve_options
from pdlaunch.errors import ConfigError, PdlaunchError
from pdlaunch.render.cli import render_app

if TYPE_CHECKING:
    from pdlaunch.config.deployment_config import DeploymentConfig

app = typer.Typer(
    name="pdlaunch",
    help="Launch and run disaggregated prefill/decode LLM serving from one command.",
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=PdlaunchGroup,
)
config_app = typer.Typer(help="Config schema and examples.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
app.add_typer(render_app, name="render")

err_console = Console(stderr=True)
T = TypeVar("T")  # what a stoppable piece of work returns (_unless_stopped)
U = TypeVar("U")  # what comes of it
STOPPED_CHECK_EXIT = 130  # check-config stopped by a signal: no verdict (128 + SIGINT, as a shell reports it)


@contextmanager
def _leaving_ray() -> Iterator[None]:
    """A command that used Ray leaves the cluster itself as it exits, a stop signal from then on ending it at once
    with the command's status (launcher/backends/ray_connect_stop.py: Ray's own atexit hook printed a traceback on a
    Ctrl-C after check-config's verdict)."""
    try:
        yield
    except typer.Exit as exc:
        from pdlaunch.launcher.backends.ray_connect_stop import leave_ray_cluster

        leave_ray_cluster(err_console, exc.exit_code)
        raise


@contextmanager
def _reported() -> Iterator[None]:
    """A PdlaunchError leaves as its message and exit code 1, never as a traceback."""
    try:
        yield
    except PdlaunchError as exc:
        for line in exc.render().splitlines():
            err_console.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None


def _run_deployment(config: Path | None, overrides: dict[str, Any], run: Callable[[DeploymentConfig], int]
                    ) -> NoReturn:
    """Validate the deployment, `run` it, and exit with the code it returns."""
    from pdlaunch.config.flag_names import flag_fields
    from pdlaunch.config.flag_terms import flag_names_exported, name_error

    with _leaving_ray(), _reported():
        cfg: DeploymentConfig | None = None
        try:
            cfg = _loaded_unless_stopped(config, overrides)
            if cfg is None:
                raise typer.Exit(code=0)
            # The instances' start-up errors name the flags too: they read the names from their environment.
            with flag_names_exported(flag_fields(overrides, cfg.instances)):
                code = run(cfg)
        except PdlaunchError as exc:
            # The launcher and the backends name a config path (`proxy.port`); the user typed a flag (`--port`).
            # A ConfigError's problems are named already.
            if not isinstance(exc, ConfigError):
                name_error(exc, flag_fields(overrides, cfg.instances if cfg is not None else None))
            raise
        raise typer.Exit(code=code)


def _loaded_unless_stopped(config: Path | None, overrides: dict[str, Any]) -> DeploymentConfig | None:
    """The validated deployment, or None when Ctrl-C/SIGTERM/SIGHUP came while it was loaded (_unless_stopped;
    the caller exits 0, as a stop later on does: nothing was started)."""
    from pdlaunch.config.loader import load_valid_deployment

    return _unless_stopped(lambda: load_valid_deployment(config, overrides), lambda cfg: cfg, stopped_exit=0,
                           overrides=overrides)


def _unless_stopped(work: Callable[[], T], then: Callable[[T], U], stopped_exit: int, overrides: Mapping[str, object]
                    ) -> U | None:
    """`then(work())` (loading or checking a deployment, then what comes of it), or None when Ctrl-C/SIGTERM/SIGHUP
    came during `work`: one line says so (nothing was started; the caller exits with `stopped_exit`). A stop signal
    during `then` is too late to stop anything: the work is done (check-config has its verdict), so it is let pass.
    With --backend ray the work includes Ray calls (the connect, the node list, the GPU probe), each in a helper
    thread (config/ray_thread.py); a stop signal during one ends this process at once, with `stopped_exit`, after
    its own line (launcher/backends/ray_connect_stop.py: a cut-short Ray call must not be torn down), which names
    the settings as the user typed them (`overrides`: the flags)."""
    from pdlaunch.config.flag_names import flag_fields
    from pdlaunch.config.ray_thread import cut_short
    from pdlaunch.launcher.backends.ray_connect_stop import leave_stopped_ray
    from pdlaunch.launcher.serve import StopRequested, StopSignals

    with StopSignals() as signals:
        try:
            with signals.raising():
                done = work()
        except StopRequested:
            name = signals.signal_name
        else:
            return then(done)  # outside raising(): a signal now is only noted, and the handlers go back after
        doing = cut_short()
        if doing is not None:
            leave_stopped_ray(err_console, name, doing, stopped_exit, flag_fields(overrides, None))
    err_console.print(f"{name} received while loading the deployment; stopping (nothing was started)",
                      highlight=False, soft_wrap=True)
    return None


def _print(text: str, what: str) -> None:
    """`text` on stdout; a stdout that cannot take it (a full disk, a closed file) is an error, not a traceback."""
    with _reported():
        try:
            typer.echo(text)
        except OSError as exc:
            raise PdlaunchError(f"cannot write the {what} to standard output: {exc.strerror or exc}",
                                field="stdout", hint="redirect it (`> FILE`) to a file you can write") from None


def _version(value: bool) -> None:
    if value:
        _print(f"pdlaunch {__version__}", "version")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """pdlaunch: prefill instances, decode instances and an OpenAI-compatible proxy, from one command."""


@app.command()
@with_serve_options
def serve(config: Path | None, overrides: dict[str, Any]) -> None:
    """Start prefill and decode instances plus the proxy; Ctrl-C stops everything."""
    from pdlaunch.launcher.backends import run_deployment

    _run_deployment(config, overrides, run_deployment)


@app.command("check-config")
@with_serve_options
def check_config(
    config: Path | None,
    overrides: dict[str, Any],
    json_output: Annotated[bool, typer.Option("--json", help="Print {valid, problems, config} as JSON.")] = False,
    target_gpus: Annotated[int | None, typer.Option("--target-gpus", help="Check as if on a host with N GPUs.")] = None,
    target_gpu_memory: Annotated[float | None, typer.Option("--target-gpu-memory", help="GiB per GPU there.")] = None,
) -> None:
    """Validate a deployment without starting anything: exit 0 valid, 1 invalid."""
    from pdlaunch.config.check import check_report, print_report

    with _leaving_ray():
        with _reported():
            # the check may be stopped (exit 130: no verdict); once it is done, its report and verdict are printed
            # and kept whatever signal comes
            code = _unless_stopped(lambda: check_report(config, overrides, target_gpus, target_gpu_memory),
                                   lambda report: print_report(report, json_output), stopped_exit=STOPPED_CHECK_EXIT,
                                   overrides=overrides)
        # a stop signal after the verdict (while the driver leaves the cluster) keeps the verdict's status
        raise typer.Exit(code=STOPPED_CHECK_EXIT if code is None else code)


@app.command()
@with_serve_options
def smoke(config: Path | None, overrides: dict[str, Any]) -> None:
    """Launch a deployment, check PD answers against colocated ones, exit 0 or 1 (for CI)."""
    from pdlaunch.launcher.smoke import run_smoke

    _run_deployment(config, overrides, run_smoke)


@app.command()
def generate(
    model_arg: Annotated[
        str | None, typer.Argument(metavar="MODEL", help="The model, as --model (either spelling, not both).",
                                   show_default=False)
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="HF checkpoint directory, FILE.gguf, `demo` or `tiny` "
                                 "(default: demo).", show_default=False)
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")] = "auto",
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A prompt; repeat for more.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens to generate per prompt.")] = 32,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.0,
    dtype: Annotated[str, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16.")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per prompt per line.")] = False,
    quantization: Annotated[str | None, typer.Option("--quantization", help="fp8: FP8 weights quantized at load.")
                            ] = None,
    kv_cache_dtype: Annotated[str, typer.Option("--kv-cache-dtype", help="auto | fp8.")] = "auto",
    chat: Annotated[bool, typer.Option("--chat", help="Each prompt is a user message, rendered with the model's "
                                       "chat template (as /v1/chat/completions); without it the prompt is raw text "
                                       "(as /v1/completions).")] = False,
) -> None:
    """Offline generation with the engine (no server)."""
    from pdlaunch.engine.llm import run_generate

    with _reported():
        for flag, given in (("MODEL", model_arg), ("--model", model)):
            if given is not None and not given.strip():  # an unset shell variable: not the demo model
                raise PdlaunchError(f"{given!r} names no model", field=flag,
                                    hint="give a checkpoint directory, a FILE.gguf, `demo` or `tiny`")
        if model_arg is not None and model is not None and model_arg != model:
            raise PdlaunchError(f"MODEL {model_arg!r} and --model {model!r} name two models; give one of them",
                                field="--model")
        run_generate(model_arg or model or "demo", device, prompt or ["Hello, my name is"], max_tokens, temperature,
                     dtype, json_output, {"quantization": quantization, "kv_cache_dtype": kv_cache_dtype},
                     model_flag="MODEL" if model_arg is not None else "--model", chat=chat)


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of the deployment config."""
    import json

    from pdlaunch.config.deployment_config import DeploymentConfig

    _print(json.dumps(DeploymentConfig.model_json_schema(), indent=2), "schema")


@config_app.command("example")
def config_example() -> None:
    """Print a commented example deployment YAML."""
    from pdlaunch.config.loader import example_yaml

    _print(example_yaml(), "example")


parse_strictly(app)


def main() -> None:
    app()
