"""The deployment secret every process of a deployment shares: the user's, or a fresh one for one node, and
the file that carries it written readable by this user only."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.errors import PdlaunchError

SECRET_ENV = "PDLAUNCH_DEPLOYMENT_SECRET"


def with_deployment_secret(cfg: DeploymentConfig) -> DeploymentConfig:
    """The config with `security.deployment_secret` filled: the user's (config or PDLAUNCH_DEPLOYMENT_SECRET,
    needed to be the same on every node), else a fresh random one for this single-node deployment."""
    if cfg.security.deployment_secret:
        return cfg
    given = os.environ.get(SECRET_ENV)
    if not given and cfg.parallel.nodes and len(cfg.parallel.nodes) > 1:
        raise PdlaunchError("a multi-node deployment needs one shared secret", field="security.deployment_secret",
                            hint=f"set security.deployment_secret (16+ characters) or {SECRET_ENV} to the same "
                                 "value on every node, e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`")
    security = cfg.security.model_copy(update={"deployment_secret": given or secrets.token_hex(32)})
    return cfg.model_copy(update={"security": security})


def write_private(path: Path, text: str) -> None:
    """Write `text` readable by this user only: the file carries the deployment secret and API key. Written to a
    new file beside `path` (mode 0600 from its creation) and renamed over it: whatever had the name before (a
    symlink planted to a file elsewhere, an old file readable by others) is replaced, never written through."""
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise PdlaunchError(f"cannot write {str(path)!r}: {exc.strerror or exc}", field="log_dir",
                            hint="pass --log-dir DIR (or set log_dir) to a directory you can write, or remove "
                            "what is in the way") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
