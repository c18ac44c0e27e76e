"""What this host must provide before serve starts anything: a log_dir serve can create or write in
(instead of a FileExistsError traceback from the launcher), the storage connector's directory, and what the
chosen KV connector needs installed (Mooncake's wheel, the libraries it links, RDMA devices). Also
`make_output_dir`, the same for a command's output folder (bench results, manifests, checkpoints), made
before the command's work.
"""

from __future__ import annotations

import os
from pathlib import Path

from pdlaunch.config import mooncake_install
from pdlaunch.config.models import DeploymentConfig
from pdlaunch.config.problems import Problem, problem
from pdlaunch.errors import PdlaunchError

_FIX = "pass --log-dir DIR (or set log_dir) to a directory you can write"
_STORAGE_FIX = "set kv_transfer.storage_path to a directory you can write"


def log_dir_problems(log_dir: str) -> list[Problem]:
    """Problems with `log_dir` as the launcher uses it (created with its parents, then written)."""
    return writable_dir_problems("log_dir", log_dir, _FIX)


def storage_path_problems(cfg: DeploymentConfig) -> list[Problem]:
    """The storage connector's directory, which every PD instance creates (`~` expanded) when its KV cache is
    registered: found here, not as an instance exiting after its weights are loaded."""
    if cfg.colocated or cfg.kv_transfer.connector != "storage":
        return []
    value = cfg.kv_transfer.storage_path
    try:
        path = str(Path(value).expanduser())  # as the instance expands it
    except RuntimeError:  # `~nosuchuser/kv`: the instance would fail the same way
        return [problem("kv_transfer.storage_path", f"{value!r} names the home directory of no user here",
                        _STORAGE_FIX)]
    return writable_dir_problems("kv_transfer.storage_path", path, _STORAGE_FIX)


def writable_dir_problems(field: str, value: str, fix: str) -> list[Problem]:
    """Problems with the directory `value` (of config `field`) that a process creates with its parents, then writes."""
    if not value.strip():
        return [problem(field, "is empty", fix)]
    if "\0" in value:  # the kernel cannot take the name: every os call on it raises ValueError
        return [problem(field, f"{value!r} contains a NUL character", fix)]
    path = Path(value)
    try:
        if path.exists():
            return _existing_dir_problems(field, value, path, fix)
        return _creatable_problems(field, value, path, fix)
    except OSError as exc:  # a name too long for the file system, a loop of symlinks, an I/O error
        return [problem(field, f"{value!r} cannot be used: {exc.strerror or exc}", fix)]


def _existing_dir_problems(field: str, value: str, path: Path, fix: str) -> list[Problem]:
    if not path.is_dir():
        return [problem(field, f"{value!r} exists and is a file, not a directory", f"remove the file or {fix}")]
    if not os.access(path, os.W_OK | os.X_OK):
        return [problem(field, f"{value!r} is not writable by this user", fix)]
    return []


def _creatable_problems(field: str, value: str, path: Path, fix: str) -> list[Problem]:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return [problem(field, f"{value!r} cannot be created: {str(parent)!r} is a file", fix)]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [problem(field, f"{value!r} cannot be created: {str(parent)!r} is not writable by this user", fix)]
    return []


def make_output_dir(folder: Path, flag: str) -> None:
    """Create `folder` (for output files) before the work that fills it, so that a path that cannot be written
    fails naming `flag` at once, not as a traceback once the work is done."""
    if folder.exists() and not folder.is_dir():
        raise PdlaunchError(f"{str(folder)!r} is a file, not a folder", field=flag, hint="give a folder's path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PdlaunchError(f"cannot create the folder {str(folder)!r}: {exc.strerror or exc}", field=flag,
                            hint="give a folder you can write, or one that can be created there") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PdlaunchError(f"the folder {str(folder)!r} is not writable", field=flag,
                            hint="give a folder you can write")


def kv_connector_problems(cfg: DeploymentConfig) -> list[Problem]:
    """Mooncake: the package and the system libraries it links import here, a CUDA build for a CUDA KV
    cache, an RDMA device for rdma."""
    if cfg.colocated or cfg.kv_transfer.connector != "mooncake":
        return []
    reason = mooncake_install.missing_reason()
    if reason is not None:
        return [problem("kv_transfer.connector", f"the mooncake connector is chosen but {reason}",
                        mooncake_install.INSTALL_HINT)]
    if cfg.device == "cuda" and mooncake_install.cpu_only_build():
        return [problem("kv_transfer.connector", "the KV cache is on CUDA but the Mooncake installed here is the "
                        "CPU-only wheel (mooncake-transfer-engine-non-cuda)",
                        "pip install mooncake-transfer-engine (CUDA 12) or mooncake-transfer-engine-cuda13")]
    if cfg.kv_transfer.mooncake_protocol == "rdma" and mooncake_install.resolve_protocol("auto")[0] != "rdma":
        return [problem("kv_transfer.mooncake_protocol", "rdma is chosen but this host lists no RDMA device "
                        f"({mooncake_install.RDMA_DEVICES})", "use mooncake_protocol auto or tcp")]
    return []
