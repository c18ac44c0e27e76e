"""What the instance pods of `pdlaunch render kubernetes` ask for: CPU pods request cores and the memory an instance
allocates (its weights when the checkpoint is readable here, its KV cache, the process itself), with no limits and
a torch thread pool of their size; GPU pods their GPUs as before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import Result

from pdlaunch.render.pod_resources import RUNTIME_MIB_PER_RANK
from tests.config.cli_helpers import LLAMA_CONFIG, invoke
from tests.render.test_kubernetes import check_schemas

MIB = 1 << 20


def render(out: Path, *args: str) -> tuple[Result, list[dict[str, Any]]]:
    result = invoke(["render", "kubernetes", *args, "--out", str(out), "--image", "pdlaunch:test"])
    assert result.exit_code == 0, result.output
    return result, [yaml.safe_load(path.read_text()) for path in sorted(out.glob("*.yaml"))]


def engines(found: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Role -> the engine containers of its LeaderWorkerSet's leader and worker templates."""
    out: dict[str, list[dict[str, Any]]] = {}
    for lws in (m for m in found if m["kind"] == "LeaderWorkerSet"):
        template = lws["spec"]["leaderWorkerTemplate"]
        out[lws["metadata"]["labels"]["pdlaunch.io/role"]] = [template[t]["spec"]["containers"][0]
                                                              for t in ("leaderTemplate", "workerTemplate")]
    return out


def memory_mib(engine: dict[str, Any]) -> int:
    value = engine["resources"]["requests"]["memory"]
    assert value.endswith("Mi"), value
    return int(value[:-2])


def test_a_cpu_pod_requests_cores_and_the_memory_of_its_kv_cache_and_process(tmp_path: Path) -> None:
    _, found = render(tmp_path / "one", "--model", "tiny", "--device", "cpu")
    config = tmp_path / "pd.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "tiny"}, "device": "cpu", "cache": {"cpu_kv_cache_gb": 3}}))
    _, larger = render(tmp_path / "three", str(config))
    for manifest in found:
        check_schemas(manifest)
    for role, containers in engines(found).items():
        for engine in containers:
            assert "limits" not in engine["resources"]  # a lower bound: a limit at it would kill the instance
            assert engine["resources"]["requests"]["cpu"] == "2"
            assert {"name": "OMP_NUM_THREADS", "value": "2"} in engine["env"]
            # `tiny`: 10 MiB of float32 weights, the 1 GiB KV cache rounded down to whole blocks, and the process
            assert 10 + 1024 + RUNTIME_MIB_PER_RANK - 1 <= memory_mib(engine) <= 10 + 1024 + RUNTIME_MIB_PER_RANK + 1
        grown = memory_mib(engines(larger)[role][0]) - memory_mib(containers[0])
        assert 2048 - 16 <= grown <= 2048 + 16, grown  # 2 GiB more KV cache


def test_a_cpu_pod_counts_the_weights_of_a_checkpoint_readable_here_and_each_rank(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    hf = LLAMA_CONFIG | {"vocab_size": 500_000}  # embeddings and lm_head: 2 x 500k x 128 float32, 488 MiB
    (checkpoint / "config.json").write_text(json.dumps(hf))
    result, unknown = render(tmp_path / "elsewhere", "--model", str(tmp_path / "not-here"), "--device", "cpu")
    assert "not the weights" in result.output and "not-here" in result.output
    result, known = render(tmp_path / "here", "--model", str(checkpoint), "--device", "cpu", "--prefill-tp", "2",
                           "--num-gpu-blocks", "64")
    assert "not the weights" not in result.output
    embeddings_mib = 2 * hf["vocab_size"] * hf["hidden_size"] * 4 / MIB
    prefill, decode = engines(known)["prefill"][0], engines(known)["decode"][0]
    assert prefill["resources"]["requests"]["cpu"] == "4" and decode["resources"]["requests"]["cpu"] == "2"
    # 64 blocks of 16 tokens x 2 layers x K and V x 4 KV heads (2 per rank at TP 2) x 16 dims x 4 bytes
    kv_mib = 64 * 16 * 2 * 2 * 4 * 16 * 4 / MIB
    assert embeddings_mib + kv_mib + RUNTIME_MIB_PER_RANK <= memory_mib(decode) <= embeddings_mib + kv_mib + 520
    # each of the prefill pod's 2 ranks holds its half of the weights, its own KV cache and a process of its own
    assert memory_mib(prefill) >= embeddings_mib + 2 * (kv_mib / 2 + RUNTIME_MIB_PER_RANK)
    # the checkpoint unreadable here: only the KV cache (1 GiB each) and the process
    assert memory_mib(engines(unknown)["decode"][0]) == 1024 + RUNTIME_MIB_PER_RANK


@pytest.mark.parametrize(("args", "gpus"), [
    (["--decode-tp", "2", "--transfer-mode", "pull"], {"prefill": "1", "decode": "2"}),
    (["--decode-tp", "4", "--gpus-per-node", "2", "--transfer-mode", "pull"], {"prefill": "1", "decode": "1"}),
])
def test_a_gpu_pod_asks_for_its_gpus_only(tmp_path: Path, args: list[str], gpus: dict[str, str]) -> None:
    _, found = render(tmp_path / "out", "--model", "tiny", "--device", "cuda", *args)
    for role, containers in engines(found).items():
        for engine in containers:
            assert engine["resources"] == {"requests": {"nvidia.com/gpu": gpus[role]},
                                           "limits": {"nvidia.com/gpu": gpus[role]}}
            assert all(e["name"] != "OMP_NUM_THREADS" for e in engine["env"])


def test_cpu_pod_memory_flags_set_each_engine_pods_request_and_limit(tmp_path: Path) -> None:
    """--cpu-pod-memory replaces the estimate as every CPU engine pod's memory request; --cpu-pod-memory-limit adds
    a limit (the kernel kills the instance above it), as written: Kubernetes takes either spelling of a quantity."""
    _, found = render(tmp_path / "both", "--model", "tiny", "--device", "cpu", "--prefill-tp", "2",
                      "--cpu-pod-memory", "6Gi", "--cpu-pod-memory-limit", "8G")
    for manifest in found:
        check_schemas(manifest)
    for role, containers in engines(found).items():
        for engine in containers:
            assert engine["resources"] == {"requests": {"cpu": "4" if role == "prefill" else "2", "memory": "6Gi"},
                                           "limits": {"memory": "8G"}}, role
    _, limited = render(tmp_path / "limit", "--model", "tiny", "--device", "cpu", "--cpu-pod-memory-limit", "4Gi")
    for engine in engines(limited)["decode"]:  # the request stays the estimate
        assert engine["resources"]["limits"] == {"memory": "4Gi"}
        assert 10 + 1024 + RUNTIME_MIB_PER_RANK - 1 <= memory_mib(engine) <= 10 + 1024 + RUNTIME_MIB_PER_RANK + 1


@pytest.mark.parametrize(("args", "flag", "said"), [
    (["--cpu-pod-memory", "lots"], "--cpu-pod-memory", "'lots' is not a Kubernetes quantity"),
    (["--cpu-pod-memory", "4GB"], "--cpu-pod-memory", "'4GB' is not a Kubernetes quantity"),
    (["--cpu-pod-memory", "-1Gi"], "--cpu-pod-memory", "'-1Gi' is not a Kubernetes quantity"),
    (["--cpu-pod-memory", "0"], "--cpu-pod-memory", "'0' is no memory"),
    (["--cpu-pod-memory", "512m"], "--cpu-pod-memory", "'512m' is 0.512 bytes (m is milli): write 512Mi or 512M"),
    (["--cpu-pod-memory-limit", ""], "--cpu-pod-memory-limit", "'' is not a Kubernetes quantity"),
    (["--cpu-pod-memory", "2Gi", "--cpu-pod-memory-limit", "1Gi"], "--cpu-pod-memory-limit",
     "1Gi is below the memory each CPU engine pod requests (2Gi, --cpu-pod-memory)"),
    (["--cpu-pod-memory-limit", "1Gi"], "--cpu-pod-memory-limit",
     "1Gi is below the memory prefill pods request (15"),  # 10 MiB of weights, 1 GiB KV cache, 512 MiB process
])
def test_a_cpu_pod_memory_kubernetes_would_refuse_is_refused_naming_the_flag(
        tmp_path: Path, args: list[str], flag: str, said: str) -> None:
    result = invoke(["render", "kubernetes", "--model", "tiny", "--device", "cpu", *args, "--out",
                     str(tmp_path / "out"), "--image", "pdlaunch:test"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert f"error: {flag}: {said}" in text, text
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--cpu-pod-memory", "--cpu-pod-memory-limit"])
def test_cpu_pod_memory_on_gpu_pods_is_refused(tmp_path: Path, flag: str) -> None:
    """GPU pods ask for their GPUs only (module docstring of render/pod_resources.py): the flag would do nothing."""
    result = invoke(["render", "kubernetes", "--model", "tiny", "--device", "cuda", flag, "4Gi", "--out",
                     str(tmp_path / "out"), "--image", "pdlaunch:test"])
    assert result.exit_code == 1, result.output
    assert f"error: {flag}: sizes CPU engine pods (device cpu), and this deployment's pods run on GPUs" \
        in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()
