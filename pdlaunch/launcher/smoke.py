"""`pdlaunch smoke`: bring a deployment up, exercise it, compare PD with colocated, exit 0 or 1.

Runs the configured PD deployment, then a colocated deployment of the same model (one instance
shaped like a decode instance), sends the same greedy requests to both through the proxy and checks:
completions, chat and streaming answer; streamed text == non-streamed text; PD text == colocated
text; KV bytes moved between the PD instances. Every process is stopped whatever happens.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from pdlaunch.config.addresses import port_is_free
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.port_reservations import reservation_holder
from pdlaunch.config.topology_config import InstanceGroupConfig
from pdlaunch.errors import PdlaunchError
from pdlaunch.http.auth import internal_headers
from pdlaunch.http.sse import parse_sse
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.log_dir_lock import log_dir_holder
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.launcher.readiness import ChildExited
from pdlaunch.launcher.serve import report_child_exit
from pdlaunch.server.instance import served_model_names

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
CHAT = [{"role": "user", "content": "Name three colors."}]
MAX_TOKENS = 16
# The context the smoke requests need: the prompts above (chat template included) and MAX_TOKENS, with room
# for a long system prompt in the template; a shorter max_model_len would fail every request with a 400.
MIN_MODEL_LEN = 128
REQUEST_TIMEOUT_S = 120.0


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class RunResult:
    """What one deployment answered (greedy), keyed by request."""

    texts: dict[str, str] = field(default_factory=dict)
    kv_bytes: float = 0.0
    step: str = ""  # the request in flight, named by a failure


def colocated_variant(cfg: DeploymentConfig) -> DeploymentConfig:
    """The same model as one colocated instance, shaped (TP, devices, node) like the first decode group."""
    decode = next((g for g in cfg.instances if g.role == "decode" and g.count > 0), None)
    group = InstanceGroupConfig(role="colocated", count=1)
    if decode is not None:
        tp = decode.tp or 1
        group = InstanceGroupConfig(role="colocated", count=1, tp=decode.tp, node=decode.node,
                                    devices=decode.devices[:tp] if decode.devices else None)
    return cfg.model_copy(update={"colocated": True, "instances": [group]}, deep=True)


def _kv_bytes(client: httpx.Client, url: str, headers: dict[str, str]) -> float:
    text = client.get(f"{url}/metrics", headers=headers).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "pdlaunch_kv_transfer_bytes_total")


def _post(client: httpx.Client, url: str, body: dict[str, object]) -> httpx.Response:
    response = client.post(url, json=body)
    if response.status_code != 200:
        raise PdlaunchError(f"POST {url} answered {response.status_code}: {response.text[:300]}")
    return response


def _exercise(deployment: Deployment, label: str, checks: list[Check], result: RunResult) -> RunResult:
    """Send the smoke requests through the proxy; record checks prefixed by `label`, answers in `result`."""
    base = deployment.proxy_url
    greedy = {"model": served_model_names(deployment.cfg)[0], "max_tokens": MAX_TOKENS, "temperature": 0.0}
    api_key = deployment.cfg.security.api_key
    # Bytes: httpx writes a text header in ASCII only, and the proxy takes a key in UTF-8 (http/auth.py).
    client_headers: dict[bytes, bytes] = {b"Authorization": b"Bearer " + api_key.encode()} if api_key else {}
    with httpx.Client(trust_env=False, timeout=REQUEST_TIMEOUT_S, headers=client_headers) as client:
        for i, prompt in enumerate(PROMPTS):
            result.step = f"completion {i} (POST {base}/v1/completions)"
            answer = _post(client, f"{base}/v1/completions", {**greedy, "prompt": prompt}).json()
            result.texts[f"completion {i}"] = answer["choices"][0]["text"]
        ok = all(result.texts[f"completion {i}"] for i in range(len(PROMPTS)))
        checks.append(Check(f"{label}: completions", ok, f"{len(PROMPTS)} prompts, {MAX_TOKENS} tokens each"))

        result.step = f"chat completion (POST {base}/v1/chat/completions)"
        chat = _post(client, f"{base}/v1/chat/completions", {**greedy, "messages": CHAT}).json()
        result.texts["chat"] = chat["choices"][0]["message"]["content"]
        checks.append(Check(f"{label}: chat completion", bool(result.texts["chat"]), repr(result.texts["chat"][:40])))

        result.step = f"streamed completion (POST {base}/v1/completions)"
        body = {**greedy, "prompt": PROMPTS[0], "stream": True, "stream_options": {"include_usage": True}}
        events = parse_sse(_post(client, f"{base}/v1/completions", body).content)
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        streamed = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
        ended = bool(events) and events[-1] == "[DONE]" and "usage" in chunks[-1]
        same = streamed == result.texts["completion 0"]
        checks.append(Check(f"{label}: streaming", ended and same,
                            f"{len(chunks)} chunks, usage + [DONE] at the end: {ended}, equals non-streamed: {same}"))

        if not deployment.cfg.colocated:
            for plan in deployment.plan.local:
                result.step = f"KV transfer metrics of {plan.spec.name} (GET {plan.url}/metrics)"
                result.kv_bytes += _kv_bytes(client, plan.url,
                                             internal_headers(deployment.cfg.security.deployment_secret))
            checks.append(Check(f"{label}: KV bytes moved", result.kv_bytes > 0,
                                f"pdlaunch_kv_transfer_bytes_total = {result.kv_bytes:.0f} B over the instances"))
    result.step = ""
    return result


def _run(cfg: DeploymentConfig, label: str, console: Console, checks: list[Check]) -> RunResult | None:
    console.rule(f"smoke: {label} deployment")
    deployment = Deployment(cfg, console)
    result = RunResult()
    try:
        deployment.start()
        return _exercise(deployment, label, checks, result)
    except ChildExited as exc:
        report_child_exit(console, exc)
        checks.append(Check(f"{label}: deployment", False, f"{exc.message}; its log: {exc.child.log_path}"))
    except (PdlaunchError, httpx.HTTPError, KeyError, ValueError, IndexError, TypeError) as exc:
        # ...TypeError: an answer of the wrong shape (`choices` empty or null) is a failed check, not a traceback
        checks.append(Check(f"{label}: deployment", False, _failure(deployment, result.step, exc)))
    finally:
        deployment.stop()
    return None


def _failure(deployment: Deployment, step: str, exc: Exception) -> str:
    """What failed, in which request (or while starting), a process that died meanwhile, and where the logs are:
    a failed request alone (a 502, a timeout) does not say which process to look at."""
    text = f"{type(exc).__name__} {f'in {step}' if step else 'while starting'}: {exc}"
    dead = deployment.dead_child()
    if dead is not None:
        child = dead[0]
        text += f"; {child.name} (pid {child.pid}) {child.describe_exit()}, its log: {child.log_path}"
    return text if str(deployment.log_dir) in text else f"{text}; logs in {deployment.log_dir}"


def run_smoke(cfg: DeploymentConfig) -> int:
    if cfg.launcher.backend != "local":
        raise PdlaunchError(f"smoke runs its deployment on this machine, not through --backend {cfg.launcher.backend}",
                            field="launcher.backend", hint="run `pdlaunch smoke` with --backend local")
    max_len = cfg.model.max_model_len
    if max_len is not None and max_len < MIN_MODEL_LEN:
        raise PdlaunchError(f"max_model_len {max_len} is too short for the smoke requests, which need up to "
                            f"{MIN_MODEL_LEN} tokens (a prompt in its chat template + {MAX_TOKENS} generated)",
                            field="model.max_model_len",
                            hint=f"give --max-model-len {MIN_MODEL_LEN} or more, or leave it unset")
    console = Console()
    checks: list[Check] = []
    host, port = cfg.proxy.host, cfg.proxy.port
    if not port_is_free(host, port) or reservation_holder(host, port) is not None:
        # A smoke run only needs some port; CI machines often have 8000 taken (or a deployment starting there).
        taken = cfg.proxy.port
        cfg = cfg.model_copy(deep=True)
        cfg.proxy.port = PortAllocator(cfg.proxy.host).free("smoke proxy")
        console.print(f"proxy port {taken} is in use: the smoke run uses {cfg.proxy.port}")
    holder = log_dir_holder(Path(cfg.log_dir))
    if holder is not None:
        # Likewise the log directory: a live deployment's logs and deployment.json stay untouched.
        live = Path(cfg.log_dir)
        cfg = cfg.model_copy(deep=True)
        cfg.log_dir = str(live.with_name(f"{live.name}-smoke-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"))
        console.print(f"log dir {str(live)!r} belongs to a running deployment ({holder}): "
                      f"the smoke run logs to {cfg.log_dir!r}", highlight=False, soft_wrap=True)
    if cfg.colocated:
        _run(cfg, "colocated", console, checks)
    else:
        pd = _run(cfg, "PD", console, checks)
        ref_cfg = colocated_variant(cfg)
        ref_cfg.log_dir = str(Path(cfg.log_dir) / "smoke-colocated")
        ref = _run(ref_cfg, "colocated", console, checks) if pd is not None else None
        if pd is not None and ref is not None:
            for key, text in pd.texts.items():
                same = text == ref.texts.get(key)
                checks.append(Check(f"PD == colocated: {key}", same,
                                    "identical greedy text" if same else f"PD {text!r} vs {ref.texts.get(key)!r}"))
    return _report(console, checks)


def _report(console: Console, checks: list[Check]) -> int:
    table = Table(title="pdlaunch smoke", title_justify="left")
    table.add_column("check", no_wrap=True)
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for check in checks:
        table.add_row(check.name, "[green]PASS[/green]" if check.passed else "[red]FAIL[/red]", check.detail)
    console.print(table)
    failed = [c for c in checks if not c.passed]
    if failed or not checks:
        console.print(f"[red]smoke failed[/red]: {len(failed)} of {len(checks)} checks failed")
        return 1
    console.print(f"[green]smoke passed[/green]: {len(checks)} checks")
    return 0
