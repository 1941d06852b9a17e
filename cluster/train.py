"""Ray Train + DeepSpeed plumbing shared by SFT and the reward/cost fits.

Driver side: `run_trainer` launches a `TorchTrainer` (gloo on CPU, nccl on GPU) whose workers
each run `fit(task)`: a DeepSpeed engine, deterministic sharded batches, checkpoints through
`ray.train.report` every K steps and at each epoch end, restart from the latest checkpoint after
a worker crash (`FailureConfig`) or when the stage is resumed (same run name and storage path).

Worker side: a stage describes its work as a `FitTask` (model, items, loss, eval, export);
`fit` runs the loop. Checkpoint state (epoch, step within epoch, global step, history) is saved
beside DeepSpeed's own checkpoint, so a restart continues the same trajectory.

In a process of our own: `run_in_process` runs the same worker loop as rank 0 of 1 in the calling
process (a learner kept between stages, stages/common/fit_runner.py), with no Ray Train controller
or worker processes. Its `LocalSession` writes checkpoints as Ray Train lays them out
(`<storage>/<name>/checkpoint_<time>`, the newest two kept) and restores the newest, whichever wrote it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from cluster.deepspeed_setup import deepspeed_config, full_state_dict, without_inference_shm_op

CKPT_TAG = "ckpt"
FAULT_ENV = "SAFE_RLHF_FAULT"  # test hook: "<run name>:<global step>" crashes that step once


# ---------------------------------------------------------------------- driver side
def worker_env(device: str) -> dict[str, str]:
    return {"DS_ACCELERATOR": device, "TOKENIZERS_PARALLELISM": "false",
            # DeepSpeed's CPU accelerator reads these; Ray sets none of them for us.
            "LOCAL_SIZE": os.environ.get("LOCAL_SIZE", "1")}


def run_trainer(loop: Callable[[dict], None], loop_config: dict, tc, storage_dir: Path, name: str):
    """Run `loop(loop_config)` on `tc.num_workers` Ray Train workers (tc: pipeline TrainConfig).

    Re-running with the same `name` and `storage_dir` continues from the latest checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = tc.device == "cuda"
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    env = worker_env(tc.device)
    if os.environ.get(FAULT_ENV):
        env[FAULT_ENV] = os.environ[FAULT_ENV]
    trainer = TorchTrainer(
        loop, train_loop_config={**loop_config, "run_name": name},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=str(Path(storage_dir).resolve()),
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             worker_runtime_env={"env_vars": env}),
    )
    return trainer.fit()


