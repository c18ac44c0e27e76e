"""Session fixtures shared by every test package: tiny random HF checkpoints, gpu marker skip.

The demo model is built into the real user cache (`~/.cache/pdlaunch`, or `$PDLAUNCH_CACHE_DIR`
when set), exactly as a user's first `--model tiny` run does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

# Tests never reach the hub; quiet transformers' progress bars in test output.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# The test machine is 2 shared cores: with 2 intra-op threads, OpenMP spin-waiting under load
# makes a small matmul ~20x slower than with one thread (measured 9.3 ms vs 0.39 ms).
torch.set_num_threads(int(os.environ.get("PDLAUNCH_TEST_TORCH_THREADS", "1")))

# proxy.workers defaults to auto: one proxy process per 8 CPUs it may use (config/proxy_workers.py). The suite's
# deployments are written for one proxy process, as CI's 2 cores give: on a bigger machine, this process and every
# process it starts keep to 7 CPUs, where auto is 1 (tests/proxy/test_proxy_workers_auto.py resolves auto from fake
# CPU counts; tests/serving/test_proxy_workers.py runs several workers by name).
_AUTO_ONE_WORKER_CPUS = 7
if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) > _AUTO_ONE_WORKER_CPUS:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:_AUTO_ONE_WORKER_CPUS])


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the test process with pytest's exit status, without running native library destructors,
    once tests have loaded NIXL in this process: the UCX copy bundled with nixl_cu13 crashes in its
    libnl-route destructor at exit (signal 11 after every test passed, seen with gdb in
    rtnl_tc_unregister). Instances avoid it the same way (pdlaunch/server/__main__.py)."""
    if _EXIT_STATUS and any(name.startswith("nixl") for name in sys.modules):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `make test-gpu` on a GPU host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _gpu_cache_released(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a GPU test, the CUDA memory torch's caching allocator keeps for reuse goes back to the device:
    `make test-gpu` runs workers side by side on one GPU, and one worker's cached peak would otherwise stay out
    of the others' reach for the rest of the run."""
    yield
    if "gpu" in request.keywords and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _free_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """check-config and serve refuse a CPU deployment that does not fit this machine's free memory
    (config/rules/host_memory.py). Tests of other rules check CPU configs of several GiB (1 GiB of KV cache per
    rank by default, TP 8 in some) and must not pass or fail with what other processes on the test machine hold
    at the moment: in-process checks see 256 GiB free, unless a test patches it itself."""
    from pdlaunch.config.rules import host_memory

    monkeypatch.setattr(host_memory, "available_memory_bytes", lambda: 256 << 30)


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama, llama3 rope scaling, GQA, 2 layers, untied."""
    from tests.helpers.checkpoints import make_llama

    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def qwen2_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 with qkv bias."""
    from tests.helpers.checkpoints import make_qwen2

    return make_qwen2(tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session")
def mistral_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mistral with sliding_window=8 on every layer."""
    from tests.helpers.checkpoints import make_mistral

    return make_mistral(tmp_path_factory.mktemp("mistral"))


@pytest.fixture(scope="session")
def hybrid_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2, layer_types alternating full/sliding (window 6), 4 layers."""
    from tests.helpers.checkpoints import make_qwen2_hybrid

    return make_qwen2_hybrid(tmp_path_factory.mktemp("hybrid"))


@pytest.fixture(scope="session")
def sharded_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama, 3 layers, saved in several shards with model.safetensors.index.json."""
    from tests.helpers.checkpoints import make_sharded

    return make_sharded(tmp_path_factory.mktemp("sharded"))


@pytest.fixture(scope="session")
def qwen3_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3: q_norm/k_norm per head, head_dim 32 != hidden/heads, GQA, untied."""
    from tests.helpers.checkpoints import make_qwen3

    return make_qwen3(tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="session")
def qwen3_tied_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3 with tied embeddings and 4 layers alternating full/sliding (window 6)."""
    from tests.helpers.checkpoints import make_qwen3

    return make_qwen3(tmp_path_factory.mktemp("qwen3_tied"), tie=True, sliding_window=6)


@pytest.fixture(scope="session")
def llama32_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama 3.2 shape: tied (no lm_head.weight saved), llama3 rope scaling, head_dim 64, GQA."""
    from tests.helpers.checkpoints import make_llama32

    return make_llama32(tmp_path_factory.mktemp("llama32"))


@pytest.fixture(scope="session")
def moe_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """moe_ckpt(kind) -> a tiny random MoE checkpoint (kinds: tests/helpers/checkpoints.py MOE_BUILDERS),
    built once per session."""
    from tests.helpers.checkpoints import MOE_BUILDERS

    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = MOE_BUILDERS[kind](tmp_path_factory.mktemp(kind))
        return built[kind]

    return get
