"""Does a dead peer's GPU memory stay allocated while our NIXL agent holds it, and what frees it?

    python benchmarks/ipc_peer_memory.py READ|WRITE [--gib 20]    # one GPU; UCX_CUDA_IPC_CACHE=y|n to compare

An exporter process registers a `--gib` GiB cudaMalloc tensor with its NIXL agent (kv_transfer/agent.py KVAgent); this
process loads its metadata and READs or WRITEs 1 GiB of it (UCX opens a CUDA IPC mapping of the whole allocation). The
exporter then dies without freeing anything, as a crashed instance does. The GPU memory in use (nvidia-smi) is printed
at each stage: both alive, exporter dead, 5 s after `forget_remote` of its agent, after a transfer with another peer
(UCX may prune its cache then), after our agent's close. One H200, nixl 1.5.1 (RESULTS.md, sixty-first session): with
UCX's default the dead exporter's memory stays allocated through all of them (only this process's exit frees it);
with UCX_CUDA_IPC_CACHE=n, `forget_remote` frees it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import time
from multiprocessing.synchronize import Event

GIB = 1 << 30


def used_gib() -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return round(float(out.splitlines()[0]) / 1024, 2)


def exporter(queue: mp.Queue, die: Event, gib: int) -> None:
    import torch

    from pdlaunch.kv_transfer.agent import KVAgent

    memory = torch.zeros(gib * GIB, dtype=torch.uint8, device="cuda")
    agent = KVAgent(f"exporter-{os.getpid()}")
    agent.register([memory])
    queue.put((agent.metadata(), memory.data_ptr()))
    die.wait(120)
    os._exit(0)  # a crash: nothing deregistered or freed


def move(agent: object, op: str, local: int, remote: int, peer: str) -> str:
    xfer = agent.transfer(op, [(local, GIB)], [(remote, GIB)], peer, 0, b"")  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while xfer.state() == "PROC" and time.monotonic() < deadline:
        time.sleep(0.01)
    state = xfer.state()
    xfer.release()
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", choices=["READ", "WRITE"])
    parser.add_argument("--gib", type=int, default=20)
    args = parser.parse_args()
    import torch

    from pdlaunch.kv_transfer.agent import KVAgent

    ctx = mp.get_context("spawn")
    cache = os.environ.get("UCX_CUDA_IPC_CACHE", "(unset)")
    print(f"{args.op}, UCX_CUDA_IPC_CACHE={cache}: used before {used_gib()} GiB", flush=True)
    queue, die = ctx.Queue(), ctx.Event()
    first = ctx.Process(target=exporter, args=(queue, die, args.gib))
    first.start()
    metadata, remote = queue.get(timeout=180)
    local = torch.ones(GIB, dtype=torch.uint8, device="cuda")
    agent = KVAgent(f"importer-{os.getpid()}")
    agent.register([local])
    peer = agent.add_remote(metadata)
    print(f"transfer {move(agent, args.op, local.data_ptr(), remote, peer)}; both alive: {used_gib()} GiB", flush=True)
    die.set()
    first.join(60)
    time.sleep(2)
    print(f"exporter dead, its agent loaded: {used_gib()} GiB", flush=True)
    agent.forget_remote(peer)
    time.sleep(5)
    print(f"5 s after forget_remote: {used_gib()} GiB", flush=True)
    queue2, die2 = ctx.Queue(), ctx.Event()
    second = ctx.Process(target=exporter, args=(queue2, die2, 1))
    second.start()
    metadata2, remote2 = queue2.get(timeout=180)
    move(agent, args.op, local.data_ptr(), remote2, agent.add_remote(metadata2))
    time.sleep(2)
    print(f"after a transfer with another (1 GiB) peer: {used_gib()} GiB", flush=True)
    die2.set()
    second.join(60)
    agent.close()
    time.sleep(2)
    print(f"after our agent's close: {used_gib()} GiB", flush=True)


if __name__ == "__main__":
    main()
