"""What each child process of a deployment runs: the command lines of an instance, a remote TP rank and the
proxy, and the environment they get (secrets only there, never in an argv that `ps` shows)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pdlaunch.config.deployment_config import DeploymentConfig, proxy_policy_args
from pdlaunch.kv_transfer.push_params import PREFILL_SIDE_CHANNELS_ENV
from pdlaunch.launcher.deployment_secret import SECRET_ENV
from pdlaunch.launcher.plan import DeploymentPlan, InstancePlan, RemoteRankPlan
from pdlaunch.model.demo import resolve_model_path

API_KEY_ENV = "PDLAUNCH_API_KEY"
# The proxy's directory for its worker supervisor's metrics files and load board (proxy/workers.py), new for every
# start and removed by the launcher once the proxy is reaped (ChildProcess's tmp_dir_flag)
PROXY_TMP_DIR_FLAG = "--tmp-dir"


def instance_argv(deployment_file: Path, plan: InstancePlan) -> list[str]:
    return [sys.executable, "-m", "pdlaunch.server", "--deployment", str(deployment_file),
            "--instance", plan.spec.model_dump_json(), "--parent-pid", str(os.getpid())]


def rank_argv(deployment_file: Path, plan: RemoteRankPlan) -> list[str]:
    return [sys.executable, "-m", "pdlaunch.distributed.remote_rank", "--deployment", str(deployment_file),
            "--instance", plan.spec.model_dump_json(), "--rank", str(plan.rank),
            "--placement", plan.placement.model_dump_json()]


def prefill_side_channels_env(cfg: DeploymentConfig, plan: DeploymentPlan) -> dict[str, str]:
    """Decode instances learn the prefill side channels of the deployment (the addresses the prefills'
    answers name): params without a signature may point only there (kv_transfer/push_params.py)."""
    bound = cfg.kv_transfer.side_channel_host
    channels = [f"{p.spec.host if bound in ('', '0.0.0.0', '::') else bound}:{p.spec.side_channel_port}"
                for p in plan.instances if p.spec.role == "prefill" and p.spec.side_channel_port]
    return {PREFILL_SIDE_CHANNELS_ENV: ",".join(channels)}


def cpu_threads(num_local: int) -> dict[str, str]:
    """Instances on CPU share the cores instead of each spawning one thread per core."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, num_local)))}


def proxy_argv(cfg: DeploymentConfig, host: str, port: int, drain_timeout_s: float,
               instances: list[tuple[str, str, str]], engine_ids: dict[str, str] | None = None) -> list[str]:
    """The proxy's command line; `instances` are (role, name, url), `engine_ids` name -> the engine_id planned for
    it, where known (its /health must name that, or that with -rN). The ray launcher builds it too."""
    argv = [sys.executable, "-m", "pdlaunch.proxy", "--host", host, "--port", str(port),
            "--drain-timeout", str(drain_timeout_s), "--parent-pid", str(os.getpid()),
            "--restart-backoff", str(cfg.supervision.restart_backoff_seconds),
            *proxy_policy_args(cfg, lambda: str(resolve_model_path(cfg.model.path)))]
    for role, name, url in instances:
        argv += [f"--{role}", f"{name}={url}"]
    for name, engine_id in (engine_ids or {}).items():
        argv += ["--engine-id", f"{name}={engine_id}"]
    return argv


def proxy_env(cfg: DeploymentConfig) -> dict[str, str]:
    """Secrets reach the proxy through its environment, never its argv (visible in `ps`)."""
    security = cfg.security
    env = {SECRET_ENV: security.deployment_secret or ""}
    if security.api_key:
        env[API_KEY_ENV] = security.api_key
    return env
