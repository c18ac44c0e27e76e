"""A tp-1 instance's start imports no TP-group machinery."""

from __future__ import annotations

import subprocess
import sys


def test_a_tp1_instance_imports_no_tp_or_ray_executor() -> None:
    """The TP executors (worker pipes, rank listeners, Ray rank actors) are imported when a TP group is built:
    ~0.2 s of every tp-1 instance's start on a loaded 2-core host."""
    code = ("import sys, pdlaunch.server.__main__, pdlaunch.engine.llm_engine\n"
            "print(sorted(m for m in ('pdlaunch.distributed.ray_executor', 'pdlaunch.distributed.ray_rank',\n"
            "    'pdlaunch.distributed.tp_executor') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout
