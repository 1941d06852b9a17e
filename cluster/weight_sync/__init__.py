"""How new policy weights reach the rollout workers after each PPO step (`safe_rlhf.weight_sync`).

One module per transport. Each has the same driver-side interface (base.WeightSync: connect, push,
reconnect, close) and, beside it, what runs in the learner and in the rollout worker:

| module        | driver side          | policy learner (rank 0 sends)     | rollout worker                    |
|---------------|----------------------|-----------------------------------|-----------------------------------|
| checkpoint.py | CheckpointWeightSync | Learner.export (an HF directory)  | checkpoint.reload (in place)      |
| gloo.py       | GlooWeightSync       | GlooSender                        | vllm_plugin.py (our gloo backend) |
| nccl.py       | NcclWeightSync       | NcclSender                        | vLLM's NCCL backend               |
| ipc.py        | IpcWeightSync        | IpcExporter                       | vLLM's CUDA-IPC backend           |

gloo and nccl share broadcast.py (group layout, call order, the sender); gloo, nccl and ipc share
vllm_receiver.py (the rollout side of vLLM's weight-transfer API). vLLM and torch are imported
inside functions: these modules import on machines without vLLM.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.weight_sync.base import DEFAULT_TIMEOUT_S, WeightSync
from cluster.weight_sync.checkpoint import CheckpointWeightSync
from cluster.weight_sync.gloo import GlooSender, GlooWeightSync
from cluster.weight_sync.ipc import IpcExporter, IpcWeightSync
from cluster.weight_sync.nccl import NcclSender, NcclWeightSync

METHODS = ("checkpoint", "gloo", "nccl", "ipc")
TRANSFER_METHODS = ("gloo", "nccl", "ipc")  # vLLM's weight-transfer API


def _check(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown weight_sync method {method!r}; choose one of {', '.join(METHODS)}")


def make_weight_sync(method: str, policy_ranks: list, rollout: list, sync_dir: Path,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> WeightSync:
    """The driver side for `method`; `sync_dir` is used by checkpoint only."""
    _check(method)
    if method == "checkpoint":
        return CheckpointWeightSync(policy_ranks, rollout, sync_dir, timeout_s=timeout_s)
    cls = {"gloo": GlooWeightSync, "nccl": NcclWeightSync, "ipc": IpcWeightSync}[method]
    return cls(policy_ranks, rollout, timeout_s=timeout_s)


def make_sender(method: str) -> "GlooSender | NcclSender | IpcExporter":
    """The trainer side for a transfer method (the policy learner holds one)."""
    if method not in TRANSFER_METHODS:
        raise ValueError(f"{method!r} is not a weight-transfer method; choose one of {', '.join(TRANSFER_METHODS)}")
    return {"gloo": GlooSender, "nccl": NcclSender, "ipc": IpcExporter}[method]()


def engine_kwargs(method: str) -> dict[str, Any]:
    """Extra `LLM(...)` kwargs so a vLLM engine can receive weights by `method`.

    checkpoint: nothing (`reload_weights` works on any engine). gloo / nccl / ipc:
    `weight_transfer_config=WeightTransferConfig(backend=...)`; without it every transfer call raises
    "Weight transfer not configured". The wire params travel from the trainer in the init handshake.
    """
    _check(method)
    if method == "checkpoint":
        return {}
    from vllm.config import WeightTransferConfig

    if method == "gloo":
        from cluster.weight_sync.vllm_plugin import register

        register()  # this process; vLLM's engine and worker processes load it as a plugin
    return {"weight_transfer_config": WeightTransferConfig(backend=method)}
