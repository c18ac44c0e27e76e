"""Sleep-mode acceptance run: a 1P1D deployment with --enable-sleep-mode (one GPU by default).

Starts `pdlaunch serve` (prefill and decode sharing GPU 0, KV pushed; `--gpus 0,1 --mode pull` puts
them on two GPUs and has decode READ), records greedy answers,
then per instance: level-1 sleep (time, GPU memory the process held before/after, from
nvidia-smi, plus the device-wide free memory from torch.cuda.mem_get_info), wake (time), answers
again (must be identical, served PD through the proxy), and N more sleep/wake cycles watching the
device's used memory after each wake for growth.

    python benchmarks/sleep_acceptance.py --model /data/llama3-8b --cycles 20 --out result.json

`--no-sleep` only starts, asks and stops (a CPU dry run of everything but sleep).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

AUTH: dict[str, str] = {}  # the API key header, set in main(); /health stays open
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]


def wait_until(predicate, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def process_gpu_mib() -> dict[int, int]:
    """pid -> MiB of GPU memory the process holds (nvidia-smi)."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    usage: dict[int, int] = {}
    for line in out.strip().splitlines():
        pid, mib = (part.strip() for part in line.split(","))
        usage[int(pid)] = usage.get(int(pid), 0) + int(mib)
    return usage


def device_used_gib(index: int = 0) -> float:
    import torch

    free, total = torch.cuda.mem_get_info(index)
    return (total - free) / 2**30


def gpu_used_mib(index: int = 0) -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", str(index)],
                         capture_output=True, text=True, timeout=30).stdout
    return int(out.strip().splitlines()[0])


