"""The manifests of `pdlaunch render kubernetes` written to --out: one YAML file per object, in apply order."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from pdlaunch.config.rules.host import make_output_dir
from pdlaunch.errors import PdlaunchError
from pdlaunch.render.kubernetes import Manifest
from pdlaunch.render.lws import LeaderWorkerSet

_MANIFEST_FILE = re.compile(r"\d{2,}-(secret|leaderworkerset|service|deployment)-[-a-z0-9]+\.yaml")


class _ManifestDumper(yaml.SafeDumper):  # type: ignore[misc]  # PyYAML ships no types: its classes are untyped
    """PyYAML's safe dumper, quoting besides the strings kubectl's YAML reader (go-yaml v2, sigs.k8s.io/yaml) takes
    for something else when plain, where PyYAML's YAML 1.1 rules see a string: `y`/`n` (booleans), `1e3`, `-12e5`
    and `08` (floats), `0o17` (an int), `2024-1-5` (a timestamp). Written plain, such a --namespace, --name, API key
    or secret digest made `kubectl apply` fail on a bool or number where the API takes a string."""


_ManifestDumper.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^[yYnN]$"), list("yYnN"))
_ManifestDumper.add_implicit_resolver(  # go-yaml drops every `_` before it parses a number
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\.[0-9_]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9_]+)?$"),
    list("-+.0123456789"))
_ManifestDumper.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?0[xXoObB][0-9a-fA-F_]+$"),
                                      list("-+0"))
_ManifestDumper.add_implicit_resolver("tag:yaml.org,2002:timestamp",
                                      re.compile(r"^[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:[Tt ].*)?$"), list("0123456789"))


def write_manifests(manifests: list[Manifest], out: Path) -> list[Path]:
    """One YAML file per object, numbered in apply order (`kubectl apply -f DIR` applies them in name order).
    Raises PdlaunchError (field --out) when `out` is not a directory that can be made and written."""
    make_output_dir(out, "--out")
    try:
        return _write_files(manifests, out)
    except OSError as exc:
        raise PdlaunchError(f"cannot write the manifests to {out}: {exc.strerror or exc}"
                            + (f" ({exc.filename})" if exc.filename else ""), field="--out",
                            hint="give a directory you can write to; missing parent directories are made") from None


def _write_files(manifests: list[Manifest], out: Path) -> list[Path]:
    files: list[tuple[Path, object]] = []
    for i, manifest in enumerate(manifests):
        if isinstance(manifest, LeaderWorkerSet):
            kind, name = "leaderworkerset", manifest.metadata.name
            data: object = manifest.manifest()
        else:
            kind, name, data = manifest["kind"].lower(), manifest["metadata"]["name"], manifest
        files.append((out / f"{i:02d}-{kind}-{name}.yaml", data))
    # `kubectl apply -f DIR` would apply an earlier render's objects too (a group since removed, another --name)
    stale = sorted(p.name for p in out.iterdir() if _MANIFEST_FILE.fullmatch(p.name)) if out.is_dir() else []
    stale = [name for name in stale if name not in {path.name for path, _ in files}]
    if stale:
        raise PdlaunchError(f"{out} holds manifests this render does not write ({', '.join(stale[:3])}"
                            + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
                            + "), which `kubectl apply -f` would apply too", field="--out",
                            hint="remove them (kubectl delete -f them first if they were applied) or give "
                            "an empty directory")
    written = []
    for path, data in files:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the Secret's file holds the secret
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)  # an earlier render's file keeps its mode through O_TRUNC: a readable one stayed so
            yaml.dump(data, f, Dumper=_ManifestDumper, sort_keys=False)
        written.append(path)
    return written
