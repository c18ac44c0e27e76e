"""Two 1P1D `pdlaunch serve` of one config file (its fixed instance and side-channel ports; each its own proxy port
and log dir) started in the same second on one host. Both launchers found the fixed ports free, and each then
lost one of its instances' binds to the other: both deployments stopped, one on a decode's "address already in
use" that named no setting. Now the ports a launcher hands out are held against other launchers until its
deployment stops (config/port_reservations.py): one deployment serves, the other stops at once naming the field
to change and the deployment that holds it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pdlaunch.launcher.ports import PortAllocator
from tests.serving.e2e import READY_LINE, Serve
from tests.serving.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REFUSED_TIMEOUT_S = 60.0  # the loser stops in its plan, before it starts a process


@pytest.fixture()
def two(tmp_path: Path) -> Iterator[list[Serve]]:
    ports = PortAllocator("127.0.0.1")
    config = tmp_path / "pd.yaml"
    config.write_text(
        "device: cpu\nmodel: {path: tiny}\ncache: {block_size: 8, num_gpu_blocks: 256}\n"
        f"kv_transfer: {{connector: nixl, side_channel_port: {ports.free_range(2, 'side channels')}}}\n"
        f"instances:\n  - {{role: prefill, count: 1, base_port: {ports.free('prefill')}}}\n"
        f"  - {{role: decode, count: 1, base_port: {ports.free('decode')}}}\n")
    started = []
    try:
        for name in ("a", "b"):  # one right after the other: both plan before either instance binds
            (tmp_path / name).mkdir()
            started.append(Serve(tmp_path / name, [str(config)]))
        yield started
    finally:
        for serve in started:
            serve.stop()


def test_of_two_deployments_started_at_once_on_one_config_one_serves_and_the_other_names_the_port(
        two: list[Serve]) -> None:
    def one_refused() -> Serve | None:
        return next((serve for serve in two if serve.proc.poll() is not None), None)

    loser = wait_for(one_refused, "one of the two deployments to stop", REFUSED_TIMEOUT_S, poll=0.1)
    winner = next(serve for serve in two if serve is not loser)
    output = " ".join(loser.output.split())
    assert loser.proc.returncode == 1, output
    assert "belongs to another pdlaunch deployment on this host" in output, output
    assert f"pid {winner.proc.pid}: " in output, output  # the holder, by its launcher's pid
    assert "instances[0].base_port: port " in output, output  # the first fixed port its plan meets
    assert not loser.log_dir.exists() or not any(loser.log_dir.glob("*.log")), "the loser started processes"
    assert "Traceback" not in output, output

    winner.wait_ready()
    answer = httpx.post(f"{winner.url}/v1/completions", timeout=120,
                        json={"model": "tiny", "prompt": "two deployments", "max_tokens": 4, "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"], answer.text
    assert READY_LINE in winner.output and winner.proc.poll() is None, winner.output
