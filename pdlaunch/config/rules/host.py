"""What this host must provide before serve starts anything: a log_dir serve can create and write its files
in (instead of a FileExistsError traceback from the launcher), the storage connector's directory, the model
cache a built-in model is built into on first use, and what the
chosen KV connector needs installed (Mooncake's wheel, the libraries it links, RDMA devices). Also
`make_output_dir`, the same for a command's output folder (bench results, manifests, checkpoints), made
before the command's work.

A directory is checked as serve makes it (`mkdir(parents=True, exist_ok=True)`, then files opened in it),
without making anything: each step of its path, what the kernel takes no new files in (/proc, /sys), and the
files serve opens in an existing log_dir.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import stat
from pathlib import Path

from pdlaunch.config import mooncake_install
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.port_plan import plan_instances
from pdlaunch.config.problems import Problem, problem
from pdlaunch.errors import PdlaunchError

_FIX = "pass --log-dir DIR (or set log_dir) to a directory you can write"
_STORAGE_FIX = "set kv_transfer.storage_path to a directory you can write"
LOCK_NAME = ".pdlaunch.lock"  # node 0's lock in log_dir (launcher/log_dir_lock.py)
DEPLOYMENT_FILE = "deployment.json"  # what the launcher writes in log_dir for its instances
# The kernel's own file systems: their paths name kernel state, and no directory or file can be made there.
_KERNEL_FS = frozenset({"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "pstore",
                        "efivarfs", "configfs"})
MOUNTINFO = Path("/proc/self/mountinfo")


def lock_name(node_rank: int) -> str:
    """Node 0's lock, or node K's: the launchers of one multi-node deployment may share a directory
    (a home on NFS, the default `logs`), and each holds only its own node's files."""
    return LOCK_NAME if node_rank == 0 else f".pdlaunch.node{node_rank}.lock"


def log_dir_problems(cfg: DeploymentConfig) -> list[Problem]:
    """Problems with `log_dir` as this node's launcher uses it: created with its parents, then its lock,
    deployment.json and one log per process opened in it."""
    if cfg.log_dir.startswith("~"):  # the loader expands `~` and `~name`: a name of no user is left
        return [problem("log_dir", f"{cfg.log_dir!r} names the home directory of no user here",
                        f"{_FIX} (`./{cfg.log_dir}` for a directory of that name here)")]
    problems = writable_dir_problems("log_dir", cfg.log_dir, _FIX)
    if problems or not Path(cfg.log_dir).is_dir():
        return problems
    try:
        foreign = log_dir_owner_refusal(Path(cfg.log_dir))
    except OSError as exc:
        return [problem("log_dir", f"{cfg.log_dir!r} cannot be used: {exc.strerror or exc}", _FIX)]
    if foreign is not None:
        return [problem("log_dir", *foreign)]
    for name in _served_files(cfg):
        path = Path(cfg.log_dir) / name
        try:
            refusal = _file_refusal(path)
        except OSError as exc:
            refusal = f"cannot be used: {exc.strerror or exc}"
        if refusal is not None:
            return [problem("log_dir", f"{str(path)!r} {refusal}", f"remove it or {_FIX}")]
    return []


def _served_files(cfg: DeploymentConfig) -> list[str]:
    """The files this node's launcher opens in log_dir: its lock, deployment.json, a log per instance it runs,
    and the proxy's on node 0."""
    me = cfg.parallel.node_rank
    logs = [f"{planned.name}.log" for planned in plan_instances(cfg, [], strict=False) if planned.node == me]
    return [lock_name(me), DEPLOYMENT_FILE, *logs, *(["proxy.log"] if me == 0 else [])]


LOG_DIR_MODE = 0o750  # a log_dir serve creates: no one else writes in it (log_dir_owner_refusal)
NO_FOLLOW = "it is a symlink, which serve does not write through"


