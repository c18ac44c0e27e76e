"""The commented deployment printed by `pdlaunch config example` (it validates on any machine)."""

EXAMPLE_YAML = """\
# pdlaunch deployment: one prefill and one decode instance of the built-in demo model, and a proxy.
# Flags override these keys (e.g. `pdlaunch serve this.yaml --decode 2 --device cuda`).
# Check before launching: `pdlaunch check-config this.yaml` (add --target-gpus N --target-gpu-memory GIB
# to check a GPU deployment from a machine without GPUs).

device: auto            # auto | cpu | cuda (auto: cuda when visible, else cpu)
colocated: false        # true: one instance does prefill and decode (no KV transfer)
log_dir: logs           # one log file per instance

model:
  path: demo            # HF checkpoint directory, FILE.gguf, `demo` (SmolLM2-135M-Instruct) or `tiny`
  dtype: auto           # auto | float32 | bfloat16 | float16 (auto: bfloat16 on CUDA, float32 on CPU)
  # quantization: fp8   # FP8 weights quantized at load (FP8 checkpoints are detected without it)
  max_model_len: 512    # longest prompt + output, tokens; at most the model's max_position_embeddings
  seed: 0
  enable_sleep_mode: false       # /sleep and /wake_up; turns enable_cumem_allocator on (CUDA only)
  enable_cumem_allocator: false  # weights and KV cache in CuMem pools (CUDA only)

cache:
  block_size: 16                 # tokens per KV block: 8, 16, 32, 64 or 128
  gpu_memory_utilization: 0.9    # fraction of each GPU an instance may use
  enable_prefix_caching: true
  kv_cache_dtype: auto           # auto (the model dtype) | fp8 (e4m3: half of bf16's KV bytes)
  kv_offload_gb: 0               # CPU tier for offloaded KV blocks, GiB (0 = off)
  cpu_kv_cache_gb: 1.0           # KV cache budget per instance when running on CPU, GiB

scheduler:
  max_num_seqs: 64
  # max_num_batched_tokens: 8192  # tokens per step; default 8192 colocated and prefill, 2048 decode
  prompt_tokens_while_decoding: 1024  # prompt tokens in a step that also decodes (0 = no cap)

parallel:
  tp: 1                 # default TP size; prefill_tp / decode_tp override it per role
  node_rank: 0          # multi-node: which entry of `nodes` this machine is

kv_transfer:
  connector: nixl       # nixl | mooncake (pip install 'pdlaunch[mooncake]') | storage
  transfer_mode: auto   # pull (decode READs, needs NVLink between GPUs) | push | auto
  side_channel_host: 127.0.0.1
  kv_lease_seconds: 60  # prefill frees KV blocks nobody read after this

proxy:
  host: 127.0.0.1
  port: 8000
  routing_policy: round_robin    # round_robin | least_loaded | prefix (longest cached prefix vs queue)
  workers: auto                  # proxy processes sharing the port: auto (1 per 8 usable CPUs, 1-4) | 1-64
  request_timeout_seconds: 300
  health_timeout_seconds: 2      # no /health answer within this: the instance is stalled, routed around
  # prefill_timeout_seconds: 30  # unset: derived from prompt length and measured prefill speed
  migration_limit: 3            # a decode dies or stalls mid-request: go on on another, this many times
  # disaggregate_min_tokens: 256  # shorter prompts run on a decode alone (no KV transfer); unset: all PD
  # disaggregate_max_queue_tokens: 4096  # prefill queue this full: PD prompts run on the decode too
  # disaggregate_max_itl_ms: 8  # ... but none while the decode's streams wait this long a token

instances:              # groups of identical instances; tp/devices/base_port are optional
  - role: prefill
    count: 1
  - role: decode
    count: 1
"""
