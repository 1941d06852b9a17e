"""weight_sync: checkpoint. Policy rank 0 writes a safetensors Hugging Face directory (the same
`Learner.export` that writes the round's final policy), swapped in at the sync directory; every
rollout worker reloads it in place. Works with any engine; the default.

The sync directory is in /dev/shm on a CPU machine (one node), and in the run directory
otherwise (on a GPU cluster it must be shared storage every node sees).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from cluster.weight_sync.base import WeightSync, get_all, reset_prefix_cache


def sync_dir_for(run_dir: Path, stage_name: str, device: str) -> Path:
    """Where the weights travel for one stage of one run."""
    shm = Path("/dev/shm")
    base = shm if device == "cpu" and shm.is_dir() and os.access(shm, os.W_OK) else Path(run_dir)
    tag = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    return base / f"safe-rlhf-sync-{tag}-{stage_name.replace('@', '-')}"


def swap_into_place(tmp: Path, final: Path) -> None:
    """Make directory `tmp` appear at `final` (replacing what is there) without a moment when a
    half-written directory is visible. rename(2) cannot replace a non-empty directory: the old one
    is moved aside first; a reader that already opened its files keeps them."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def reload(llm: Any, path: str | os.PathLike) -> None:
    """Rollout side: reload `path` into a vLLM engine in place (every TP worker reads the files:
    layerwise reload, load_weights, post-processing), then reset the prefix cache."""
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path), "is_checkpoint_format": True})
    reset_prefix_cache(llm)


class CheckpointWeightSync(WeightSync):
    method = "checkpoint"

    def __init__(self, policy_ranks: list, rollout: list, sync_dir: Path, **kw):
        super().__init__(policy_ranks, rollout, **kw)
        self.sync_dir = Path(sync_dir)

    def push(self) -> float:
        t0 = time.perf_counter()
        self.pushes += 1
        tmp = self.sync_dir.with_name(self.sync_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        get_all([r.export.remote(str(tmp)) for r in self.policy_ranks])  # every rank: ZeRO-3 gathers
        swap_into_place(tmp, self.sync_dir)
        get_all([w.update_weights.remote(str(self.sync_dir)) for w in self.rollout])
        return time.perf_counter() - t0

    def reconnect(self) -> None:
        if self.sync_dir.exists():  # before the first push the workers hold the round's start weights
            get_all([w.update_weights.remote(str(self.sync_dir)) for w in self.rollout])

    def close(self) -> None:
        shutil.rmtree(self.sync_dir, ignore_errors=True)
        shutil.rmtree(self.sync_dir.with_name(self.sync_dir.name + ".tmp"), ignore_errors=True)
