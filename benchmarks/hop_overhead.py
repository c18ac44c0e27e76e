"""The time a request spends outside its instances: client TTFT less the instances' own TTFT, per HTTP hop.

    python benchmarks/hop_overhead.py [--model tiny] [--requests 100] [--busy N] [--baseline DIR] [--json OUT]
        [-- extra serve flags]

Serves `--model` colocated, then as 1 prefill + 1 decode behind the proxy (CPU by default), and sends requests one
at a time (max_tokens 1 or 2; a PD request always runs both legs), each with a prompt of its own. For every request:
the client's TTFT (a whole answer: to its last byte; a stream: to its first `data: {` event), read by a raw-socket
HTTP/1.1 client on a kept-alive connection, and the instances' own TTFT (the change of their
`pdlaunch_time_to_first_token_seconds` histograms around it: arrival, after parsing and tokenizing, to the first
token; a PD request's prefill and decode summed). Their difference is the time outside the instances: HTTP parsing
and validation, tokenizing, the hand-overs between threads and processes, the proxy, the answer's way back.

Reference: a bare uvicorn app (h11, as the instances serve) that answers each request with the bytes the real
server answered it with (the same size, the same number of stream events), timed by the same client in the same
run, its requests taking turns with the real ones: the outside time is also given as a multiple of that round
trip. Also reported: the CPU the serving processes (launcher, instances, proxy) spent per request (/proc, a second
pass of the requests without the /metrics reads around each; steadier than wall times on a shared machine). The
served processes run with OMP_NUM_THREADS=1 (--omp-threads), as a GPU instance serves: a CPU instance's torch pool
spins on every core between its steps and starves its own HTTP side.

The third deployment, pd-prefix, is the PD one with `--routing-policy prefix --disaggregate-min-tokens 2048`: every
request runs on the decode alone (the tiny model's prompts are all shorter), after the proxy has tokenized it, hashed
its blocks and chosen its decode by them. Its requests are the turns of multi-turn chats shaped as `pdlaunch bench
serve --multi-turn` sends them, scaled to the tiny model's 2,048 tokens (a shared system message of --system-words
words, then per turn a user message of --user-words and the earlier answers of --answer-words words: ~1,900 tokens by
the fourth turn): request i is turn i % 4 of conversation i // 4, so a turn extends what the proxy saw one request
before. Its own TTFT is the decode's alone.

--busy N: N long streams (completions, 1,000 tokens, ignore_eos) run on every served tree meanwhile, so that the
engine threads step while the measured requests come (the multi-turn case: a decode busy with other streams, whose
HTTP side waits for the GIL at each hand-over). Their CPU is in the CPU figure then, and a request that a stream's
start overlapped (two first tokens in one instance's histogram) is left out.

--baseline DIR (a copy of the `pdlaunch` package at another commit, e.g. `git archive REV pdlaunch | tar -x -C
DIR`): each deployment is also served from DIR, at the same time, and the requests take turns between the two, so
both see the same load from whatever else runs on the machine. Medians over the requests; on a shared machine, run
enough of them (--requests) and compare medians only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hop_client import READY_TIMEOUT_S, RawClient, bare_server  # noqa: E402 - sibling scripts
from pd_ttft import deployment, histogram_totals  # noqa: E402

CHECKOUT = Path(__file__).resolve().parent.parent  # "this" tree: the pdlaunch package beside benchmarks/
TTFT = "pdlaunch_time_to_first_token_seconds"
WARMUP = 3  # requests per target and cell before the measured ones: first-use paths
# (endpoint, stream, max_tokens): the requests of each deployment
COLOCATED_CELLS = [("completions", False, 1), ("completions", True, 1), ("chat", False, 1), ("chat", True, 1)]
PD_CELLS = [("chat", False, 1), ("chat", True, 2), ("completions", True, 2)]
PREFIX_CELLS = [("chat turns", False, 1), ("chat turns", True, 1)]
PREFIX_FLAGS = ["--routing-policy", "prefix", "--disaggregate-min-tokens", "2048"]
TURNS = 4  # a chat turns cell's conversations
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


@dataclass
class Target:
    """One served tree of a deployment: where requests go, whose own TTFT counts, whose CPU counts (the processes
    whose command line holds one of `markers`)."""

    tree: str  # "this" or "baseline"
    url: str
    ttft_urls: list[str]
    markers: list[str]
    first_tokens: int = 0  # first tokens a request adds to the histograms of ttft_urls; 0: one per instance


def own_ttft(urls: list[str]) -> tuple[float, float]:
    """(seconds, first tokens) summed in the instances' own TTFT histograms, over `urls`."""
    totals = [histogram_totals(url, TTFT) for url in urls]
    return sum(t for t, _ in totals), sum(c for _, c in totals)


