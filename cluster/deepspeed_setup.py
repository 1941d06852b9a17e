"""DeepSpeed helpers shared by the Ray Train fits (cluster/train.py) and the PPO learners."""
from __future__ import annotations


def deepspeed_config(tc, world_size: int, gradient_clipping: float = 1.0) -> dict:
    """DeepSpeed config from a TrainConfig (as a dict): batch sizes, ZeRO stage, precision, optimizer."""
    return {
        "train_micro_batch_size_per_gpu": tc["per_device_batch_size"],
        "gradient_accumulation_steps": tc["gradient_accumulation"],
        "train_batch_size": tc["per_device_batch_size"] * tc["gradient_accumulation"] * world_size,
        "optimizer": {"type": "AdamW", "params": {
            "lr": tc["lr"], "weight_decay": tc["weight_decay"], "betas": [0.9, 0.95], "eps": 1e-8,
            # torch's AdamW on CPU: DeepSpeed's fused/CPU Adam would compile an extension.
            "torch_adam": tc["device"] == "cpu"}},
        "zero_optimization": {"stage": tc["zero_stage"]},
        "bf16": {"enabled": tc["precision"] == "bf16"},
        "fp16": {"enabled": tc["precision"] == "fp16"},
        "gradient_clipping": gradient_clipping,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def without_inference_shm_op() -> None:
    """Mark DeepSpeed's CPU shared-memory all-reduce op unavailable before an engine starts.

    DeepSpeed's comm backend loads that op (JIT, through torch's cpp_extension) at every start, and
    the load holds a lock file under ~/.cache/torch_extensions for a moment even when nothing needs
    building. A process killed while holding it (the OOM killer, a learner killed from outside)
    leaves the file behind, and every later engine start on that host waits on it forever. The op
    serves only inference all-reduce (DeepSpeed's tensor-parallel inference); training never calls
    it. DeepSpeed keeps this table for edits (deepspeed/ops/__init__.py)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def join_alone(device: str) -> None:
    """Join a process group of one rank (rank 0 of 1), unless this process is in one already (a
    kept learner's). Through a file rendezvous: a TCP one binds a port picked earlier, which another
    process may take in between (EADDRINUSE seen after a node was lost)."""
    import os
    import tempfile

    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # what DeepSpeed reads of a launcher's
    without_inference_shm_op()
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", verbose=False, auto_mpi_discovery=False,
                               init_method=f"file://{tempfile.mkdtemp(prefix='learner-rendezvous-')}/store",
                               rank=0, world_size=1)


def gathered_parameters(engine, remove_duplicate: bool = True):
    """(name, full tensor) per parameter of the engine's module. Under ZeRO-3 each is gathered in
    turn (a collective: every rank must iterate to the end) and the tensor is valid only until the
    next one is asked for; copy it to keep it. Without ZeRO-3, the parameters themselves."""
    import deepspeed

    zero3 = engine.zero_optimization_stage() == 3
    for name, p in engine.module.named_parameters(remove_duplicate=remove_duplicate):
        if not zero3:
            yield name, p.data
            continue
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            yield name, p.data


def full_state_dict(engine, rank: int, dtype=None) -> dict | None:
    """The whole model's state dict on rank 0's host, in `dtype` (the training dtype; default the
    parameters' own), others get None. Under ZeRO-3 the parameters are gathered one at a time (a
    collective: every rank iterates), so no rank ever holds the whole model on its device, and no
    rank but 0 builds a host copy."""
    module = engine.module
    out = {} if rank == 0 else None
    for name, data in gathered_parameters(engine, remove_duplicate=False):  # tied weights under each of their names
        if out is not None:
            out[name] = data.detach().to("cpu", dtype or data.dtype, copy=True)
    if out is not None:  # persistent buffers: never partitioned
        buffers = dict(module.named_buffers())
        for name in module.state_dict():
            if name not in out and name in buffers:
                out[name] = buffers[name].detach().cpu().clone()
    return out
