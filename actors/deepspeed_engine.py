"""DeepSpeed helpers shared by the Ray Train fits (cluster/train.py) and the PPO learners."""
from __future__ import annotations


def deepspeed_config(tc, world_size: int) -> dict:
    """DeepSpeed config from a TrainConfig: batch sizes, ZeRO stage, precision, optimizer."""
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
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def full_state_dict(engine, rank: int) -> dict | None:
    """The whole model's state dict on rank 0 (ZeRO-3 shards are gathered; others get None)."""
    import deepspeed
    import torch

    def gather() -> dict | None:
        if rank != 0:
            return None
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in engine.module.state_dict().items()}

    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            return gather()
    return gather()
