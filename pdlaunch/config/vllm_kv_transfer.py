"""vLLM's `--kv-transfer-config '{...}'` read into our `kv_transfer` keys.

vLLM configures one instance per command (kv_role says which); `pdlaunch serve` starts the prefill
and decode instances together. So only the fields that mean the same thing for a whole deployment
map over; every other field is refused with what pdlaunch calls it, never dropped.
"""

from __future__ import annotations

import json

from pdlaunch.config.problems import Problem, problem

FLAG = "--kv-transfer-config"
CONNECTORS = {"NixlConnector": "nixl", "MooncakeConnector": "mooncake"}
PLAIN_FIELDS = {"engine_id": "kv_transfer.engine_id", "kv_load_failure_policy": "kv_transfer.load_failure_policy"}
# kv_connector_extra_config keys (per connector) with an equivalent of ours.
EXTRA_FIELDS = {("mooncake", "mooncake_protocol"): "kv_transfer.mooncake_protocol"}
NIXL_BACKENDS = ["UCX"]  # the one backend our NIXL agent creates
NOT_OURS = {
    "kv_buffer_device": "pdlaunch registers each instance's KV cache on its own device (--device)",
    "kv_buffer_size": "only vLLM's P2P/NCCL connectors use a buffer; pdlaunch moves blocks directly",
    "kv_rank": "pdlaunch numbers its instances itself: choose how many with --prefill N / --decode N",
    "kv_parallel_size": "pdlaunch counts its instances itself: choose how many with --prefill N / --decode N",
    "kv_ip": "the KV handshake address is `kv_transfer.side_channel_host` in the YAML",
    "kv_port": "the first KV handshake port is `kv_transfer.side_channel_port` in the YAML",
    "kv_connector_module_path": "pdlaunch loads no connector plug-ins: use `--kv-connector nixl|mooncake|storage`",
    "enable_permute_local_kv": "pdlaunch has one KV layout on both sides; remove it",
}
NOT_OURS_EXTRA = {
    "mooncake_hostname": "pdlaunch uses the node's address (`parallel.nodes[].address`, else 127.0.0.1)",
    "device_name": "pdlaunch picks the RDMA device itself (`kv_transfer.mooncake_protocol`)",
}


def _refused(what: str, hint: str) -> Problem:
    return problem(FLAG, f"{what} has no pdlaunch equivalent", hint)


def _extra(connector: str | None, extra: object) -> tuple[dict[str, object], list[Problem]]:
    if not isinstance(extra, dict):
        return {}, [problem(FLAG, "kv_connector_extra_config must be a JSON object",
                            "write e.g. {\"kv_connector_extra_config\": {\"mooncake_protocol\": \"tcp\"}}")]
    values: dict[str, object] = {}
    problems: list[Problem] = []
    for key, value in extra.items():
        path = EXTRA_FIELDS.get((connector or "", key))
        if path is not None:
            values[path] = value
        elif key == "backends" and connector == "nixl":
            if value != NIXL_BACKENDS:
                problems.append(problem(FLAG, f"kv_connector_extra_config.backends {value!r} is not supported",
                                        "pdlaunch's NIXL agent has the UCX backend only: write [\"UCX\"] or drop it"))
        else:
            ours = ", ".join(f"{k} ({c})" for c, k in EXTRA_FIELDS) + ", backends (nixl)"
            problems.append(_refused(f"kv_connector_extra_config.{key}",
                                     NOT_OURS_EXTRA.get(key, f"the keys pdlaunch maps are {ours}")))
    return values, problems


def kv_transfer_overrides(text: str) -> tuple[dict[str, object], list[Problem]]:
    """Config path -> value for each field of vLLM's KVTransferConfig JSON that we have; a problem for each other."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return {}, [problem(FLAG, f"not valid JSON ({exc.msg} at character {exc.pos})",
                            "quote it for the shell: --kv-transfer-config '{\"kv_connector\":\"NixlConnector\"}'")]
    except (ValueError, RecursionError) as exc:  # an integer of more than 4300 digits; nesting past Python's stack
        why = "it nests too deeply" if isinstance(exc, RecursionError) else str(exc).split("; use sys.")[0]
        return {}, [problem(FLAG, f"JSON that pdlaunch cannot read ({why})",
                            "write e.g. '{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_both\"}'")]
    if not isinstance(data, dict):
        return {}, [problem(FLAG, f"expected a JSON object, got {type(data).__name__}",
                            "write e.g. '{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_both\"}'")]
    values: dict[str, object] = {}
    problems: list[Problem] = []
    connector = None
    if "kv_connector" in data:
        name = data["kv_connector"]
        connector = CONNECTORS.get(name) if isinstance(name, str) else None
        if connector is None:
            problems.append(problem(FLAG, f"kv_connector {name!r} is not one pdlaunch has",
                                    "use NixlConnector (our nixl) or MooncakeConnector (our mooncake); "
                                    "for KV through files pass --kv-connector storage"))
        else:
            values["kv_transfer.connector"] = connector
    for key, value in data.items():
        if key == "kv_connector":
            continue
        if key in PLAIN_FIELDS:
            values[PLAIN_FIELDS[key]] = value
        elif key == "kv_role":
            if value != "kv_both":
                problems.append(problem(FLAG, f"kv_role {value!r} describes one vLLM instance",
                                        "pdlaunch serve starts the prefill (kv_producer) and decode (kv_consumer) "
                                        "instances together: write \"kv_both\" or remove kv_role, and set how many "
                                        "of each with --prefill N / --decode N"))
        elif key == "kv_connector_extra_config":
            more, wrong = _extra(connector, value)
            values.update(more)
            problems += wrong
        else:
            problems.append(_refused(key, NOT_OURS.get(key, "pdlaunch maps kv_connector, kv_role, engine_id, "
                                                          "kv_load_failure_policy and kv_connector_extra_config")))
    return values, problems
