"""PD time to first token at low load against colocated, and the KV transfer time in between.

    python benchmarks/pd_ttft.py --model CKPT|demo --device cuda|cpu [--num-prompts 20]
        [--input-len 4096] [--output-len 16] [--request-rate 0.5] [--slack-ms 10] [--json OUT]
        [-- extra serve flags]

Runs `pdlaunch serve --colocated`, then `pdlaunch serve` (1 prefill + 1 decode), each with the same
`pdlaunch bench serve` workload (one request in flight at a time: low load) after two warm-up requests of
other prompts (never the measured ones: prefix caching would answer those from the cache), and reads the mean
KV transfer time of the PD run from the instances' `pdlaunch_kv_transfer_seconds` histograms.
Target (issue 15): PD median TTFT <= colocated median TTFT + mean KV transfer time + 10 ms (--slack-ms).
It also splits the PD run's mean TTFT into the prefill leg as the proxy saw it, the prefill request inside its
instance, and the decode's own time to first token (the instances' and the proxy's histograms).
It also reports how many prompt positions the decode computed itself in the PD run: 0 when every
request continued from the prefill's first token (engine/first_token.py), one per request when the
decode recomputed the last prompt token (the path vLLM's proxies take).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from pdlaunch.bench.serve import run_serve_bench
from pdlaunch.bench.serve_config import ServeBenchConfig

READY_TIMEOUT_S = 900.0  # an 8B checkpoint loads and profiles in minutes on a cold disk
WARMUP_PROMPTS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def deployment(serve_args: list[str], log_dir: Path) -> Iterator[str]:
    """Start `pdlaunch serve ARGS`, yield the proxy URL once /health is 200, SIGTERM it on exit."""
    port = _free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / "launcher.out", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pdlaunch", "serve", *serve_args, "--port", str(port),
                             "--log-dir", str(log_dir)], stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"pdlaunch serve exited with {proc.returncode}; see {log_dir}/launcher.out")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"gave up after {READY_TIMEOUT_S:.0f}s waiting for {url}/health")
            time.sleep(1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        out.close()


def histogram_totals(url: str, name: str) -> tuple[float, float]:
    """(sum, count) of histogram `name` in the /metrics of the server at `url`, over its label sets."""
    total = count = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        series = line.split("{", 1)[0].split(" ", 1)[0]
        if series == f"{name}_sum":
            total += float(line.split()[-1])
        elif series == f"{name}_count":
            count += float(line.split()[-1])
    return total, count


def instance_totals(proxy_url: str, name: str, role: str | None = None) -> tuple[float, float]:
    """`histogram_totals` summed over the instances behind the proxy (of `role`, or all)."""
    totals = [histogram_totals(inst["url"], name) for inst in httpx.get(f"{proxy_url}/instances", timeout=10).json()
              if role is None or inst["role"] == role]
    return sum(t for t, _ in totals), sum(c for _, c in totals)


def transfer_totals(proxy_url: str) -> tuple[float, float]:
    """(sum of seconds, count) of pdlaunch_kv_transfer_seconds over every instance behind the proxy."""
    return instance_totals(proxy_url, "pdlaunch_kv_transfer_seconds")


# Where a PD request's time to first token goes, each as a mean over the measured requests (ms): the prefill leg
# as the proxy saw it (its HTTP round trip included), the prefill request inside its instance (arrival to end),
# and the decode's own time to first token (arrival to the first token it handed out).
PD_PARTS = {"proxy_prefill_leg_ms": ("proxy", "pdlaunch_proxy_prefill_seconds"),
            "prefill_instance_e2e_ms": ("prefill", "vllm:e2e_request_latency_seconds"),
            "decode_instance_ttft_ms": ("decode", "vllm:time_to_first_token_seconds")}


def part_totals(proxy_url: str) -> dict[str, tuple[float, float]]:
    return {part: histogram_totals(proxy_url, name) if where == "proxy" else instance_totals(proxy_url, name, where)
            for part, (where, name) in PD_PARTS.items()}


def part_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Each part's mean over the requests between `before` and `after` (ms; NaN when it recorded none)."""
    means = {}
    for part in PD_PARTS:
        total, count = after[part][0] - before[part][0], after[part][1] - before[part][1]
        means[part] = total / count * 1e3 if count else float("nan")
    return means


def decode_prompt_tokens_computed(proxy_url: str) -> int:
    """Prompt positions the decode instances computed themselves (their /info stats)."""
    return sum(int(httpx.get(f"{inst['url']}/info", timeout=10).json()["stats"]["prompt_tokens_computed"])
               for inst in httpx.get(f"{proxy_url}/instances", timeout=10).json() if inst["role"] == "decode")


def bench(url: str, args: argparse.Namespace, console: Console, num_prompts: int, seed: int) -> dict[str, Any]:
    cfg = ServeBenchConfig(base_url=url, num_prompts=num_prompts, random_input_len=args.input_len,
                           random_output_len=args.output_len, request_rate=args.request_rate, max_concurrency=1,
                           vocab_size=args.vocab_size, seed=seed)
    return run_serve_bench(cfg, console)


