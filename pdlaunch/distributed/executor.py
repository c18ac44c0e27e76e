"""Executors: how an engine runs its model, on one process (tp 1) or on a TP group (tp > 1).

`create_executor` picks one: `UniprocExecutor` (here) runs the model in the engine process;
`TPExecutor` (tp_executor.py) makes the engine process TP rank 0 of a group of worker processes and
ranks on other nodes; `RayTPExecutor` (ray_executor.py) does that with Ray actors under --backend ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec, instance_cache
from pdlaunch.errors import EngineError
from pdlaunch.kv_transfer.base import KVConnector
from pdlaunch.model.checkpoint import Checkpoint
from pdlaunch.runner.model_runner import ModelRunner
from pdlaunch.runner.step_inputs import StepInputs

if TYPE_CHECKING:
    from pdlaunch.distributed.ray_executor import RayTPExecutor
    from pdlaunch.distributed.tp_executor import TPExecutor


class UniprocExecutor:
    """tp 1: the model runs in the engine process."""

    def __init__(self, runner: ModelRunner, engine_id: str) -> None:
        self.runner = runner
        self.engine_id = engine_id

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        return self.runner.run(inputs)

    def check_health(self) -> None:
        """Nothing to watch in one process."""

    def wrap_connector(self, connector: KVConnector) -> KVConnector:
        return connector

    def rank_engine_ids(self) -> list[str]:
        return [self.engine_id]

    def rank_nodes(self) -> list[str]:
        """Node address of each rank when the executor knows it (under Ray); else [] (/info: the instance's host)."""
        return []

    def shutdown(self) -> None:
        self.runner.release()


def create_executor(config: DeploymentConfig, instance: InstanceSpec | None, checkpoint: Checkpoint,
                    device: torch.device, dtype: torch.dtype, max_model_len: int,
                    engine_id: str) -> UniprocExecutor | TPExecutor | RayTPExecutor:
    """The executor for the instance's TP size."""
    tp = instance.tp if instance is not None else config.parallel.tp
    if tp == 1:
        graphs = device.type == "cuda" and not config.model.enforce_eager
        # Prefill instances never run a decode batch: no decode graphs to capture there.
        decode_graphs = graphs and (instance is None or instance.role != "prefill")
        runner = ModelRunner(checkpoint, device, dtype, instance_cache(config, instance), config.scheduler,
                             max_model_len, use_cumem=config.model.enable_cumem_allocator,
                             sleep_mode=config.model.enable_sleep_mode, decode_graphs=decode_graphs,
                             mixed_graphs=graphs,
                             role=instance.role if instance is not None else "colocated")
        return UniprocExecutor(runner, engine_id)
    if config.model.enable_sleep_mode:
        raise EngineError(f"sleep mode is not supported with TP {tp} yet", field="model.enable_sleep_mode",
                          hint="run sleep mode with --tp 1")
    if instance is not None and instance.role != "colocated" and config.kv_transfer.connector == "storage":
        raise EngineError(f"the {config.kv_transfer.connector} connector does not run with TP {tp} yet",
                          field="kv_transfer.connector", hint="use --kv-connector nixl or mooncake with TP > 1")
    # Only a TP group needs these (~0.2 s of imports a tp-1 instance's start does without)
    from pdlaunch.distributed.ray_executor import RayTPExecutor, rank_actors
    from pdlaunch.distributed.tp_executor import TPExecutor

    actors = rank_actors()
    if actors and instance is not None:  # this process is rank 0 of an instance under --backend ray
        return RayTPExecutor(config, instance, checkpoint, device, dtype, max_model_len, config.model.dtype, actors)
    return TPExecutor(config, instance, checkpoint, device, dtype, max_model_len, config.model.dtype)
