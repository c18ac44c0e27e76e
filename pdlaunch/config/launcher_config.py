"""How the deployment's processes are started and kept running: the `launcher` section (backend, Ray
resources), `supervision` (restarts, the drain at a stop) and `security` (the API key and deployment secret the
launcher hands every process, the request size bound)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from pdlaunch.config.strict_model import MAX_REQUEST_BYTES, MAX_SECONDS, Role, StrictModel

DRAIN_TIMEOUT_S = 5.0  # in-flight requests finish at the proxy before the instances are stopped
MAX_DRAIN_S = 3600.0
# Config paths whose value is a secret: an error about one says its length, never the value (errors_format.py)
SECRET_PATHS = frozenset({"security.api_key", "security.deployment_secret"})
STALL_PROBE_INTERVAL_S = 1.0  # the launcher probes each ready process's /health this often (launcher/stall_watch.py)


class SecurityConfig(StrictModel):
    api_key: str | None = Field(None, min_length=1, description="Clients must send `Authorization: Bearer KEY` "
                                "(also PDLAUNCH_API_KEY); /health stays open. Unset: no client auth.")
    deployment_secret: str | None = Field(None, min_length=16, description="Shared by every instance, rank and "
                                          "the proxy to authenticate KV side-channel messages and internal "
                                          "kv_transfer_params (also PDLAUNCH_DEPLOYMENT_SECRET). Unset: the "
                                          "launcher makes one; multi-node: give the same value on every node.")
    max_request_bytes: int = Field(16 << 20, gt=0, le=MAX_REQUEST_BYTES, description="Largest HTTP request body "
                                   f"accepted (413 above; at most {MAX_REQUEST_BYTES}, 1 GiB).")

    @field_validator("api_key", "deployment_secret")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(f"{len(value)} whitespace characters are not a secret; give a random value (e.g. "
                             "`python -c 'import secrets; print(secrets.token_hex(32))'`), or leave it unset")
        return value

    @field_validator("api_key")
    @classmethod
    def _sendable(cls, value: str | None) -> str | None:
        """A key a client can send: header values hold no control character, and their surrounding whitespace is
        dropped (a YAML `api_key: |` block ends the key with a newline), so such a key would answer 401 to all."""
        what = None if value is None or not value.strip() else unsendable_key(value)
        if what is not None:
            raise ValueError(f"{unsendable_text(what)}, so every request would get 401; remove it (a YAML `|` block "
                             "adds a newline: write the key on the `api_key:` line)")
        return value


def unsendable_text(what: str) -> str:
    """Why a key that `what` (unsendable_key's answer) describes fails, for an error."""
    return (f"the key {what}: no HTTP client can send it in `Authorization: Bearer KEY` (header values hold no "
            "control character, and their surrounding whitespace is dropped)")


def unsendable_key(key: str) -> str | None:
    """What in `key` a client cannot send in a header, or None."""
    tail = key[len(key.rstrip()):]
    if tail:
        return "ends with a newline" if "\n" in tail or "\r" in tail else "ends with whitespace"
    if key != key.lstrip():
        return "starts with whitespace"
    for char in key:
        if char in "\r\n":
            return "holds a newline"
        if char == "\t":
            return "holds a tab"
        if ord(char) < 0x20 or ord(char) == 0x7F:
            return f"holds a control character (U+{ord(char):04X})"
    return None


class SupervisionConfig(StrictModel):
    restart_backoff_seconds: float = Field(1.0, gt=0, le=MAX_SECONDS, description="Wait before the first restart "
                                           "of a dead process (at most a week); doubles per consecutive failure "
                                           "(at most 30 s).")
    max_restarts: int = Field(5, ge=0, description="Consecutive failed restarts (died before ready) of one "
                              "process before the deployment stops with exit 1.")
    role_down_grace_seconds: float = Field(120.0, gt=0, le=MAX_SECONDS, description="Stop with exit 1 when a role "
                                           "has had no live instance for this long (at most a week).")
    drain_timeout_seconds: float = Field(
        DRAIN_TIMEOUT_S, gt=0, le=MAX_DRAIN_S, description="On a stop signal (Ctrl-C, SIGTERM), how long the proxy "
        "lets requests in flight finish before it answers the rest 503 shutting_down (streams: an error event) and "
        "the instances are stopped (at most an hour; under Kubernetes the proxy pod's termination grace grows to "
        "fit).")
    stall_restart_seconds: float | None = Field(
        None, gt=0, le=MAX_SECONDS, description="Restart an instance that is alive but has not answered /health for "
        "this long after a probe timed out (stalled; above proxy.health_timeout_seconds + 1, the probe interval, so "
        "that one slow answer is not a stall; at most a week). Unset: never; it is shown as stalled and the proxy "
        "routes around it until it answers again.")


RayResourceName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_.:/-]*$")]


class RayResourcesConfig(StrictModel):
    """Ray custom resources each TP rank's bundle of a role asks for, on top of its CPU or GPU: a role
    runs only on nodes started with them (`ray start --resources '{"pd_decode": 1}'`)."""

    prefill: dict[RayResourceName, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="Resources every prefill rank's bundle asks for, e.g. {pd_prefill: 0.01}.")
    decode: dict[RayResourceName, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="Resources every decode rank's bundle asks for.")
    colocated: dict[RayResourceName, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="Resources every colocated rank's bundle asks for.")

    @field_validator("prefill", "decode", "colocated")
    @classmethod
    def _not_built_in(cls, value: dict[str, float]) -> dict[str, float]:
        taken = sorted(set(value) & {"CPU", "GPU", "memory", "object_store_memory"})
        if taken:
            raise ValueError(f"{', '.join(taken)} is Ray's own resource: pdlaunch asks for one CPU or GPU per "
                             "TP rank itself; name a custom resource the nodes were started with")
        return value

    def for_role(self, role: Role) -> dict[str, float]:
        return dict({"prefill": self.prefill, "decode": self.decode, "colocated": self.colocated}[role])


class LauncherConfig(StrictModel):
    backend: Literal["local", "slurm", "ray"] = Field(
        "local", description="local: this machine starts its processes (multi-node: one `pdlaunch serve "
        "--node-rank K` per node); slurm: inside a SLURM allocation, nodes from SLURM_JOB_NODELIST and one "
        "`srun` step per node (pdlaunch/launcher/backends/slurm.py); ray: on a Ray cluster, one placement group "
        "per instance and one Ray actor per TP rank (pdlaunch/launcher/backends/ray.py).")
    ray_address: str = Field("auto", min_length=1, description="ray backend: the cluster's GCS address "
                             "(HOST:PORT, as `ray start --head` prints it), or auto (the cluster this machine runs).")
    ray_resources: RayResourcesConfig = Field(default_factory=RayResourcesConfig)
    ray_placement_timeout_seconds: float = Field(
        120.0, gt=0, le=MAX_SECONDS, description="ray backend: an instance whose placement group Ray cannot place "
        "within this long (at most a week) stops the deployment (exit 1, naming the resources asked for).")