def cpu_seconds(markers: list[str]) -> float:
    """CPU seconds of every process whose command line holds one of `markers`."""
    total = 0.0
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ")
            if not any(marker.encode() in command for marker in markers):
                continue
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            continue
    return total


def _words(seed: int, n: int) -> str:
    return " ".join(random.Random(seed).choices(WORDS, k=n))


def chat_turn(i: int, shape: tuple[int, int, int]) -> list[dict[str, str]]:
    """Request i's messages: turn i % TURNS of conversation i // TURNS (module doc); `shape`: the system, user and
    answer messages' words."""
    system_words, user_words, answer_words = shape
    conversation, turn = divmod(i, TURNS)
    messages = [{"role": "system", "content": _words(-1, system_words)}]
    for t in range(turn + 1):
        if t:
            messages.append({"role": "assistant", "content": _words(2 * (conversation * TURNS + t), answer_words)})
        messages.append({"role": "user", "content": _words(2 * (conversation * TURNS + t) + 1, user_words)})
    return messages


def request_body(endpoint: str, stream: bool, max_tokens: int, i: int,
                 shape: tuple[int, int, int] = (200, 16, 40)) -> bytes:
    text = f"request {i}: tell me about the weather in a city far away"
    body: dict[str, Any] = {"model": "tiny", "max_tokens": max_tokens, "stream": stream, "temperature": 0}
    if endpoint == "chat turns":
        body["messages"] = chat_turn(i, shape)
    elif endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    return json.dumps(body).encode()


def _turns(items: list[Any], i: int) -> list[Any]:
    """`items` starting at the i-th: each goes first in turn."""
    k = i % len(items)
    return items[k:] + items[:k]


