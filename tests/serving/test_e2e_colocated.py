"""End to end: `pdlaunch serve --colocated` (the PD reference) and a clean Ctrl-C."""

from __future__ import annotations

import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from pdlaunch.config.addresses import port_is_free
from tests.helpers.checkpoints import hf_greedy
from tests.serving.e2e import READY_LINE, START_TIMEOUT_S, Serve, alive, children_of, wait_gone
from tests.serving.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def serve(llama_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    deployment = Serve(tmp_path_factory.mktemp("e2e-colocated"), [
        "--model", str(llama_ckpt), "--colocated", "--num-gpu-blocks", "256"])
    try:
        yield deployment.wait_ready()
    finally:
        deployment.stop()


def test_one_colocated_instance_behind_the_proxy(serve: Serve) -> None:
    instances = httpx.get(f"{serve.url}/instances", timeout=5).json()
    assert [(i["name"], i["role"], i["state"]) for i in instances] == [("colocated-0", "colocated", "ready")]
    info = httpx.get(f"{instances[0]['url']}/info", timeout=5).json()
    assert info["transfer_mode"] is None and info["connector"] == {}


def test_greedy_colocated_equals_transformers(serve: Serve, llama_ckpt: Path) -> None:
    client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", timeout=120, max_retries=0)
    model = client.models.list().data[0].id
    rng = random.Random(4)  # the prompts of test_e2e_pd: PD == transformers == colocated
    for length in (5, 23, 40):
        prompt = [rng.randrange(3, 500) for _ in range(length)]
        out = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True, "return_token_ids": True})
        reference = hf_greedy(llama_ckpt, prompt, 10)
        assert out.choices[0].model_extra["token_ids"][:len(reference)] == reference


def test_ctrl_c_exits_0_and_frees_everything(serve: Serve) -> None:
    """Runs last: stops the module's deployment the way a user does."""
    ports = [serve.port] + [int(url.rsplit(":", 1)[1]) for url in serve.instance_urls().values()]
    children = list(serve.children)
    assert len(children) == 2  # colocated-0 and the proxy
    client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", timeout=10, max_retries=0)
    stream = client.completions.create(model=client.models.list().data[0].id, prompt="drain me", max_tokens=40,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = [next(iter(stream))]
    serve.proc.send_signal(signal.SIGINT)
    chunks += list(stream)  # in flight at Ctrl-C: drained, not cut
    assert chunks[-1].choices[0].finish_reason == "length"
    try:
        code = serve.proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pdlaunch serve did not exit within 10s of Ctrl-C:\n{serve.output}")
    assert code == 0, serve.output
    assert "stopped: all processes reaped" in serve.output
    assert not alive(children)
    wait_gone(children, timeout=1)
    assert all(port_is_free("127.0.0.1", port) for port in ports)


def test_ctrl_c_while_starting_reaps_everything_and_says_so(llama_ckpt: Path, tmp_path: Path) -> None:
    """Ctrl-C before the instance answered: the launcher said "stopping" and exited without saying whether
    anything was left (a SLURM node stopped in that window looked like one that never stopped). Now it says
    every process was reaped once they are, as after a Ctrl-C while serving."""
    serve = Serve(tmp_path, ["--model", str(llama_ckpt), "--colocated", "--num-gpu-blocks", "64"])
    try:
        children = wait_for(lambda: children_of(serve.proc.pid) or None, "the launcher to start its instance",
                            START_TIMEOUT_S, poll=0.05)
        assert READY_LINE not in serve.output, serve.output  # an instance importing torch is far from ready
        serve.proc.send_signal(signal.SIGINT)
        try:
            code = serve.proc.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pdlaunch serve did not exit within 60s of a Ctrl-C while starting:\n{serve.output}")
        text = serve.output
        assert code == 0, text
        assert "SIGINT received while starting; stopping" in text and "stopped: all processes reaped" in text, text
        assert not alive(children), text
    finally:
        serve.stop()
