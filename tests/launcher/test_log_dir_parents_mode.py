"""Every directory serve creates on the way to its log_dir is 0750, not only the last one.

`mkdir(mode=0o750, parents=True)` gives only the leaf that mode: the parents it makes get the umask's default,
0775 under umask 002 (Debian's default for a user with a group of their own). `--log-dir runs/today` then left
`runs` group-writable, and a later `--log-dir runs` was refused by serve and check-config (log_dir_owner_refusal)
for a directory pdlaunch had made itself. Now each directory made for a log_dir, by the launcher on this node (and
so a SLURM node step), or by a Ray rank on its node, is 0750 whatever the umask widens.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.log_dir_lock import log_dir_holder
from tests.config.cli_helpers import FREE_PORT, check

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def umask_002() -> Iterator[None]:
    before = os.umask(0o002)
    try:
        yield
    finally:
        os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_002")
def test_a_parent_serve_made_for_log_dir_is_accepted_as_log_dir_later(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    cfg = DeploymentConfig.model_validate({"device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
                                           "model": {"path": "tiny"}, "proxy": {"port": 0},
                                           "log_dir": str(runs / "today")})
    deployment = Deployment(cfg, Console(file=io.StringIO()))
    try:
        assert deployment.start(should_stop=lambda: True) is False  # made log_dir, started the instance, stopped
    finally:
        deployment.stop(drain=False)
    assert (runs / "today" / "colocated-0.log").exists()
    assert log_dir_holder(runs / "today") is None
    assert (_mode(runs), _mode(runs / "today")) == (0o750, 0o750)
    result = check(["--model", "tiny", "--device", "cpu", "--log-dir", str(runs), *FREE_PORT])
    assert "--log-dir" not in result.output and "log_dir" not in result.output, result.output
    assert result.exit_code == 0, result.output


@pytest.mark.usefixtures("umask_002")
def test_a_ray_rank_makes_its_log_dir_and_parents_0750(tmp_path: Path) -> None:
    """A rank on a node where log_dir does not exist yet makes it there (in its own process: its output goes to the
    log file)."""
    log_path = tmp_path / "runs" / "today" / "decode-0-rank1.log"
    code = ("import sys; from pdlaunch.distributed.ray_rank import log_to; "
            "log_to(sys.argv[1], 'decode-0 rank 1', {}); print('rank up')")
    done = subprocess.run([sys.executable, "-c", code, str(log_path)], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert log_path.read_text() == "rank up\n"
    assert (_mode(tmp_path / "runs"), _mode(tmp_path / "runs" / "today")) == (0o750, 0o750)