def run_cell(targets: list[Target], bare: str, cell: tuple[str, bool, int], requests: int,
             shape: tuple[int, int, int] = (200, 16, 40), first: int = 0) -> dict[str, Any]:
    """The cell's figures per tree, its requests taking turns between the trees and the bare app (`shape`: a chat
    turns cell's words per system, user and answer message; `first`: its first request's number, each cell's
    prompts its own)."""
    endpoint, stream, max_tokens = cell
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    clients = {t.tree: RawClient(t.url) for t in targets}
    for t in targets:
        for i in range(WARMUP):
            warm = request_body(endpoint, stream, max_tokens, first + 10_000 + i, shape)
            _, data, events = clients[t.tree].post(path, warm)
    # The bare app answers with the bytes of a real answer (its size, its number of stream events)
    httpx.post(f"{bare}/answer", json={"body": data.decode(), "events": events}, trust_env=False)
    bare_client = RawClient(bare)
    samples: dict[str, dict[str, list[float]]] = {t.tree: {"client": [], "own": [], "outside": []} for t in targets}
    bare_ms: list[float] = []
    failed = {t.tree: 0 for t in targets}
    for i in range(requests):
        body = request_body(endpoint, stream, max_tokens, first + i, shape)
        for t in _turns([*targets, None], i):
            if t is None:
                try:
                    bare_ms.append(bare_client.post(path, body)[0] * 1e3)
                except (OSError, RuntimeError):  # its keep-alive ran out (5 s) while a loaded tree answered
                    bare_client = RawClient(bare)
                    bare_ms.append(bare_client.post(path, body)[0] * 1e3)
                continue
            before = own_ttft(t.ttft_urls)
            try:
                seconds = clients[t.tree].post(path, body)[0]
            except (OSError, RuntimeError) as exc:  # counted; the next request goes on a new connection
                print(f"{t.tree} {path}: {exc}", file=sys.stderr)
                failed[t.tree] += 1
                clients[t.tree] = RawClient(t.url)
                continue
            after = own_ttft(t.ttft_urls)
            if after[1] - before[1] != (t.first_tokens or len(t.ttft_urls)):  # a --busy stream's TTFT is in there
                continue
            own = after[0] - before[0]  # one first token per instance the request went through
            got = samples[t.tree]
            got["client"].append(seconds * 1e3)
            got["own"].append(own * 1e3)
            got["outside"].append((seconds - own) * 1e3)
    cpu_before = {t.tree: cpu_seconds(t.markers) for t in targets}  # again, without the /metrics reads
    for i in range(requests):
        for t in _turns(targets, i):
            try:
                clients[t.tree].post(path, request_body(endpoint, stream, max_tokens, first + requests + i, shape))
            except (OSError, RuntimeError):
                clients[t.tree] = RawClient(t.url)
    bare_median = statistics.median(bare_ms)
    rows = {}
    for t in targets:
        got = samples[t.tree]
        outside = statistics.median(got["outside"])
        rows[t.tree] = {
            "endpoint": endpoint, "stream": stream, "max_tokens": max_tokens, "requests": len(got["outside"]),
            "failed": failed[t.tree],
            "client_ttft_ms": statistics.median(got["client"]), "own_ttft_ms": statistics.median(got["own"]),
            "outside_ms": outside, "outside_p90_ms": statistics.quantiles(got["outside"], n=10)[-1],
            "bare_round_trip_ms": bare_median, "outside_over_bare": outside / bare_median,
            "serving_cpu_ms_per_request": (cpu_seconds(t.markers) - cpu_before[t.tree]) / requests * 1e3}
    return rows


@contextmanager
def served(args: argparse.Namespace, kind: str, logs: Path) -> Iterator[list[Target]]:
    """`kind` (colocated or pd) served from this tree and, with --baseline, from that one too."""
    flags = ["--model", args.model, "--device", args.device, *args.serve_flags,
             *(["--colocated"] if kind == "colocated" else ["--prefill", "1", "--decode", "1"]),
             *(PREFIX_FLAGS if kind == "pd-prefix" else [])]
    trees = [("this", str(CHECKOUT)), *([("baseline", str(args.baseline.resolve()))] if args.baseline else [])]
    with ExitStack() as stack:
        targets = []
        for tree, package_dir in trees:
            log_dir = logs / f"{kind}-{tree}"
            with _python_path(package_dir):  # the launcher's processes import pdlaunch from there
                proxy_url = stack.enter_context(deployment(flags, log_dir))
            roles = {i["role"]: i["url"] for i in httpx.get(f"{proxy_url}/instances", timeout=10).json()}
            if kind == "colocated":  # one hop: to the instance itself
                targets.append(Target(tree, roles["colocated"], [roles["colocated"]], [str(log_dir)]))
            else:  # the proxy's command line does not name the log directory: its port does
                port = proxy_url.rsplit(":", 1)[1]
                markers = [str(log_dir), f"pdlaunch.proxy --host 127.0.0.1 --port {port} "]
                if kind == "pd-prefix":  # every request on the decode alone
                    targets.append(Target(tree, proxy_url, [roles["decode"]], markers, first_tokens=1))
                else:
                    targets.append(Target(tree, proxy_url, list(roles.values()), markers))
        yield targets


