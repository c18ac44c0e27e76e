"""Rank 0's process ending without the engine's shutdown (a script that never calls it, an engine whose build
failed after its TP group started) hung at exit for good: multiprocessing's exit handler SIGTERMs its daemon
children, which a TP worker ignores (the launcher signals the whole process group; rank 0 stops its ranks), then
joins them without a bound, while the worker waits for rank 0 to end or close its link. Rank 0 now stops and
reaps its ranks at exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXIT_WAIT_S = 240.0  # only bounds a broken test (a hang); building and leaving take seconds
SCRIPT = """
import sys
from pdlaunch.engine.llm import build_config
from pdlaunch.engine.llm_engine import LLMEngine
from tests.kv_transfer.deployment_secret import secured

if __name__ == "__main__":
    config = secured(build_config(sys.argv[1], "cpu", "float32", {"block_size": 8, "num_gpu_blocks": 128}))
    config.parallel.tp = 2
    engine = LLMEngine(config, None)
    print(*(p.pid for p in engine.executor._ranks.procs.values()), flush=True)
"""


@pytest.mark.slow
def test_rank0_leaving_without_shutdown_stops_and_reaps_its_ranks(llama_ckpt: Path, tmp_path: Path) -> None:
    script = tmp_path / "leave.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, str(script), str(llama_ckpt)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and the worker it waits for
        proc.communicate()
        pytest.fail(f"rank 0's process did not exit within {EXIT_WAIT_S:.0f}s of leaving without shutdown")
    assert proc.returncode == 0, err[-3000:]
    (worker,) = map(int, out.split())
    with pytest.raises(ProcessLookupError):  # stopped and reaped by rank 0, not left to init
        os.kill(worker, 0)