def make_log_dir(log_dir: Path) -> None:
    """`log_dir.mkdir(parents=True, exist_ok=True)`, with every directory it makes LOG_DIR_MODE (a umask can only
    narrow it). Path.mkdir gives the parents it makes the default mode: 0775 under umask 002, so `--log-dir
    runs/today` left `runs` group-writable, and a later `--log-dir runs` was refused (log_dir_owner_refusal)."""
    try:
        log_dir.mkdir(mode=LOG_DIR_MODE)
    except FileNotFoundError:
        if log_dir.parent == log_dir:
            raise
        make_log_dir(log_dir.parent)
        log_dir.mkdir(mode=LOG_DIR_MODE, exist_ok=True)
    except OSError:
        if not log_dir.is_dir():  # as exist_ok: an existing directory (or a link to one) is fine, anything else not
            raise


def log_dir_owner_refusal(log_dir: Path) -> tuple[str, str] | None:
    """(what is wrong, how to fix it) when someone other than this user can change what is in the existing
    `log_dir`: its owner, another user, or its group or others by its mode (a sticky bit does not help: they
    still take serve's file names first). They could swap deployment.json (the deployment's config and secret)
    before the instances read it, or plant a name for serve to write through. None when only this user (and
    root) can."""
    st = os.stat(log_dir)
    named = repr(str(log_dir))
    if st.st_uid != os.geteuid():
        return (f"{named} belongs to {_user(st.st_uid)}, not to you, {_user(os.geteuid())}: its owner could "
                "replace the files serve writes there (deployment.json holds the deployment secret)",
                "pass --log-dir DIR (or set log_dir) to a directory of your own; serve creates a missing one")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        who = {0o020: "its group", 0o002: "others", 0o022: "its group and others"}[mode & 0o022]
        return (f"{named} is writable by {who} (mode {mode:04o}): they could replace the files serve writes there "
                "(deployment.json holds the deployment secret)",
                f"run `chmod go-w {shell_word(str(log_dir))}`, or pass --log-dir DIR (or set log_dir) to a directory "
                "of your own")
    return None


def shell_word(path: str) -> str:
    """`path` as one word of a shell command, to paste as it is: single-quoted (a quote as '\\''), where a path's
    repr would let the shell expand `$HOME` in it or read its backslashes and escapes as other characters; a relative
    path starting with `-` after `./`, so that the command does not take it for an option."""
    path = f"./{path}" if path.startswith("-") else path
    return "'" + path.replace("'", "'\\''") + "'"