# ---------------------------------------------------------------------- worker side
def warmup_cosine(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # decays to 10% of peak

    return factor


@dataclass
class FitTask:
    """What a stage asks `fit` to do. Built inside the worker (it holds a model)."""

    model: Any  # torch.nn.Module
    train_items: list  # one item = one example (a conversation, a pair)
    loss: Callable[[Any, list], tuple[Any, dict]]  # (engine, items) -> (loss tensor, logs)
    evaluate: Callable[[Any, int, int], dict]  # (engine, rank, world) -> metrics (collective)
    export: Callable[[Any, dict | None], None]  # (engine, full state dict on rank 0 / None) -> None
    tc: dict  # TrainConfig as a dict
    seed: int = 0
    run_name: str = "fit"
    log_path: Path | None = None  # rank 0 appends one JSON line per logged step/epoch


class RayTrainSession:
    """Where `fit` runs by default: a Ray Train worker (its rank, device and checkpoints are Ray Train's)."""

    def rank_world(self) -> tuple[int, int]:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()

    def device(self):
        from ray.train.torch import get_device

        return get_device()

    @contextmanager
    def latest_checkpoint(self):
        """The directory of the checkpoint to restore, or None."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict, directory: str) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


class LocalSession:
    """`fit` as rank 0 of 1 in a process of our own (`run_in_process`). Checkpoints are directories
    `checkpoint_<time>` under `storage` (Ray Train's layout and names, so that each restores the
    other's), written whole under a temporary name and renamed, the newest `keep` kept."""

    def __init__(self, storage: Path, device: str, keep: int = 2):
        self.storage, self.keep = Path(storage), keep
        self._device = device

    def rank_world(self) -> tuple[int, int]:
        return 0, 1

    def device(self):
        import torch

        return torch.device("cuda", torch.cuda.current_device()) if self._device == "cuda" else torch.device("cpu")

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.storage.glob("checkpoint_*") if p.is_dir() and (p / "loop_state.json").exists())

    @contextmanager
    def latest_checkpoint(self):
        found = self.checkpoints()
        yield found[-1] if found else None

    def report(self, metrics: dict, directory: str) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        final = self.storage / f"checkpoint_{datetime.now():%Y-%m-%d_%H-%M-%S.%f}"
        partial = final.with_name(f".{final.name}.partial")
        shutil.copytree(directory, partial)
        os.rename(partial, final)  # a checkpoint is whole or absent, also when the process is killed here
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        print(f"fit checkpoint {final}, metrics={metrics}", flush=True)  # the live view's progress (pipeline/console.py)


_SESSION: LocalSession | None = None  # set by run_in_process for the loop it runs


def session() -> RayTrainSession | LocalSession:
    return _SESSION or RayTrainSession()


def run_in_process(loop: Callable[[dict], None], loop_config: dict, storage_dir: Path, name: str, device: str,
                   threads: int, fault: str | None = None) -> None:
    """Run `loop(loop_config)` here as rank 0 of 1, as `run_trainer` runs it on one Ray Train
    worker: checkpoints under storage_dir/name (a run again continues from the newest), `threads`
    torch threads (Ray Train's worker has its CPUs' worth), the process group of one rank joined
    when it has none. fault: the SAFE_RLHF_FAULT test hook's value for this loop (a kept process
    did not start with the driver's environment). The previous threads are restored after."""
    global _SESSION
    import torch

    from cluster.deepspeed_setup import join_alone

    join_alone(device)
    threads_before = torch.get_num_threads()
    if fault:
        os.environ[FAULT_ENV] = fault
    torch.set_num_threads(threads)
    _SESSION = LocalSession(Path(storage_dir) / name, device)
    try:
        loop({**loop_config, "run_name": name})
    finally:
        _SESSION = None
        torch.set_num_threads(threads_before)
        os.environ.pop(FAULT_ENV, None)


def _report(engine, state: dict, metrics: dict, rank: int) -> None:
    """Save a DeepSpeed checkpoint plus our loop state, and report it (Ray Train's or ours; all ranks)."""
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG)
        if rank == 0:
            Path(tmp, "loop_state.json").write_text(json.dumps(state))
        session().report(metrics, tmp)


def _restore(engine) -> dict | None:
    with session().latest_checkpoint() as d:
        if d is None:
            return None
        engine.load_checkpoint(d, tag=CKPT_TAG)
        return json.loads(Path(d, "loop_state.json").read_text())


def _maybe_inject_fault(run_name: str, step: int, marker_dir: Path) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec != f"{run_name}:{step}":
        return
    marker = marker_dir / f".fault-{run_name}-{step}"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("injected")
        os._exit(17)  # a hard crash, as a killed worker would be


def _start_engine(task: FitTask, world: int, total_steps: int):
    """The DeepSpeed engine (warm-up then cosine over total_steps), restored from Ray Train's latest
    checkpoint when there is one -> (engine, loop state: epoch, micro-batch, history, restarts)."""
    import deepspeed
    import torch

    tc = task.tc
    without_inference_shm_op()
    engine, *_ = deepspeed.initialize(
        model=task.model, model_parameters=[p for p in task.model.parameters() if p.requires_grad],
        config=deepspeed_config(tc, world),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, tc["warmup_ratio"])))
    state = _restore(engine) or {"epoch": 0, "micro_in_epoch": 0, "history": [], "restarts": 0}
    if engine.global_steps:
        state["restarts"] += 1
        state.setdefault("resumed_from_steps", []).append(engine.global_steps)
    return engine, state


