"""A TP rank's intra-op thread count: its share of the cores, unless OMP_NUM_THREADS says otherwise."""

from __future__ import annotations

import os

from pdlaunch.distributed.worker import rank_threads


def test_omp_num_threads_set_is_kept() -> None:
    # a Kubernetes rank pod requesting 2 cores (render/pod_resources.py) on a node of many
    assert rank_threads(2, {"OMP_NUM_THREADS": "2"}) is None


def test_without_it_a_rank_takes_its_share_of_the_cores() -> None:
    assert rank_threads(2, {}) == max(1, (os.cpu_count() or 1) // 2)
    assert rank_threads(10**6, {}) == 1
