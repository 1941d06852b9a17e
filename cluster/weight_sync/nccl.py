"""weight_sync: nccl. vLLM 0.32's NCCL weight transfer, GPU to GPU: learner rank 0 and every vLLM
worker process form one NCCL group (broadcast.py has the layout and the driver's call order) and
learner rank 0 broadcasts each tensor through vLLM's packed producer (two 1 GiB buffers on each
side for the length of a push, outside vLLM's gpu_memory_utilization). Needs distinct GPUs for
learner rank 0 and every vLLM worker; colocated on one GPU use ipc.

Written against vllm 0.32.0's sources (vllm/distributed/weight_transfer/{nccl_common,nccl_engine,
packed_tensor}.py). Not yet run on a GPU.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from cluster.weight_sync.base import DEFAULT_TIMEOUT_S
from cluster.weight_sync.broadcast import BroadcastSender, BroadcastWeightSync, rank_offsets

# vLLM's packed-transfer defaults (packed_tensor.py), repeated so this module reads without vLLM.
DEFAULT_PACKED_BUFFER_BYTES = 1024 * 1024 * 1024
DEFAULT_PACKED_NUM_BUFFERS = 2


def init_infos(master_address: str, master_port: int, worker_world_sizes: Sequence[int],
               timeout_s: float = DEFAULT_TIMEOUT_S) -> list[dict[str, Any]]:
    """One NCCLWeightTransferInitInfo payload per rollout worker: master_address, master_port,
    rank_offset, world_size and the packed wire params both sides must agree on (the trainer reads
    them from infos[0]). vLLM's NCCL group takes no timeout; a dead peer is found by Ray instead."""
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_payload

    world_size, offsets = rank_offsets(worker_world_sizes)
    return [worker_init_payload(NCCLWeightTransferInitInfo(
        master_address=master_address, master_port=int(master_port), rank_offset=off, world_size=world_size,
        packed=True, packed_buffer_size_bytes=DEFAULT_PACKED_BUFFER_BYTES, packed_num_buffers=DEFAULT_PACKED_NUM_BUFFERS))
        for off in offsets]


class NcclSender(BroadcastSender):
    method = "nccl"

    def init(self, init_info: Mapping[str, Any], rank: int) -> None:
        """Join the group as NCCL rank 0 (learner rank 0 only). Blocks until every vLLM worker has
        entered its init (TCPStore rendezvous, NCCL init, a warm-up all_reduce). Uses the current CUDA
        device: each learner actor sees one GPU."""
        self.is_sender = rank == 0
        self.packed = bool(init_info.get("packed", True))
        self.buffer_bytes = int(init_info.get("packed_buffer_size_bytes", DEFAULT_PACKED_BUFFER_BYTES))
        self.num_buffers = int(init_info.get("packed_num_buffers", DEFAULT_PACKED_NUM_BUFFERS))
        if not self.is_sender:
            return
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        self.group = trainer_init({k: init_info[k] for k in ("master_address", "master_port", "world_size")}, rank=0)

    def _broadcast(self, pairs: Iterator[tuple[str, Any]]) -> None:
        import torch

        torch.cuda.synchronize()  # the optimizer step's kernels must have landed before we read params
        if self.packed:
            from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

            packed_nccl_broadcast_producer(iterator=pairs, group=self.group, src=0,
                                           post_iter_func=lambda item: item[1],
                                           buffer_size_bytes=self.buffer_bytes, num_buffers=self.num_buffers)
        else:
            stream = torch.cuda.current_stream()
            for _, t in pairs:
                self.group.broadcast(t.contiguous(), src=0, stream=stream)  # NCCL reads numel from data_ptr()
        torch.cuda.current_stream().synchronize()

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.destroy()
            self.group = None


class NcclWeightSync(BroadcastWeightSync):
    method = "nccl"
    init_infos = staticmethod(init_infos)