def fit(task: FitTask) -> None:
    """The training loop of one worker: epochs of sharded micro-batches under DeepSpeed."""
    import torch

    rank, world = session().rank_world()
    tc = task.tc
    torch.manual_seed(task.seed + rank)
    micro, accum = tc["per_device_batch_size"], tc["gradient_accumulation"]
    per_rank = len(task.train_items) // world  # equal shards: every rank reports equally often
    micro_per_epoch = per_rank // micro
    steps_per_epoch = max(1, micro_per_epoch // accum)
    total_steps = steps_per_epoch * tc["epochs"]
    engine, state = _start_engine(task, world, total_steps)
    resumed_from = engine.global_steps
    log = (lambda rec: open(task.log_path, "a").write(json.dumps(rec) + "\n")) if rank == 0 and task.log_path else (lambda rec: None)
    log({"event": "start", "global_step": resumed_from, "total_steps": total_steps, "world_size": world})
    t0, tokens = time.time(), 0
    for epoch in range(state["epoch"], tc["epochs"]):
        g = torch.Generator().manual_seed(task.seed * 1000 + epoch)
        order = torch.randperm(len(task.train_items), generator=g)[: per_rank * world].tolist()
        shard = order[rank::world]
        start = state["micro_in_epoch"] if epoch == state["epoch"] else 0
        running = []
        for m in range(start, micro_per_epoch):
            items = [task.train_items[i] for i in shard[m * micro:(m + 1) * micro]]
            engine.train()
            loss, logs = task.loss(engine, items)
            engine.backward(loss)
            engine.step()
            running.append(loss.item())
            tokens += logs.pop("tokens", 0)
            if not engine.is_gradient_accumulation_boundary() and (m + 1) % accum:
                continue
            step = engine.global_steps
            _maybe_inject_fault(task.run_name, step, Path(task.log_path).parent if task.log_path else Path("."))
            if step % 10 == 0:
                log({"event": "step", "epoch": epoch, "global_step": step, "loss": sum(running[-accum:]) / accum,
                     "lr": engine.get_lr()[0], "tokens_per_s": tokens / max(1e-9, time.time() - t0), **logs})
            if step % tc["checkpoint_every_steps"] == 0 and m + 1 < micro_per_epoch:
                state.update(epoch=epoch, micro_in_epoch=m + 1)
                _report(engine, state, {"global_step": step, "loss": running[-1]}, rank)
        engine.eval()
        metrics = task.evaluate(engine, rank, world)
        metrics.update(epoch=epoch + 1, global_step=engine.global_steps,
                       train_loss=sum(running) / max(1, len(running)))
        state["history"].append(metrics)
        log({"event": "epoch", **metrics})
        state.update(epoch=epoch + 1, micro_in_epoch=0)
        _report(engine, state, metrics, rank)
    engine.eval()
    sd = full_state_dict(engine, rank)
    task.export(engine, sd)
    log({"event": "end", "global_step": engine.global_steps, "restarts": state["restarts"],
         "resumed_from_steps": state.get("resumed_from_steps", []), "history": state["history"]})


def rank_share(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """Rank `rank`'s share of n items to score: (indices, how many are real). Every rank gets the
    same number, padded with item 0: under ZeRO-3 each forward is a collective, so a rank with one
    forward more than the others would wait for them forever."""
    per_rank = -(-n // world)
    real = list(range(rank, n, world))
    return real + [0] * (per_rank - len(real)), len(real)


def gather_objects(obj: Any, world: int) -> list:
    """all_gather_object across the training group (every rank gets every rank's object)."""
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
