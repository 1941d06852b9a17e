"""The rollout side of vLLM 0.32's weight-transfer API, shared by gloo, nccl and ipc.

As the `LLM` methods expose it (vllm/entrypoints/rl/offline.py): each call is a collective_rpc that
runs the same-named method of every TP/PP worker of the engine (vllm/v1/worker/gpu_worker.py).
The engine must be built with `weight_transfer_config` for the method (`engine_kwargs`).
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from cluster.weight_sync.base import reset_prefix_cache


def init(llm: Any, init_info: Mapping[str, Any]) -> None:
    """LLM.init_weight_transfer_engine: each worker parses `init_info` into its backend's InitInfo
    (gloo, nccl: joins the group and BLOCKS until every rank has joined)."""
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

    llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=dict(init_info)))


def apply(llm: Any, update_info: Mapping[str, Any], weight_version: str | None = None) -> tuple[float, int]:
    """One whole update: start (layerwise reload), receive and load, finish (post-processing,
    records `weight_version`), then the prefix-cache reset vLLM does not do. -> (seconds, bytes)."""
    import torch
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest
    from vllm.platforms import current_platform

    t0 = time.perf_counter()
    llm.start_weight_update()
    llm.update_weights(WeightTransferUpdateRequest(update_info=dict(update_info)))
    llm.finish_weight_update(weight_version)
    if current_platform.is_cpu():  # in process there (actors/rollout.py), so apply_model takes a function
        llm.apply_model(refresh_tied_lm_head)
    reset_prefix_cache(llm)
    nbytes = sum(math.prod(shape) * getattr(torch, dt).itemsize
                 for dt, shape in zip(update_info["dtype_names"], update_info["shapes"]))
    return time.perf_counter() - t0, nbytes


def refresh_tied_lm_head(model: Any) -> bool:
    """vLLM on CPU keeps a packed copy of the LM head's weight for its GEMM (`lm_head.cpu_linear`),
    made when weights are loaded. With tied embeddings (SmolLM2) the head's weight is the embedding
    table, which an update loads under the embedding's name: the head itself is not reloaded, and
    its packed copy kept the old table (measured: log-probability gap 2.8 to the trainer's policy;
    1.3 to the weights before the update). Packing it again from the shared, updated table makes
    the gap 2.6e-5 (from a round's exported policy, whose config vLLM reads as untied: 2.3 before).
    -> whether there was a tied head to refresh."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    # Tied by storage, not by config: a policy this project exported (its safetensors hold lm_head.weight
    # too) loads tied with config.tie_word_embeddings False in vLLM's view.
    if head is None or embed is None or getattr(head, "quant_method", None) is None \
            or head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.quant_method.process_weights_after_loading(head)
    return True


def shutdown(llm: Any) -> None:
    llm.shutdown_weight_transfer_engine()