def answers(url: str) -> list[list[int]]:
    out = []
    model = httpx.get(f"{url}/v1/models", timeout=10, headers=AUTH).json()["data"][0]["id"]
    for prompt in PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120, headers=AUTH)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        out.append(choice.get("token_ids") or choice["text"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--utilization", type=float, default=0.42)
    parser.add_argument("--mode", default="push", choices=["push", "pull", "auto"], help="kv_transfer.transfer_mode")
    parser.add_argument("--gpus", default="0", help="prefill's and decode's GPU: '0' shares one, '0,1' splits")
    parser.add_argument("--no-sleep", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--api-key", default=None, help="the deployment's API key (/sleep and /wake_up need one); "
                        "default: a random key for this run")
    args = parser.parse_args()
    api_key = args.api_key or secrets.token_hex(16)
    AUTH["Authorization"] = f"Bearer {api_key}"

    work = Path(tempfile.mkdtemp(prefix="pdl-sleep-"))
    sleep_yaml = "true" if not args.no_sleep else "false"
    config = work / "deploy.yaml"
    gpus = [int(g) for g in args.gpus.split(",")]
    gpu_of = {"prefill": gpus[0], "decode": gpus[-1]}
    placement = {role: f"devices: [{gpu}]" if args.device == "cuda" else "" for role, gpu in gpu_of.items()}
    config.write_text(f"""
device: {args.device}
model: {{path: {args.model}, dtype: {'bfloat16' if args.device == 'cuda' else 'float32'},
         enable_sleep_mode: {sleep_yaml}, max_model_len: 2048}}
cache: {{gpu_memory_utilization: {args.utilization}, cpu_kv_cache_gb: 0.25}}
kv_transfer: {{transfer_mode: {args.mode}}}
instances:
  - {{role: prefill, count: 1, {placement['prefill']}}}
  - {{role: decode, count: 1, {placement['decode']}}}
""")
    url = f"http://127.0.0.1:{args.port}"
    log = open(work / "serve.log", "w")
    result: dict = {"model": args.model, "device": args.device, "mode": args.mode, "gpus": gpus}
    if args.device == "cuda" and not args.no_sleep:
        # What is in use before the deployment starts: this process's own CUDA context and what the driver keeps.
        result["baseline_used_gib"] = {gpu: round(device_used_gib(gpu), 3) for gpu in sorted(set(gpus))}
    t0 = time.monotonic()
    serve = subprocess.Popen([sys.executable, "-m", "pdlaunch", "serve", str(config), "--port", str(args.port),
                              "--log-dir", str(work / "logs")],
                             env={**os.environ, "PDLAUNCH_API_KEY": api_key}, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, "the deployment to be ready",
                   600)
        result["startup_s"] = round(time.monotonic() - t0, 1)
        instances = httpx.get(f"{url}/instances", timeout=10, headers=AUTH).json()
        infos = {i["role"]: httpx.get(f"{i['url']}/info", timeout=10, headers=AUTH).json() | {"url": i["url"]}
                 for i in instances}
        before = answers(url)
        result["answers_before"] = before
        if args.no_sleep:
            print(json.dumps(result, indent=1))
            return 0

        per_instance = {}
        for role, info in infos.items():
            pid = info["pid"]
            held_before = process_gpu_mib().get(pid, 0)
            used_before = device_used_gib(gpu_of[role])
            t = time.perf_counter()
            r = httpx.post(f"{info['url']}/sleep", params={"level": 1}, timeout=300, headers=AUTH)
            sleep_s = time.perf_counter() - t
            r.raise_for_status()
            held_asleep = process_gpu_mib().get(pid, 0)
            used_asleep = device_used_gib(gpu_of[role])
            device_freed_mib = (used_before - used_asleep) * 1024
            per_instance[role] = {
                "pid": pid, "held_before_mib": held_before, "held_asleep_mib": held_asleep,
                "freed_fraction": round((held_before - held_asleep) / held_before, 4) if held_before else None,
                "device_freed_gib": round(used_before - used_asleep, 2),
                # The measure: what torch.cuda.mem_get_info sees come free, over what the instance held.
                "device_freed_fraction": round(device_freed_mib / held_before, 4) if held_before else None,
                "first_sleep_s": round(sleep_s, 2), "sleep_response": r.json(),
            }
        # Both asleep: where does the device's used memory sit? Every compute process (this one included)
        # against the device-wide figures, the baseline taken before the deployment started.
        result["both_asleep"] = {
            "device_used_gib": {gpu: round(device_used_gib(gpu), 3) for gpu in sorted(set(gpus))},
            "nvidia_smi_used_mib": {gpu: gpu_used_mib(gpu) for gpu in sorted(set(gpus))},
            "apps_mib": {str(pid): mib for pid, mib in process_gpu_mib().items()},
        }
        for role, info in infos.items():
            t = time.perf_counter()
            r = httpx.post(f"{info['url']}/wake_up", timeout=300, headers=AUTH)
            per_instance[role]["first_wake_s"] = round(time.perf_counter() - t, 2)
            r.raise_for_status()
        wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, "the proxy to see both awake",
                   60)
        after = answers(url)
        result["answers_after_equal"] = after == before
        result["per_instance"] = per_instance

        used_after_wake, sleeps, wakes = [], [], []
        for _ in range(args.cycles):
            for info in infos.values():
                t = time.perf_counter()
                httpx.post(f"{info['url']}/sleep", params={"level": 1}, timeout=300,
                           headers=AUTH).raise_for_status()
                sleeps.append(time.perf_counter() - t)
            for info in infos.values():
                t = time.perf_counter()
                httpx.post(f"{info['url']}/wake_up", timeout=300, headers=AUTH).raise_for_status()
                wakes.append(time.perf_counter() - t)
            used_after_wake.append(round(sum(device_used_gib(gpu) for gpu in set(gpus)), 3))
        wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, "the proxy after the cycles", 60)
        result["answers_after_cycles_equal"] = answers(url) == before
        if sleeps:
            sleeps.sort(), wakes.sort()
            result["cycles"] = {
                "n": args.cycles, "sleep_median_s": round(sleeps[len(sleeps) // 2], 3),
                "wake_median_s": round(wakes[len(wakes) // 2], 3),
                "device_used_after_wake_gib": used_after_wake,
                "growth_gib": round(used_after_wake[-1] - used_after_wake[0], 3),
            }
        print(json.dumps(result, indent=1))
        ok = (result["answers_after_equal"] and result["answers_after_cycles_equal"]
              and all((p["device_freed_fraction"] or 0) >= 0.95 for p in per_instance.values()))
        print("ACCEPTANCE", "PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
        log.close()
        if os.environ.get("LOGS_OUT"):  # keep the logs (e.g. the device machine's $OUT)
            import shutil

            for f in [work / "serve.log", *sorted((work / "logs").glob("*.log"))]:
                shutil.copy(f, Path(os.environ["LOGS_OUT"]) / f.name)
        if serve.returncode not in (0, None) or os.environ.get("SHOW_LOGS"):
            print((work / "serve.log").read_text()[-4000:])
            for f in sorted((work / "logs").glob("*.log")):
                print(f"--- {f.name}\n" + f.read_text()[-3000:])


if __name__ == "__main__":
    sys.exit(main())