@contextmanager
def busy(targets: list[Target], streams: int) -> Iterator[None]:
    """`streams` long streams kept running on every target until the block ends."""
    stop = threading.Event()
    body = json.dumps({"model": "tiny", "prompt": "keep going", "max_tokens": 1000, "ignore_eos": True,
                       "stream": True}).encode()

    def stream(url: str) -> None:
        while not stop.is_set():
            try:
                RawClient(url).post("/v1/completions", body)
            except (OSError, RuntimeError) as exc:  # an overloaded machine: the proxy found the decode stalled
                print(f"a --busy stream failed, started again: {exc}", file=sys.stderr)

    threads = [threading.Thread(target=stream, args=(t.url,), daemon=True) for t in targets for _ in range(streams)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:  # each ends with its stream: 1,000 tokens
            thread.join(timeout=READY_TIMEOUT_S)


@contextmanager
def _python_path(package_dir: str) -> Iterator[None]:
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = package_dir
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def show(title: str, rows: dict[str, list[dict[str, Any]]]) -> None:
    print(f"\n{title}: medians over the requests (ms)")
    print(f"  {'tree':8s} {'request':34s} {'client TTFT':>11s} {'own TTFT':>9s} {'outside':>8s} {'p90':>6s} "
          f"{'bare RTT':>8s} {'ratio':>6s} {'CPU/req':>8s}")
    for tree, tree_rows in rows.items():
        for r in tree_rows:
            what = f"{r['endpoint']} stream={str(r['stream']).lower()} max_tokens={r['max_tokens']}"
            cpu = r["serving_cpu_ms_per_request"]
            print(f"  {tree:8s} {what:34s} {r['client_ttft_ms']:11.2f} {r['own_ttft_ms']:9.2f} "
                  f"{r['outside_ms']:8.2f} {r['outside_p90_ms']:6.2f} {r['bare_round_trip_ms']:8.2f} "
                  f"{r['outside_over_bare']:6.1f} {cpu:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=100, help="requests per cell and tree, one at a time")
    parser.add_argument("--busy", type=int, default=0, help="long streams running on each served tree meanwhile")
    parser.add_argument("--baseline", type=Path, help="a pdlaunch package copy to serve beside this tree")
    parser.add_argument("--skip", choices=("colocated", "pd", "pd-prefix"), action="append", default=[],
                        help="leave a deployment out (again for another)")
    parser.add_argument("--system-words", type=int, default=200, help="a chat turns cell's system message")
    parser.add_argument("--user-words", type=int, default=16, help="a chat turns cell's user messages")
    parser.add_argument("--answer-words", type=int, default=40, help="a chat turns cell's earlier answers")
    parser.add_argument("--omp-threads", default="1",
                        help="OMP_NUM_THREADS of the served processes: 1, as a GPU instance serves (a CPU instance's "
                             "own pool spins on every core between steps and starves the HTTP side); '' leaves it")
    parser.add_argument("--json", type=Path)
    parser.add_argument("serve_flags", nargs="*", help="more `pdlaunch serve` flags, after --")
    args = parser.parse_args()
    if args.omp_threads:
        os.environ["OMP_NUM_THREADS"] = args.omp_threads  # the deployments' processes inherit it
    logs = Path(tempfile.mkdtemp(prefix="hop_overhead_"))
    # `python -m pdlaunch` puts its working directory first on sys.path, before PYTHONPATH: from a checkout's root
    # every tree would import the checkout's package. The served processes start from the log directory.
    json_path = args.json.resolve() if args.json else None
    os.chdir(logs)
    doc: dict[str, Any] = {"model": args.model, "device": args.device, "requests": args.requests,
                           "omp_threads": args.omp_threads, "busy": args.busy, "baseline": str(args.baseline or ""),
                           "chat_turns_words": [args.system_words, args.user_words, args.answer_words]}
    with bare_server() as bare:
        shape = (args.system_words, args.user_words, args.answer_words)
        for kind, cells, title in (("colocated", COLOCATED_CELLS, "colocated, client -> instance (one hop)"),
                                   ("pd", PD_CELLS, "PD, client -> proxy -> prefill, then -> decode"),
                                   ("pd-prefix", PREFIX_CELLS, "PD, prefix routing, decode only: client -> proxy -> "
                                                               "decode")):
            if kind in args.skip:
                continue
            with served(args, kind, logs) as targets, busy(targets, args.busy):
                rows = [run_cell(targets, bare, cell, args.requests, shape, first=k * 1_000_000)
                        for k, cell in enumerate(cells)]
                doc[kind] = {t.tree: [r[t.tree] for r in rows] for t in targets}
            show(title, doc[kind])
    if json_path is not None:
        json_path.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
