"""Where a served request's time goes, around one `bench serve` run: the CPU seconds each running pdlaunch
process (the proxy, the instances, their launcher) spent, and those of an instance's main thread (its HTTP
side; the engine runs in another thread); each instance's own time to first token (its
`pdlaunch_time_to_first_token_seconds` histogram, from a request reaching the instance to its first token),
split into the engine's queue and first-scheduled-to-first-token stages; and its steps a second.

    python benchmarks/serve_probe.py snap PROXY_URL A.json     # before the run
    python benchmarks/serve_probe.py snap PROXY_URL B.json     # after it
    python benchmarks/serve_probe.py diff A.json B.json        # a table of the deltas

Client TTFT minus the instances' own TTFT is the time outside the instances: the proxy, the HTTP hops and the
client. The proxy's and each instance's time to first byte (http/first_byte.py) split it: client TTFT less the
proxy's is the client and its hop, the proxy's less the instances' the proxy and its hops, an instance's less its
own TTFT its HTTP side. A process at ~1.0 core over the run is saturated, and a request it handles waits for it.
"""

from __future__ import annotations

import json
import os
import sys
import time

import httpx


def _cpu_seconds(pid: int, task: int | None = None) -> float:
    """CPU seconds of process `pid`, or of its thread `task` alone."""
    with open(f"/proc/{pid}/task/{task}/stat" if task is not None else f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _processes() -> dict[str, float]:
    """CPU seconds of every process whose command line names pdlaunch, keyed "pid command"."""
    out: dict[str, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if not any(b"pdlaunch" in a for a in argv):
                continue
            role = next((a.decode() for a in argv if a.startswith(b"--instance")), "")
            name = " ".join(a.decode(errors="replace") for a in argv[1:4])
            if role:  # an instance's spec is JSON: keep its name
                spec = json.loads(argv[argv.index(b"--instance") + 1].decode())
                name = f"instance {spec.get('role', '?')}-{spec.get('index', '?')}"
                # Its main thread runs the HTTP side (the event loop: requests, SSE); the engine runs in another.
                out[f"{entry} {name}, main thread (HTTP)"] = _cpu_seconds(int(entry), int(entry))
            out[f"{entry} {name}"] = _cpu_seconds(int(entry))
        except (OSError, ValueError, json.JSONDecodeError):
            continue
    return out


# (histogram, what its mean says): each instance's own stages of a request. The gaps between them:
# arrival to engine (parsing, tokenizing, the hand-over to the engine thread) = TTFT - queue - prefill.
STAGES = (("pdlaunch_time_to_first_token_seconds", "own TTFT (arrival to first token)"),
          ("pdlaunch_time_to_first_byte_seconds", "time to first byte (HTTP in to first byte out)"),
          ("vllm:request_queue_time_seconds", "queued in the engine (added to first scheduled)"),
          ("vllm:request_prefill_time_seconds", "first scheduled to first token"),
          ("vllm:iteration_tokens_total", "tokens a step"))


ALLOCATOR_SERIES = ("pdlaunch_device_cache_frees_total", "pdlaunch_device_allocator_retries_total",
                    "pdlaunch_device_mallocs_total")  # engine/allocator_watch.py
LATE_SERIES = "pdlaunch_engine_late_launches_total"  # engine/arrival_window.py: the device waited for the host
STEP_SERIES = ("pdlaunch_engine_steps_total", "pdlaunch_engine_step_seconds_total", "pdlaunch_engine_step_tokens_total")


def _histograms(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each STAGES histogram on one instance, summed over label sets; and, keyed
    "steps KIND", (device seconds, steps) and "tokens KIND" (tokens, steps) of its engine steps by kind."""
    text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    out = {name: [0.0, 0.0] for name, _ in STAGES}
    steps: dict[str, dict[str, float]] = {}
    result_paths: dict[str, float] = {}
    for line in text.splitlines():
        for name in out:
            for suffix, slot in (("_sum", 0), ("_count", 1)):
                if line.startswith(name + suffix + " ") or line.startswith(name + suffix + "{"):
                    out[name][slot] += float(line.split()[-1])
        for series in ALLOCATOR_SERIES:
            if line.startswith(series + " "):
                value = float(line.split()[-1])
                result_paths[f"allocator {series}"] = value
        if line.startswith(LATE_SERIES + " "):
            result_paths["late launches"] = float(line.split()[-1])
        if line.startswith("pdlaunch_engine_step_paths_total{"):
            path = line.split('path="', 1)[1].split('"', 1)[0]
            result_paths[path] = float(line.split()[-1])
        for series in STEP_SERIES:
            if line.startswith(series + "{") and 'kind="' in line:
                kind = line.split('kind="', 1)[1].split('"', 1)[0]
                steps.setdefault(kind, {})[series] = float(line.split()[-1])
    result = {name: (total, count) for name, (total, count) in out.items()}
    for kind, values in steps.items():
        count = values.get(STEP_SERIES[0], 0.0)
        result[f"steps {kind}"] = (values.get(STEP_SERIES[1], 0.0), count)
        result[f"tokens {kind}"] = (values.get(STEP_SERIES[2], 0.0), count)
    for path, count in result_paths.items():
        result[path if path.startswith(("allocator ", "late ")) else f"path {path}"] = (count, count)
    return result


PROXY_FIRST_BYTE = "pdlaunch_proxy_time_to_first_byte_seconds"  # http/first_byte.py, at the proxy


def _proxy_first_byte(proxy_url: str) -> tuple[float, float]:
    """(sum, count) of the proxy's own time to first byte over its routes (not the instances' federated series)."""
    text = httpx.get(f"{proxy_url}/metrics", timeout=10, trust_env=False).text
    out = [0.0, 0.0]
    for line in text.splitlines():
        for suffix, slot in (("_sum{", 0), ("_count{", 1)):
            if line.startswith(PROXY_FIRST_BYTE + suffix):
                out[slot] += float(line.split()[-1])
    return out[0], out[1]


def snap(proxy_url: str, path: str) -> None:
    instances = httpx.get(f"{proxy_url}/instances", timeout=10, trust_env=False).json()
    doc = {"time": time.monotonic(), "cpu": _processes(), "proxy_first_byte": _proxy_first_byte(proxy_url),
           "stages": {i["name"]: _histograms(i["url"]) for i in instances}}
    with open(path, "w") as f:
        json.dump(doc, f)


def diff(a_path: str, b_path: str) -> None:
    with open(a_path) as f:
        a = json.load(f)
    with open(b_path) as f:
        b = json.load(f)
    wall = b["time"] - a["time"]
    print(f"over {wall:.1f} s:")
    for key, after in sorted(b["cpu"].items()):
        used = after - a["cpu"].get(key, 0.0)
        if used > 0.05:
            print(f"  {key[:70]:70s} {used:7.2f} cpu s = {used / wall:.2f} core")
    (total, count), (t0, c0) = b.get("proxy_first_byte", (0.0, 0.0)), a.get("proxy_first_byte", (0.0, 0.0))
    if count > c0:
        mean_ms = (total - t0) / (count - c0) * 1000
        print(f"  proxy: time to first byte (request in to first byte out): mean {mean_ms:.1f} ms over"
              f" {count - c0:.0f} requests (client TTFT less this: the client and its hop)")
    for name, stages in sorted(b["stages"].items()):
        for stage, what in STAGES:
            total, count = stages[stage]
            t0, c0 = a["stages"].get(name, {}).get(stage, (0.0, 0.0))
            if count <= c0:
                continue
            mean = (total - t0) / (count - c0)
            if stage == "vllm:iteration_tokens_total":
                print(f"  {name}: {count - c0:.0f} steps ({(count - c0) / wall:.0f} a second, one every "
                      f"{wall / (count - c0) * 1000:.2f} ms), {mean:.1f} {what}")
            else:
                print(f"  {name}: {what}: mean {mean * 1000:.1f} ms over {count - c0:.0f} requests")
        paths = {k.split(" ", 1)[1]: v[0] - a["stages"].get(name, {}).get(k, (0.0, 0.0))[0]
                 for k, v in stages.items() if k.startswith("path ")}
        if any(paths.values()):
            print(f"  {name}: forwards by path: " + ", ".join(f"{p} {n:.0f}" for p, n in sorted(paths.items())))
        grown = {k.split(" ", 1)[1].removeprefix("pdlaunch_device_").removesuffix("_total"):
                 v[0] - a["stages"].get(name, {}).get(k, (0.0, 0.0))[0]
                 for k, v in stages.items() if k.startswith("allocator ")}
        if any(grown.values()):
            counts = ", ".join(f"{k} {n:.0f}" for k, n in sorted(grown.items()))
            print(f"  {name}: CUDA allocator while serving: {counts}")
        if "late launches" in stages:
            late = stages["late launches"][0] - a["stages"].get(name, {}).get("late launches", (0.0, 0.0))[0]
            print(f"  {name}: {late:.0f} late launches (the device waited for the host)")
        for key in sorted(k for k in stages if k.startswith("steps ")):
            kind = key.split(" ", 1)[1]
            (seconds, count), (tokens, _) = stages[key], stages[f"tokens {kind}"]
            s0, c0 = a["stages"].get(name, {}).get(key, (0.0, 0.0))
            t0, _ = a["stages"].get(name, {}).get(f"tokens {kind}", (0.0, 0.0))
            if count > c0:
                mean_ms = (seconds - s0) / (count - c0) * 1000
                print(f"  {name}: {count - c0:.0f} {kind} steps, device time mean {mean_ms:.2f} ms, "
                      f"{(tokens - t0) / (count - c0):.1f} tokens a step")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "snap":
        snap(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "diff":
        diff(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