def _user(uid: int) -> str:
    """`alice (uid 1000)`, or `uid 1000` for a uid with no name here."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def os_reason(exc: OSError) -> str:
    """What an OSError from opening a file in log_dir says, in words (O_NOFOLLOW's ELOOP: a symlink)."""
    return NO_FOLLOW if exc.errno == errno.ELOOP else exc.strerror or str(exc)


def _file_refusal(path: Path) -> str | None:
    """Why opening `path` for writing (creating it if missing) would fail, when it exists already."""
    if os.path.islink(path):
        return "is a symlink, which serve does not write through"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None  # created in its directory, which was checked writable
    if stat.S_ISDIR(mode):
        return "is a directory, where serve writes a file"
    if not os.access(path, os.W_OK):
        return "is not writable by this user"
    return None


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


def model_cache_problems(cfg: DeploymentConfig) -> list[Problem]:
    """The cache (PDLAUNCH_CACHE_DIR) that a built-in model not built yet is fetched or built into on first use:
    found here, not as serve's `cannot create the demo model cache ...: [Errno 17] File exists`."""
    from pdlaunch.model.demo import DEMO_MODEL, DEMO_NAME, TINY_MODEL  # lazy: the model package is heavier
    from pdlaunch.model.demo_model import DEMO_MODEL_NAME, cache_dir

    built = {TINY_MODEL: DEMO_NAME, DEMO_MODEL: DEMO_MODEL_NAME}.get(cfg.model.path)
    if built is None:
        return []
    root = cache_dir()
    try:
        if (root / built / "config.json").is_file():
            return []  # only read
    except OSError:
        pass  # named below by writable_dir_problems
    return writable_dir_problems("PDLAUNCH_CACHE_DIR", str(root), "set PDLAUNCH_CACHE_DIR to a directory you can write",
                                 what=f"(where the {cfg.model.path} model is built on first use)")


def writable_dir_problems(field: str, value: str, fix: str, what: str = "") -> list[Problem]:
    """Problems with the directory `value` (of config `field`) that a process creates with its parents, then writes;
    `what` says after the value what the directory is for, where the field alone does not."""
    named = f"{value!r} {what}" if what else repr(value)
    if not value.strip():
        return [problem(field, "is empty", fix)]
    if "\0" in value:  # the kernel cannot take the name: every os call on it raises ValueError
        return [problem(field, f"{named} contains a NUL character", fix)]
    try:
        refusal = _dir_refusal(Path(value))
    except OSError as exc:  # a name too long for the file system, a loop of symlinks, an I/O error
        return [problem(field, f"{named} cannot be used: {exc.strerror or exc}", fix)]
    if refusal is None:
        return []
    reason, remove = refusal
    return [problem(field, f"{named} {reason}", f"{remove}{fix}")]


def _dir_refusal(path: Path) -> tuple[str, str] | None:
    """Why `path.mkdir(parents=True, exist_ok=True)`, then writing in it, would fail: (what is wrong, what to
    remove first: "" or "remove the file or "); None when it would work. Walks the path from its first step,
    as the kernel does (`f/../x` fails at the file f), and makes nothing."""
    for step in [*reversed(path.parents), path]:
        try:
            is_dir = stat.S_ISDIR(os.stat(step).st_mode)
        except FileNotFoundError:
            if os.path.islink(step):  # mkdir finds the name taken, by a link to nothing
                return (f"cannot be created: {str(step)!r} is a symlink to {os.readlink(step)!r}, which does not "
                        "exist", "remove the symlink or ")
            reason = _no_new_entries(step.parent)
            return None if reason is None else (f"cannot be created: {str(step.parent)!r} {reason}", "")
        if not is_dir and step == path:
            return "exists and is a file, not a directory", "remove the file or "
        if not is_dir:
            return f"cannot be created: {str(step)!r} is a file", ""
    reason = _no_new_entries(path)
    return None if reason is None else (reason, "")


def _no_new_entries(directory: Path) -> str | None:
    """Why no directory or file can be made in the existing `directory`; None when they can."""
    if not os.access(directory, os.W_OK | os.X_OK):  # also a read-only mount, for root too
        return "is not writable by this user"
    kernel = _kernel_file_system(directory)
    if kernel is not None:  # root passes the permission look; the kernel still refuses (ENOENT, EPERM)
        return f"is on the kernel's {kernel} file system, where no directory or file can be made"
    return None


def _kernel_file_system(directory: Path) -> str | None:
    """The kernel file system (proc, sysfs, ...) `directory` is on, by the mount closest above it; None for
    any other, or when this host's mounts cannot be read."""
    try:
        mounts = MOUNTINFO.read_text(errors="replace").splitlines()
    except OSError:
        return None
    real, best, found = os.path.realpath(directory), -1, None
    for line in mounts:  # "ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [TAGS] - FS_TYPE SOURCE OPTIONS"
        mount, _, fs = line.partition(" - ")
        fields = mount.split(" ")
        if len(fields) < 5 or not fs:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # "\040" is a space
        fs_type = fs.split(" ")[0]
        under = real == point or real.startswith(point.rstrip("/") + "/")
        if under and len(point) >= best:  # the deepest mount; of two on one point, the later (on top)
            best, found = len(point), fs_type
    return found if found in _KERNEL_FS else None


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
