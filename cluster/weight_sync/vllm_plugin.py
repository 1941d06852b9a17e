"""A vLLM general plugin: the "gloo" weight-transfer backend (the rollout side of gloo.py).

vLLM loads `vllm.general_plugins` entry points (pyproject.toml) in every process it starts (the
engine core and its workers), which is where weight-transfer engines are created, so `register`
runs there as well as wherever `engine_kwargs("gloo")` is called.

The engine follows vLLM's NCCL engine (vllm/distributed/weight_transfer/nccl_engine.py, unpacked
path): join the trainer's group once; per update, open a layerwise reload, receive each tensor in
the announced order and `load_weights` it, then finalize the reload.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)

from cluster.weight_sync.base import DEFAULT_TIMEOUT_S
from cluster.weight_sync.gloo import gloo_broadcast, join_gloo_group

BACKEND = "gloo"


def register() -> None:
    """Add the backend to vLLM's registry (idempotent: plugins may load more than once)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "GlooWeightTransferEngine")
    except ValueError:  # already registered in this process
        pass


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int  # this engine's first rank in the group (the trainer is rank 0)
    world_size: int  # trainer + every worker of every rollout engine
    timeout_s: float = DEFAULT_TIMEOUT_S  # a collective whose peer died fails after this long


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self):
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"update_info lists differ in length: {len(self.names)} names, "
                             f"{len(self.dtype_names)} dtype_names, {len(self.shapes)} shapes")


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        pc = self.parallel_config  # this worker's rank: after the engines before it, then DP, TP*PP
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self.group = join_gloo_group(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                                     init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on a CPU-only host.
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialized; call init_weight_transfer_engine first")
        for name, dtype_name, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes):
            weight = torch.empty(shape, dtype=getattr(torch, dtype_name))  # host memory: gloo
            gloo_broadcast(self.group, weight)
            self.model.load_weights([(name, weight)])  # copies onto the model's device

    def shutdown(self) -> None:
        self.group = None
