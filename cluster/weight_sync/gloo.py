"""weight_sync: gloo. vLLM's weight-transfer API with our own backend (cluster/weight_sync/
vllm_plugin.py, registered in every vLLM process as a plugin): the nccl method's protocol and call
order (broadcast.py), over a torch gloo group through host memory. Nothing touches the disk; it is
how the in-memory path runs, and is tested, on a CPU-only machine. On a GPU cluster every tensor
is staged through host memory: prefer nccl there.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from cluster.weight_sync.base import DEFAULT_TIMEOUT_S
from cluster.weight_sync.broadcast import BroadcastSender, BroadcastWeightSync, rank_offsets


def join_gloo_group(master_address: str, master_port: int, rank: int, world_size: int,
                    timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """A torch gloo ProcessGroup of `world_size` processes, outside torch.distributed's global state
    (a learner already has its default group, vLLM its own). Rank 0 hosts the TCPStore; every
    rank blocks here until all have joined; a collective whose peer is gone fails after `timeout_s`."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, int(master_port), world_size, is_master=rank == 0, timeout=timeout,
                          wait_for_workers=False)
    return dist.ProcessGroupGloo(dist.PrefixStore("safe_rlhf_weights/", store), rank, world_size, timeout)


def gloo_broadcast(group: Any, tensor: Any, src: int = 0) -> None:
    """Broadcast `tensor` (contiguous, in host memory) in place from `src`, as raw bytes: the bytes
    of any dtype travel the same way (gloo lacks reductions for some dtypes; a copy needs none)."""
    import torch
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = src
    group.broadcast([tensor.reshape(-1).view(torch.uint8)], opts).wait()


def init_infos(master_address: str, master_port: int, worker_world_sizes: Sequence[int],
               timeout_s: float = DEFAULT_TIMEOUT_S) -> list[dict[str, Any]]:
    """One init_info per rollout worker (`worker_world_sizes[i]` = its engine's TP*PP size); the
    trainer uses infos[0] (address, port, world size and timeout are the same in all)."""
    world_size, offsets = rank_offsets(worker_world_sizes)
    return [{"master_address": master_address, "master_port": int(master_port), "rank_offset": off,
             "world_size": world_size, "timeout_s": float(timeout_s)} for off in offsets]


class GlooSender(BroadcastSender):
    method = "gloo"

    def init(self, init_info: Mapping[str, Any], rank: int) -> None:
        """Join as rank 0 (learner rank 0 only); blocks until every rollout worker has joined."""
        self.is_sender = rank == 0
        if self.is_sender:
            self.group = join_gloo_group(init_info["master_address"], init_info["master_port"], 0,
                                         init_info["world_size"], init_info.get("timeout_s", DEFAULT_TIMEOUT_S))

    def _broadcast(self, pairs: Iterator[tuple[str, Any]]) -> None:
        for _, t in pairs:
            gloo_broadcast(self.group, t.to("cpu").contiguous())


class GlooWeightSync(BroadcastWeightSync):
    method = "gloo"
    init_infos = staticmethod(init_infos)
