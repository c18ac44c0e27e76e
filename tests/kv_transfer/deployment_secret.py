"""The deployment secret of KV tests, and helpers that sign the way a deployment does.

Tests that build configs by hand (no launcher) give them TEST_SECRET; tests that talk to a side
channel or hand kv_transfer_params to a decode sign with it, like a real peer or prefill would.
"""

from __future__ import annotations

import time
from typing import Any

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.kv_transfer.auth import SideChannelKeys
from pdlaunch.kv_transfer.params import params_key, sign_kv_transfer_params

TEST_SECRET = "kv-test-deployment-secret-0123456789"
KEYS = SideChannelKeys.from_secret(TEST_SECRET)


def secured(config: DeploymentConfig, secret: str = TEST_SECRET) -> DeploymentConfig:
    """`config` with security.deployment_secret set, as the launcher fills it."""
    config.security.deployment_secret = secret
    return config


def signed(params: dict[str, Any], lease_seconds: float = 60.0, secret: str = TEST_SECRET,
           now: float | None = None) -> dict[str, Any]:
    """kv_transfer_params signed as a prefill of the deployment signs its answer."""
    return sign_kv_transfer_params(params, params_key(secret), lease_seconds, time.time() if now is None else now)
