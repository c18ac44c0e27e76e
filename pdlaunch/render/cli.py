"""`pdlaunch render kubernetes CONFIG --out DIR --image IMAGE`: the deployment as Kubernetes manifests.

The config is checked as a cluster deployment (parsed, roles, per-group TP resolved; `device: auto`
means cuda there, where sleep mode turns the cumem allocator on), with the rules of check-config that hold on any
host, not against this machine: the pods run elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from pdlaunch.config.cli_overrides import Overrides
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.flags import with_serve_options
from pdlaunch.errors import ConfigError, PdlaunchError

if TYPE_CHECKING:
    from pdlaunch.render.model_volume import ModelVolume

render_app = typer.Typer(help="Write a deployment's manifests for a cluster manager.", no_args_is_help=True)


def cluster_config(config: Path | None, overrides: Overrides, gpus_per_node: int) -> DeploymentConfig:
    """The deployment resolved for a cluster whose nodes have `gpus_per_node` GPUs. Raises ConfigError."""
    from pdlaunch.config.flag_names import flag_fields, name_flags
    from pdlaunch.config.loader import load_deployment
    from pdlaunch.config.problems import problem
    from pdlaunch.config.rules.chat_template import chat_template_problems, template_file
    from pdlaunch.config.rules.roles import (
        cache_problems,
        kv_cache_dtype_problems,
        role_problems,
        size_problems,
        stall_timeout_problems,
        tp_support_problems,
    )
    from pdlaunch.config.target_host import TargetHost
    from pdlaunch.config.validate import cumem_problems, device_rules, resolve
    from pdlaunch.render.kubernetes import storage_connector_problems
    from pdlaunch.render.pod_ports import pod_port_problems
    from pdlaunch.render.reshard import reshard_problems

    cfg = load_deployment(config, overrides)
    target = None if cfg.device == "cpu" else TargetHost(gpus=gpus_per_node, gpu_memory_gib=80.0)
    resolved = resolve(cfg, target)
    problems = size_problems(resolved)  # first: the rules below (and the manifests) walk every instance and rank
    if not problems:
        # The rules check-config applies that hold on any host: the pods run the deployment as written, unchecked.
        # cumem_problems also turns the cumem allocator on for sleep mode, as serve's launcher does.
        problems = (role_problems(resolved) + kv_cache_dtype_problems(resolved) + cache_problems(resolved, None)
                    + stall_timeout_problems(resolved) + tp_support_problems(resolved)
                    + device_rules(cfg, resolved.device, target)
                    + cumem_problems(resolved, resolved.device, cuda=resolved.device == "cuda")
                    + pod_port_problems(resolved, gpus_per_node) + storage_connector_problems(resolved)
                    + reshard_problems(resolved, gpus_per_node))
    if template_file(resolved.model.chat_template) is not None:  # carried into the pods as its text: check it here
        problems += chat_template_problems(resolved.model.chat_template)
    if not resolved.model.path.strip():  # `--model "$MODEL"` with MODEL unset: no pod would find a model there
        problems.append(problem("model.path", f"{resolved.model.path!r} names no model", "give the model's path in "
                                "the pod (in the image or on --model-volume), `demo` or `tiny`"))
    if problems:
        raise ConfigError(name_flags(problems, flag_fields(overrides, cfg.instances)))
    return resolved


def _model_volume(cfg: DeploymentConfig, overrides: Overrides, value: str | None,
                  mount_path: str | None) -> ModelVolume | None:
    """The model volume of a well-formed --model-volume, None without one. Raises ConfigError where the pods would
    not find model.path on it (the field named as the user gave it: --model or model.path)."""
    from pdlaunch.config.flag_names import flag_fields, name_flags
    from pdlaunch.render.model_volume import model_volume
    from pdlaunch.render.objects import POD_MOUNTS

    if value is None:
        return None
    volume, problems = model_volume(value, mount_path, cfg.model.path, POD_MOUNTS)
    if problems:
        raise ConfigError(name_flags(problems, flag_fields(overrides, cfg.instances)))
    return volume


@render_app.command("kubernetes")
@with_serve_options
def kubernetes(
    config: Path | None,
    overrides: Overrides,
    # A str, not a Path: typer turns "" into Path("."), and `--out "$DIR"` with DIR unset would write the
    # Secret's file into the current directory.
    out: Annotated[str, typer.Option("--out", metavar="PATH", help="Directory the manifests are written to.")],
    image: Annotated[str, typer.Option("--image", help="Container image with pdlaunch installed (and the model, "
                                                       "unless --model-volume holds it).")],
    name: Annotated[str, typer.Option("--name", help="Prefix of every object's name.")] = "pdlaunch",
    namespace: Annotated[str | None, typer.Option("--namespace", help="Namespace of the objects.")] = None,
    gpus_per_node: Annotated[int, typer.Option(
        "--gpus-per-node", min=1, max=1024,
        help="GPUs of one node: a TP group larger than this runs one rank per pod.")] = 8,
    model_volume: Annotated[str | None, typer.Option(
        "--model-volume", metavar="pvc:CLAIM|hostpath:/DIR",
        help="Volume holding the checkpoint, mounted read-only in every pod that reads it at the directory that "
             "holds model.path (the path inside the pod): a PersistentVolumeClaim, or a node's directory "
             "(single-node labs).")] = None,
    model_mount_path: Annotated[str | None, typer.Option(
        "--model-mount-path", metavar="PATH",
        help="Where the pods mount --model-volume (default: the directory that holds model.path); model.path "
             "must be under it.")] = None,
    cpu_pod_memory: Annotated[str | None, typer.Option(
        "--cpu-pod-memory", metavar="QUANTITY",
        help="Memory request of every CPU engine pod (device cpu), a Kubernetes quantity such as 4Gi (default: "
             "what the instance allocates at start, estimated).")] = None,
    cpu_pod_memory_limit: Annotated[str | None, typer.Option(
        "--cpu-pod-memory-limit", metavar="QUANTITY",
        help="Memory limit of every CPU engine pod (device cpu), at least its request; the kernel kills an "
             "instance above it (default: none).")] = None,
) -> None:
    """Kubernetes manifests of the deployment: a LeaderWorkerSet per instance group, Services, the proxy, a Secret."""
    from pydantic import ValidationError

    from pdlaunch.config.flag_names import flag_fields, name_flags
    from pdlaunch.config.rules.chat_template import template_file
    from pdlaunch.render.ignored import ignored_settings
    from pdlaunch.render.kubernetes import render_kubernetes
    from pdlaunch.render.manifest_files import write_manifests
    from pdlaunch.render.model_volume import volume_flag_problems
    from pdlaunch.render.options import RenderOptions, option_problems
    from pdlaunch.render.pod_resources import cpu_estimates, memory_flag_problems, pod_memory_problems

    console = Console(stderr=True)
    try:
        flag_problems = (option_problems(image, name, namespace) + volume_flag_problems(model_volume, model_mount_path)
                         + memory_flag_problems(cpu_pod_memory, cpu_pod_memory_limit))
        if not out.strip():
            flag_problems.append(("--out", f"{out!r} names no directory; give the directory to write the "
                                  "manifests to, e.g. --out manifests/"))
        if flag_problems:
            raise ConfigError(flag_problems)
        cfg = cluster_config(config, overrides, gpus_per_node)
        volume = _model_volume(cfg, overrides, model_volume, model_mount_path)
        memory_problems = pod_memory_problems(cfg, cpu_pod_memory, cpu_pod_memory_limit, cpu_estimates(cfg))
        if memory_problems:
            raise ConfigError(memory_problems)
        try:
            options = RenderOptions(image=image, name=name, namespace=namespace, gpus_per_node=gpus_per_node,
                                    model_volume=volume, cpu_pod_memory=cpu_pod_memory,
                                    cpu_pod_memory_limit=cpu_pod_memory_limit)
            written = write_manifests(render_kubernetes(cfg, options), Path(out))
        except ValidationError as exc:  # a name Kubernetes refuses (the LeaderWorkerSet model checks it)
            raise PdlaunchError(f"--name {name!r} makes invalid object names: {exc.errors()[0]['msg']}",
                                field="--name", hint="use lowercase letters, digits and '-', starting "
                                "with a letter, at most 40 characters") from None
    except PdlaunchError as exc:
        for line in exc.render().splitlines():
            console.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    for path in written:
        typer.echo(str(path))
    for field, message in name_flags(ignored_settings(cfg), flag_fields(overrides, cfg.instances)):
        console.print(f"[yellow]warning:[/yellow] {escape(field)}: {escape(message)}", highlight=False, soft_wrap=True)
    if cfg.device == "cpu" and cpu_pod_memory is None and cpu_estimates(cfg) is None:
        console.print(f"the CPU pods' memory requests count their KV cache and runtime but not the weights: the "
                      f"checkpoint {escape(cfg.model.path)} is not readable on this machine (its config.json or .gguf "
                      "header sizes them); add the weights' size to each engine pod's `resources.requests.memory`, "
                      "or render where the checkpoint is at model.path too", highlight=False, soft_wrap=True)
    if (template := template_file(cfg.model.chat_template)) is not None:
        console.print(f"the pods carry the text of the chat template {escape(str(template))} (a file of this "
                      "machine): render again after changing it", highlight=False, soft_wrap=True)
    shown = escape(out)
    console.print(f"{len(written)} manifests in {shown}: `kubectl apply -f {shown}` (needs the LeaderWorkerSet "
                  "controller, https://lws.sigs.k8s.io)", highlight=False, soft_wrap=True)
