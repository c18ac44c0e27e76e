"""Prometheus metrics of an instance. Import the objects, never re-create them.

Two families in the one default registry:
- `pdlaunch_*` (docs/ARCHITECTURE.md), unlabelled: the PD-specific series and ours, by subsystem:
  kv_transfer.py (KV moved between instances, held KV freed, loads recomputed), engine_steps.py (engine
  steps by kind and path, slow decode steps), instance.py (KV blocks, queues, tokens computed, latencies,
  dtypes).
- `vllm:*` under vLLM's names and labels (`model_name`, `engine`), so vLLM's Grafana dashboards work
  unchanged (vllm_series.py). Label them through `vllm(metric)`, which applies this instance's model name
  (`set_model_name`, called once when the instance starts).
"""

from prometheus_client import disable_created_metrics

# No `*_created` series beside every counter and histogram (vLLM turns them off too): they double the
# scrape and no dashboard reads them. Before any metric of this package exists: Python runs a package's
# __init__ before any of its modules.
disable_created_metrics()  # type: ignore[no-untyped-call]
