"""weight_sync: ipc. vLLM 0.32's CUDA-IPC weight transfer between colocated learner ranks and vLLM
workers: policy learner i shares rollout worker i's GPU (the resource plan puts both in one
single-GPU bundle). Nothing crosses a network.

What travels per tensor: a dict {physical GPU UUID: rebuild args} from torch's `reduce_tensor` (a
cudaIpcMemHandle, offsets, sizes, a refcount handle). Every learner rank exports handles of its own
copy; the handle dicts are all-gathered over the learner group and merged, so one update_info holds
one handle per GPU and each vLLM worker maps the one on its own GPU (vllm/distributed/
weight_transfer/ipc_engine.py). The driver's call order each push:

    1. every policy rank `transfer_export()`      (rank 0 returns the update_info)
    2. every rollout worker `transfer_apply(info)` (copies the weights out of the learner's memory)
    3. every policy rank `transfer_release()`      (only after every worker has copied)

Costs one full copy of the weights per GPU while exported when ZeRO-3 gathers them; ZeRO 0-2
parameters are exported in place. Not yet run on a GPU.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from cluster.weight_sync.base import WeightSync, dtype_name, get_all, shutdown_quietly


class IpcExporter:
    """Trainer side (every policy rank)."""

    method = "ipc"

    def __init__(self) -> None:
        self.rank = 0
        self._refs: list[Any] = []  # exported tensors: alive until every consumer is done

    def init(self, rank: int) -> dict[str, Any]:
        """-> the init_info for every rollout worker (unpacked transfers)."""
        self.rank = rank
        return {"packed": False}

    def _merge(self, handles: list[dict]) -> list[dict]:
        """All-gather [{uuid: args}, ...] over the learner group; rank 0 merges per tensor.
        A collective: every learner rank calls it once per export."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return handles
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, handles)
        torch.cuda.synchronize()
        if self.rank != 0:
            return [{} for _ in handles]
        return [{k: v for rank_handles in gathered for k, v in rank_handles[i].items()} for i in range(len(handles))]

    def export(self, named_tensors: Iterable[tuple[str, Any]]) -> dict[str, Any] | None:
        """IPC handles for every tensor; rank 0 returns {names, dtype_names, shapes, ipc_handles}."""
        import torch
        from torch.multiprocessing.reductions import reduce_tensor

        self.release()
        torch.cuda.synchronize()  # optimizer writes must have landed before another process reads
        uid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        names, dtype_names, shapes, handles = [], [], [], []
        with torch.no_grad():
            for name, t in named_tensors:
                t = t.detach().contiguous()  # a fresh copy only for non-contiguous views / gathered params
                self._refs.append(t)  # reduce_tensor's args do not keep the storage alive
                names.append(name)
                dtype_names.append(dtype_name(t.dtype))
                shapes.append(list(t.shape))
                handles.append({uid: reduce_tensor(t)[1]})
        torch.cuda.synchronize()
        handles = self._merge(handles)
        if self.rank != 0:
            return None
        return {"names": names, "dtype_names": dtype_names, "shapes": shapes, "ipc_handles": handles}

    def release(self) -> None:
        """Drop exported tensors and let torch reclaim the IPC-shared blocks (every rank, after every
        rollout worker's apply has returned)."""
        if not self._refs:
            return
        import torch
        import torch.distributed as dist

        self._refs.clear()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        torch.cuda.ipc_collect()

    def shutdown(self) -> None:
        self.release()


class IpcWeightSync(WeightSync):
    method = "ipc"

    def connect(self) -> None:
        infos = get_all([r.transfer_init.remote("ipc", None) for r in self.policy_ranks])
        get_all([w.transfer_init.remote(infos[0]) for w in self.rollout])

    def push(self) -> float:
        t0 = time.perf_counter()
        self.pushes += 1
        info = get_all([r.transfer_export.remote() for r in self.policy_ranks])[0]
        get_all([w.transfer_apply.remote(info, str(self.pushes)) for w in self.rollout])
        get_all([r.transfer_release.remote() for r in self.policy_ranks])
        return time.perf_counter() - t0

    def close(self) -> None:
        shutdown_quietly([w.transfer_shutdown.remote() for w in self.rollout]
                         + [r.transfer_shutdown.remote() for r in self.policy_ranks])
