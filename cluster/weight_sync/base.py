"""The interface every transport's driver side implements, and what the transports share.

`WeightSync` runs in the driver. It holds the policy learners' and the rollout workers' actor
handles and moves the policy's current weights to every rollout worker:

    connect()    once, after the actors are up (forms a transfer group where there is one)
    push()       after every policy update; returns wall seconds; blocks until every worker
                 samples from the new weights
    reconnect()  after Ray restarted a rollout worker: it came back with its initial weights and
                 outside any group, so form the group again and push the current weights again
    close()      leave the group on every side (best effort: some actors may be gone)
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# A transfer whose peer died fails after this long (a dead peer never arrives in a collective).
DEFAULT_TIMEOUT_S = 60.0


class WeightSync:
    method = ""

    def __init__(self, policy_ranks: list, rollout: list, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.policy_ranks, self.rollout, self.timeout_s = list(policy_ranks), list(rollout), timeout_s
        self.pushes = 0  # also the weight version vLLM records

    def connect(self) -> None:
        pass

    def push(self) -> float:
        raise NotImplementedError

    def reconnect(self) -> None:
        self.close()
        self.connect()
        if self.pushes:
            self.pushes -= 1  # the same version again
            self.push()

    def close(self) -> None:
        pass


def get_all(refs: list, timeout_s: float | None = None) -> list:
    """ray.get of calls that meet inside one collective: issued together, awaited together."""
    import ray

    return ray.get(refs, timeout=timeout_s)


def shutdown_quietly(refs: list, timeout_s: float = 60.0) -> None:
    """Wait for shutdown calls; an actor that is gone has nothing to shut down."""
    import ray

    for ref in refs:
        try:
            ray.get(ref, timeout=timeout_s)
        except Exception:  # noqa: BLE001 - a dead or restarting actor; nothing to leave
            pass


def reset_prefix_cache(llm: Any) -> None:
    # vLLM does not do this itself after a weight update (neither reload_weights nor
    # finish_weight_update touches the scheduler): KV blocks cached under the old policy would be
    # reused for shared prompt prefixes, i.e. silently off-policy rollouts.
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM refused to reset its prefix cache (requests still running during the weight sync?)")


def dtype_name(dtype: Any) -> str:
    return str(dtype).split(".")[-1]  # torch.bfloat16 -> "bfloat16"; the worker does getattr(torch, name)


def transfer_metadata(named_params: Iterable[tuple[str, Any]], dtype: Any = None) -> dict[str, list]:
    """The per-round update_info {names, dtype_names, shapes} for `named_params`, without gathering.

    ZeRO-3 partitioned parameters report an empty `.shape`; their full shape is `ds_shape`.
    `dtype`: the dtype the sender will put on the wire (when it casts, e.g. fp32 master -> bf16).
    Names must be the HF checkpoint names vLLM's `load_weights` expects ("model.layers.0...."),
    and the order must be exactly the order the sender yields the tensors in.
    """
    names, dtype_names, shapes = [], [], []
    for name, p in named_params:
        names.append(name)
        dtype_names.append(dtype_name(dtype if dtype is not None else p.dtype))
        shapes.append([int(s) for s in getattr(p, "ds_shape", p.shape)])
    return {"names": names, "dtype_names": dtype_names, "shapes": shapes}
