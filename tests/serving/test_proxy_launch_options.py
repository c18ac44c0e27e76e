"""What the launcher hands the proxy and the instances: --max-request-bytes, the internal token on its own
/info calls (which need a credential once --api-key is set), and each decode the prefills' side channels."""

from __future__ import annotations

from pathlib import Path

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.http.auth import INTERNAL_TOKEN_HEADER, internal_token
from pdlaunch.kv_transfer.push_params import PREFILL_SIDE_CHANNELS_ENV, prefill_side_channels
from pdlaunch.launcher.child_commands import prefill_side_channels_env
from pdlaunch.launcher.deployment import Deployment


def _deployment(tmp_path: Path) -> Deployment:
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "model": {"path": "tiny"}, "proxy": {"port": 0},
        "instances": [{"role": "prefill", "count": 2}, {"role": "decode"}],
        "security": {"api_key": "sk-test", "max_request_bytes": 12345,
                     "deployment_secret": "launcher-test-secret-0123456789"},
    })
    return Deployment(cfg, log_dir=tmp_path)


def test_proxy_argv_and_internal_token(tmp_path: Path) -> None:
    deployment = _deployment(tmp_path)
    argv = deployment._proxy_argv()
    assert argv[argv.index("--max-request-bytes") + 1] == "12345"
    token = deployment._http.headers[INTERNAL_TOKEN_HEADER]
    assert token == internal_token("launcher-test-secret-0123456789")
    assert "sk-test" not in " ".join(argv)  # secrets travel in the environment only


def test_decodes_learn_every_prefill_side_channel(tmp_path: Path) -> None:
    deployment = _deployment(tmp_path)
    env = prefill_side_channels_env(deployment.cfg, deployment.plan)
    prefills = [p.spec for p in deployment.plan.instances if p.spec.role == "prefill"]
    assert prefill_side_channels(env) == {("127.0.0.1", s.side_channel_port) for s in prefills}
    assert len(prefill_side_channels(env)) == 2 and PREFILL_SIDE_CHANNELS_ENV in env
