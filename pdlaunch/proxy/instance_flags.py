"""The instances named on the proxy's command line: `--prefill/--decode/--colocated [NAME=]URL` and
`--engine-id NAME=ENGINE_ID`.

An instance's name is NAME, else the launcher's name of the n-th instance of its role (config/instance_names.py):
the proxy's routing, /instances, metrics and --engine-id key on it, so every name is the instance's own. Apart
from the process's other flags (__main__.py), which set how it serves: these say whom it serves, as the launcher
(launcher/child_commands.py) and render's manifests write them.
"""

from __future__ import annotations

import argparse

from pdlaunch.config.instance_names import instance_name
from pdlaunch.proxy.instances import Instance, Role

ROLES: tuple[Role, ...] = ("prefill", "decode", "colocated")


def named(value: str) -> tuple[str, str]:
    """--prefill/--decode/--colocated NAME=URL as (NAME, URL); a bare URL as ("", URL)."""
    name, _, url = value.partition("=") if "=" in value.split("://", 1)[0] else ("", "", value)
    return name, url


def instance_names(role: Role, values: list[str]) -> list[str]:
    """The instances' names: NAME of NAME=URL, else the launcher's name of the n-th instance of the role."""
    return [named(value)[0] or instance_name(role, index) for index, value in enumerate(values)]


def parse_instances(role: Role, values: list[str]) -> list[Instance]:
    out = []
    for name, value in zip(instance_names(role, values), values):
        url = named(value)[1]
        if not url.startswith(("http://", "https://")):
            raise SystemExit(f"--{role} {value!r}: expected http://HOST:PORT (optionally NAME=URL)")
        out.append(Instance(role=role, url=url.rstrip("/"), name=name))
    return out


def check_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every instance has a name of its own: the proxy's routing, /instances, metrics and --engine-id key on it."""
    seen: set[str] = set()
    for role in ROLES:
        for name in instance_names(role, getattr(args, role)):
            if name in seen:
                parser.error(f"--{role}: two instances are named {name!r}; give each its own NAME=URL")
            seen.add(name)


def check_engine_ids(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--engine-id NAME=ID names an instance given as NAME=URL, once; becomes args.engine_ids (NAME -> ID)."""
    names = {named(value)[0] for value in args.prefill + args.decode + args.colocated} - {""}
    args.engine_ids = {}
    for value in args.engine_id:
        name, _, engine_id = value.partition("=")
        if not engine_id:
            parser.error(f"--engine-id {value!r}: expected NAME=ENGINE_ID")
        if name not in names:
            parser.error(f"--engine-id {value!r}: no instance is named {name!r}; name it as "
                         f"--prefill/--decode/--colocated {name}=URL (named: {', '.join(sorted(names)) or 'none'})")
        if name in args.engine_ids:
            parser.error(f"--engine-id {value!r}: {name} already has engine_id {args.engine_ids[name]!r}")
        args.engine_ids[name] = engine_id
