"""Where rank 0 says a failed remote TP rank's output is: under Kubernetes (the instance named after its leader pod)
the worker pod LWS names `<leader pod>-<rank>`, read with `kubectl logs`; elsewhere the rank's log file on its node."""

from __future__ import annotations

from pdlaunch.distributed.tp_ranks import TPRanks


def test_a_remote_rank_in_a_worker_pod_is_read_with_kubectl_logs() -> None:
    ranks = TPRanks("pd-decode-1-0", 4, in_pods=True)
    ranks.remote = {r: f"node {r} (pd-decode-1-0-{r})" for r in (1, 2, 3)}
    assert ranks.log_of(2) == "its pod's output (`kubectl logs pd-decode-1-0-2`)"


def test_a_remote_rank_on_a_node_is_read_in_its_log_file() -> None:
    ranks = TPRanks("decode-0", 2)
    ranks.remote = {1: "node 1 (10.0.0.2)"}
    assert ranks.log_of(1) == "its log on node 1 (10.0.0.2): decode-0-rank1.log in that node's log_dir"