def warm_up(url: str, args: argparse.Namespace, console: Console) -> None:
    """WARMUP_PROMPTS requests (first-use compiles; on PD the NIXL handshake) whose prompts the measured run does not
    send: drawn from another seed. With the measured run's seed they were its first prompts, which prefix caching
    (on by default) then answered from the cache: TTFTs of one computed token among those of whole prompts."""
    bench(url, args, console, WARMUP_PROMPTS, args.seed + 1)


def measure(url: str, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    return bench(url, args, console, args.num_prompts, args.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--input-len", type=int, default=4096)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--request-rate", type=float, default=0.5)
    parser.add_argument("--vocab-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slack-ms", type=float, default=10.0,
                        help="allowed PD TTFT above colocated TTFT + KV transfer time")
    parser.add_argument("--json", type=Path)
    parser.add_argument("serve_flags", nargs="*", help="more `pdlaunch serve` flags, after --")
    args = parser.parse_args()
    console = Console()
    common = ["--model", args.model, "--device", args.device, *args.serve_flags]
    logs = Path(tempfile.mkdtemp(prefix="pd_ttft_"))

    console.rule("colocated")
    with deployment([*common, "--colocated"], logs / "colocated") as url:
        warm_up(url, args, console)
        ttft_before = instance_totals(url, "vllm:time_to_first_token_seconds")
        colo = measure(url, args, console)
        ttft_after = instance_totals(url, "vllm:time_to_first_token_seconds")
    colo_count = ttft_after[1] - ttft_before[1]
    colo_instance_ttft_ms = (ttft_after[0] - ttft_before[0]) / colo_count * 1e3 if colo_count else float("nan")
    console.rule("PD (1 prefill + 1 decode)")
    with deployment(common, logs / "pd") as url:
        warm_up(url, args, console)
        before, computed_before = transfer_totals(url), decode_prompt_tokens_computed(url)
        parts_before = part_totals(url)
        pd = measure(url, args, console)
        after, computed = transfer_totals(url), decode_prompt_tokens_computed(url) - computed_before
        parts = part_means(parts_before, part_totals(url))
    n_transfers = after[1] - before[1]
    if n_transfers < 1:
        raise SystemExit("the PD run recorded no KV transfer (pdlaunch_kv_transfer_seconds_count did not move)")
    transfer_ms = (after[0] - before[0]) / n_transfers * 1e3
    bound_ms = colo["median_ttft_ms"] + transfer_ms + args.slack_ms
    doc = {"model": args.model, "device": args.device, "input_len": args.input_len, "num_prompts": args.num_prompts,
           "colocated_median_ttft_ms": colo["median_ttft_ms"], "pd_median_ttft_ms": pd["median_ttft_ms"],
           "colocated_mean_ttft_ms": colo.get("mean_ttft_ms"), "pd_mean_ttft_ms": pd.get("mean_ttft_ms"),
           "colocated_median_tpot_ms": colo.get("median_tpot_ms"), "pd_median_tpot_ms": pd.get("median_tpot_ms"),
           "mean_transfer_ms": transfer_ms, "transfers": n_transfers, "slack_ms": args.slack_ms,
           "target_ttft_ms": bound_ms, "met": pd["median_ttft_ms"] <= bound_ms,
           "decode_prompt_tokens_computed": computed, "pd_parts": parts,
           "colocated_instance_ttft_ms": colo_instance_ttft_ms, "logs": str(logs)}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"colocated median TTFT {doc['colocated_median_ttft_ms']:.1f} ms; PD median TTFT "
                  f"{doc['pd_median_ttft_ms']:.1f} ms; mean KV transfer {transfer_ms:.1f} ms over "
                  f"{n_transfers:.0f} requests; bound colocated + transfer + {args.slack_ms:g} ms = {bound_ms:.1f} ms: "
                  f"{'met' if doc['met'] else 'MISSED'}; decode computed {computed} prompt positions "
                  f"({'continued from the first token' if computed == 0 else 'recomputed'})")
    console.print(f"PD parts (means): prefill leg as the proxy saw it {parts['proxy_prefill_leg_ms']:.1f} ms, of it "
                  f"in the prefill instance {parts['prefill_instance_e2e_ms']:.1f} ms; decode's own time to first "
                  f"token {parts['decode_instance_ttft_ms']:.1f} ms; the rest of the mean PD TTFT "
                  f"({pd.get('mean_ttft_ms', float('nan')):.1f} ms) is the proxy's and the HTTP hops' (each leg's "
                  f"parsing and tokenizing included); colocated: its instance's own mean time to first token "
                  f"{colo_instance_ttft_ms:.1f} ms of the mean {colo.get('mean_ttft_ms', float('nan')):.1f} ms")


if __name__ == "__main__":
    main()
