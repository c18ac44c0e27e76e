"""Two deployments may share one Mooncake metadata server (kv_transfer.mooncake_metadata_server): each transfer
engine registers there under its name, and peers find its address and memory by that name. The name was the
engine's host and a port free there at that moment, neither unique among the server's users: every host with the
default side_channel_host names its engines 127.0.0.1 (containers on different hosts often share an address too),
and a port that was only probed and let go is free again for the next engine that probes. Mooncake's HTTP metadata
server refuses a second engine of a taken name, so that instance did not start ("the Mooncake transfer engine did
not start ...: code -1"), and an engine that died without deregistering kept its name taken until the server
restarted. Here the port repeats for every engine, as it may by chance."""

from __future__ import annotations

import pytest
import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.kv_transfer.factory import create_connector
from pdlaunch.kv_transfer.mooncake import engine as mooncake_engine
from pdlaunch.kv_transfer.mooncake.agent import PeerMetadata
from pdlaunch.kv_transfer.mooncake.connector import MooncakeConnector
from pdlaunch.kv_transfer.mooncake.engine import MooncakeEngine
from pdlaunch.kv_transfer.params import RemoteDecodeRequest
from tests.kv_transfer.deployment_secret import secured
from tests.kv_transfer.mooncake_metadata import metadata_server
from tests.kv_transfer.mooncake_skip import requires_mooncake
from tests.kv_transfer.pd_procs import make_spec, wait_events

SAME_PORT = 40123


@pytest.fixture
def same_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mooncake_engine, "_unused_port", lambda host: SAME_PORT)


@requires_mooncake
@pytest.mark.usefixtures("same_port")
def test_engines_of_one_host_and_port_register_under_names_of_their_own() -> None:
    with metadata_server() as url:
        engines: list[MooncakeEngine] = []
        try:
            for _ in range(3):  # an engine of deployment A, one of B, and a writer that reaches both by name
                engines.append(MooncakeEngine("127.0.0.1", "tcp", url))
            names = [engine.session_id for engine in engines]
            assert len(set(names)) == 3, names
            for name in names:  # what a peer accepts in the handshake
                PeerMetadata.model_validate({"name": "peer", "session": name, "protocol": "tcp"})
            *targets, writer = engines
            source = torch.arange(64, dtype=torch.uint8)
            writer.register(source.data_ptr(), 64, "*")
            received = [torch.zeros(64, dtype=torch.uint8) for _ in targets]
            for target, buffer in zip(targets, received):
                target.register(buffer.data_ptr(), 64, "*")
            for i, (target, buffer) in enumerate(zip(targets, received)):
                writer.transfer("WRITE", target.session_id, [(source.data_ptr() + i, 32)], [(buffer.data_ptr(), 32)])
            # each WRITE landed in the engine its name stands for, and only there
            assert [buffer[:32].tolist() for buffer in received] == [list(range(i, i + 32)) for i in range(2)]
        finally:
            for engine in engines:
                engine.close()


def _pair(url: str, deployment: str) -> tuple[MooncakeConnector, MooncakeConnector]:
    kv = KVTransferConfig(connector="mooncake", mooncake_metadata_server=url, verify_kv=True)
    config = secured(DeploymentConfig(device="cpu", kv_transfer=kv), secret=f"{deployment}-secret-0123456789abcdef")
    prefill, decode = (create_connector(config, InstanceSpec(role=role, port=1, engine_id=f"{deployment}-{role}",
                                                              device="cpu")) for role in ("prefill", "decode"))
    assert isinstance(prefill, MooncakeConnector) and isinstance(decode, MooncakeConnector)
    return prefill, decode


@requires_mooncake
@pytest.mark.usefixtures("same_port")
def test_two_deployments_push_through_one_metadata_server() -> None:
    with metadata_server() as url:
        started: list[MooncakeConnector] = []
        try:
            pairs = []
            for deployment in ("a", "b"):
                pair = _pair(url, deployment)
                started += pair
                pairs.append(pair)
            assert len({c.transfer_engine.session_id for c in started}) == 4
            for seed, (prefill, decode) in enumerate(pairs):
                prefill.register_kv_caches(make_spec(seed=2 * seed + 1))
                decode.register_kv_caches(make_spec(seed=2 * seed + 2))
            for name, (prefill, decode) in zip("ab", pairs):  # verify_kv: the decode checks what landed
                prompt = list(range(13))
                _, params = prefill.request_finished(f"{name}-r", prompt, RemoteDecodeRequest(do_remote_decode=True),
                                                     [[1, 2, 3, 4]])
                assert params is not None
                decode.start_load(f"{name}-r", prompt, params, [[5, 6, 7, 8]], 0,
                                  decode.get_num_new_matched_tokens(f"{name}-r", prompt, params, 0))
                done = wait_events(decode.get_finished, lambda e, r=f"{name}-r": r in e.finished_recving
                                   or r in e.failed_recving, 30.0, f"deployment {name}'s push")
                assert f"{name}-r" in done.finished_recving, done.failed_recving
        finally:
            for connector in reversed(started):
                connector.shutdown()
