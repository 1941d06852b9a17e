"""What the broadcast transports (gloo, nccl) share: one group of policy rank 0 and every vLLM
worker process, the driver's call order, and the trainer-side sender.

Group layout: rank 0 = learner rank 0 (the only learner process in the group); then each rollout
engine's workers. A vLLM worker's rank is rank_offset + dp_index * (TP*PP) + its rank within the
engine; our rollout workers are separate `LLM`s, all with dp_index 0, so each gets its own
rank_offset: 1, 1 + ws_0, 1 + ws_0 + ws_1, ... (`rank_offsets`). vLLM's own trainer engine sends
rank_offset=1 to every engine, which is only right for a single engine.

The driver's call order ("together" means: issue every Ray call, then wait for all of them, since
the calls meet inside a collective and each blocks until all have arrived; a sequential ray.get
would deadlock):

  connect:  1. addr, port = policy rank 0 `master_address()`
            2. infos = init infos for every rollout worker (its TP*PP size)
            3. together: every policy rank `transfer_init(method, infos[0])`,
                         rollout i `transfer_init(infos[i])`
            4. meta = policy rank 0 `transfer_metadata()` (static: reused every push)
  push:     together: rollout workers `transfer_apply(meta, version)`,
                      every policy rank `transfer_send(meta)` (ZeRO-3 gathers are collectives:
                      every rank iterates; only rank 0 broadcasts)
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from cluster.weight_sync.base import WeightSync, dtype_name, get_all, shutdown_quietly


def rank_offsets(worker_world_sizes: Sequence[int]) -> tuple[int, list[int]]:
    """(world size, each rollout engine's first rank) for the trainer plus every engine's workers."""
    offsets, offset = [], 1
    for ws in worker_world_sizes:
        offsets.append(offset)
        offset += ws
    return offset, offsets


def checked(named_tensors: Iterable[tuple[str, Any]], expected: Mapping[str, Any] | None,
            counter: list[int]) -> Iterator[tuple[str, Any]]:
    """Yield the caller's (name, tensor) pairs, checked against what the workers were told.

    A mismatch would make both sides cut the byte stream differently: a hang or garbage weights.
    Fail on the trainer instead, naming the parameter (as vLLM's own sender does).
    """
    import torch

    n = len(expected["names"]) if expected is not None else None
    i = 0
    for name, t in named_tensors:
        t = t.detach()
        if expected is not None:
            if i >= n:
                raise ValueError(f"sender yielded more tensors than the {n} announced; first extra is {name!r}")
            want = (expected["names"][i], expected["dtype_names"][i], list(expected["shapes"][i]))
            got = (name, dtype_name(t.dtype), list(t.shape))
            if want != got:
                raise ValueError(f"tensor #{i} disagrees with the announced metadata: announced {want}, got {got}")
        if t.is_cuda:
            # vLLM's packed producer reads on its own side stream, current while this generator runs:
            # make it wait for work queued on the default stream (e.g. a cast), and tell the caching
            # allocator it uses the block, so a ZeRO-3 gather buffer freed by the caller's next step is
            # not reused before the copy out of it has run. (Not run on a GPU here.)
            stream = torch.cuda.current_stream()
            stream.wait_stream(torch.cuda.default_stream())
            t.record_stream(stream)
        counter[0] += t.numel() * t.element_size()
        i += 1
        yield name, t
    if n is not None and i != n:
        raise ValueError(f"sender yielded {i} tensors but {n} were announced; the workers wait for the rest")


class BroadcastSender:
    """Trainer side: rank 0 broadcasts each tensor into the group; other ranks drain the iterator."""

    method = ""

    def __init__(self) -> None:
        self.group: Any = None  # rank 0 only
        self.is_sender = False

    def send(self, named_tensors: Iterable[tuple[str, Any]], update_info: Mapping[str, Any] | None) -> tuple[float, int]:
        """-> (seconds, bytes sent). Rank 0 checks each tensor against `update_info` first."""
        import torch

        t0 = time.perf_counter()
        counter = [0]
        with torch.no_grad():
            if not self.is_sender:
                for _ in named_tensors:  # ZeRO-3: every rank takes part in each gather
                    pass
                return time.perf_counter() - t0, 0
            if self.group is None:
                raise RuntimeError(f"{type(self).__name__}.send before init")
            self._broadcast(checked(named_tensors, update_info, counter))
        return time.perf_counter() - t0, counter[0]

    def _broadcast(self, pairs: Iterator[tuple[str, Any]]) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        self.group = None


class BroadcastWeightSync(WeightSync):
    """Driver side of gloo and nccl: `init_infos(addr, port, sizes, timeout_s)` is the transport's."""

    init_infos: Callable[..., list[dict]]

    def __init__(self, policy_ranks: list, rollout: list, **kw):
        super().__init__(policy_ranks, rollout, **kw)
        self.update_info: dict | None = None

    def connect(self) -> None:
        addr, port = get_all([self.policy_ranks[0].master_address.remote()])[0]
        sizes = get_all([w.transfer_world_size.remote() for w in self.rollout])
        infos = type(self).init_infos(addr, port, sizes, self.timeout_s)
        get_all([r.transfer_init.remote(self.method, infos[0]) for r in self.policy_ranks]
                + [w.transfer_init.remote(info) for w, info in zip(self.rollout, infos)])
        self.update_info = get_all([self.policy_ranks[0].transfer_metadata.remote()])[0]

    def push(self) -> float:
        t0 = time.perf_counter()
        self.pushes += 1
        get_all([w.transfer_apply.remote(self.update_info, str(self.pushes)) for w in self.rollout]
                + [r.transfer_send.remote(self.update_info) for r in self.policy_ranks])
        return time.perf_counter() - t0

    def close(self) -> None:
        shutdown_quietly([w.transfer_shutdown.remote() for w in self.rollout]
                         + [r.transfer_shutdown.remote() for r in self.policy_ranks])
