"""The TP rank link carries pickled messages: its key must not be derivable from the config alone. It mixes in
the deployment secret that every node of a multi-node deployment shares (and PDLAUNCH_TP_SECRET where set)."""

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.distributed.placement import SECRET_ENV, link_authkey


def _cfg(secret: str | None) -> DeploymentConfig:
    return DeploymentConfig.model_validate({
        "device": "cpu", "instances": [{"role": "prefill"}, {"role": "decode"}],
        "model": {"path": "tiny"}, "security": {"deployment_secret": secret},
    })


def test_the_key_depends_on_the_deployment_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    one = link_authkey(_cfg("a" * 32), "prefill-0", 29500)
    assert one == link_authkey(_cfg("a" * 32), "prefill-0", 29500)  # every node derives the same key
    assert one != link_authkey(_cfg("b" * 32), "prefill-0", 29500)  # someone without the secret cannot
    assert one != link_authkey(_cfg(None), "prefill-0", 29500)


def test_the_key_depends_on_pdlaunch_tp_secret_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    plain = link_authkey(_cfg("a" * 32), "prefill-0", 29500)
    monkeypatch.setenv(SECRET_ENV, "another secret")
    assert link_authkey(_cfg("a" * 32), "prefill-0", 29500) != plain
