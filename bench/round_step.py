"""One Safe RLHF step through the Ray round against the same step in one process.

    .venv/bin/python bench/round_step.py [--run-dir runs/tiny] [--steps 6] [--engine vllm|hf] [--overlap]

Both run `stages.safe_rlhf.round.ppo_step` (the round's own code: generate, score, advantages,
lambda, learn, weight push) on the same batch size, engine, models (the run's SFT policy and its
first fitted reward and cost models) and seeds. The Ray path uses the round's actors
(`RoundRoles`: rollout worker, scorers, DeepSpeed learner groups, placement group); the in-process
path calls the same plain classes directly (`LocalRoles` below), with the checkpoint weight push.
Prints each phase's median over the steps after the first, and the ratio Ray / in-process.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("time_generate", "time_score", "time_learn", "time_sync")


class LocalRoles:
    """RoundRoles' interface over plain objects in this process (no Ray)."""

    def __init__(self, cfg, rl, inputs: dict, tmp: Path):
        import os

        from actors.learner import Learner
        from actors.rollout import RolloutWorker
        from actors.scorer import Scorer
        from cluster.network import free_port
        from stages.safe_rlhf.roles import actor_arguments

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), DS_ACCELERATOR=rl.device)
        # the round's own constructor arguments; in one process the weights go through a checkpoint directory
        rollout, scorers, learners = actor_arguments(cfg, rl, inputs)
        (args, kw), = rollout.values()
        self.rollout = RolloutWorker(*args, **({**kw, "weight_sync": "checkpoint"} if "weight_sync" in kw else kw))
        self.scorer = {r: Scorer(*a, **k) for r, (_, a, k) in scorers.items()}
        self.learners = {}
        for role, ((_, args, kw),) in learners.items():  # one rank per role
            self.learners[role] = Learner(*args, **kw)
            self.learners[role].setup("127.0.0.1", int(os.environ["MASTER_PORT"]))
        self.sync_dir, self.retries = tmp / "sync", 0
        self.policy_step = self.rollout_step = 0

    def generate(self, prompts, sampling, step):
        return self.finish_generation(self.start_generation(prompts, sampling), step)

    def start_generation(self, prompts, sampling):  # one process: nothing runs beside the caller
        return prompts, sampling, self.rollout_step

    def finish_generation(self, pending, step):
        from stages.safe_rlhf.roles import worker_sampling

        prompts, sampling, weights_step = pending  # as the round's one worker
        return self.rollout.generate(prompts, worker_sampling(sampling, 0)), weights_step

    def score(self, seqs, scored, step):
        return {"ref_logp": self.scorer["reference"].logprobs(seqs), "reward": self.scorer["reward"].score(scored),
                "cost": self.scorer["cost"].score(scored) if "cost" in self.scorer else None,
                "old_logp": self.learners["policy"].forward(seqs),
                "reward_values": self.learners["reward_critic"].forward(seqs),
                "cost_values": self.learners["cost_critic"].forward(seqs) if "cost_critic" in self.learners else None}

    def train(self, batches):
        stats = {}
        for role, b in batches.items():
            stats.update(self.learners[role].train_step(b))
        return stats

    def push_weights(self, step):
        import shutil

        t0 = time.perf_counter()
        shutil.rmtree(self.sync_dir, ignore_errors=True)
        self.learners["policy"].export(str(self.sync_dir))
        self.rollout.update_weights(str(self.sync_dir))
        self.rollout_step = self.policy_step
        return time.perf_counter() - t0


def run_steps(roles, setup, steps: int, seed: int) -> list[dict]:
    from stages import objectives as O
    from stages.safe_rlhf.round import ppo_step

    rl, k = setup.rl, setup.round
    rc = rl.rounds[k - 1]
    lagrange = O.LagrangeMultiplier(rc.lambda_init, rc.lambda_lr, -3.0, rl.lambda_max, rl.lambda_window)
    out, rollout = [], None
    for step in range(1, steps + 1):
        m, rollout = ppo_step(roles, setup, lagrange, step, seed, rollout)
        out.append(m)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/tiny", help="a run whose sft, fit_reward, fit_cost and ingest are done")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--engine", choices=["vllm", "hf"], help="default: the run's")
    ap.add_argument("--overlap", action="store_true", help="safe_rlhf.overlap_generation on (both paths; only Ray can "
                    "run generation beside learning)")
    args = ap.parse_args()

    from pipeline.config import load_config
    from stages.safe_rlhf.round import RoundSetup, prompt_pool

    run = Path(args.run_dir).resolve()
    cfg = load_config(run / "config.yaml")
    rl = cfg.safe_rlhf.model_copy(update={**({"engine": args.engine} if args.engine else {}),
                                          "overlap_generation": args.overlap})
    stage = lambda n, out: run / "stages" / n / out
    inputs = {"policy": stage("sft", "model"), "reward_model": stage("fit_reward", "model"),
              "cost_model": stage("fit_cost", "model"), "train_pairs": stage("ingest", "train.parquet")}
    missing = [str(p) for p in inputs.values() if not p.exists()]
    if missing:
        sys.exit(f"missing {missing}: run the pipeline first (e.g. `python -m pipeline run --run-dir {args.run_dir}`)")
    setup = RoundSetup(rl, 1, args.steps, -3.0, inputs, prompt_pool(inputs["train_pairs"]),
                       cfg.model.max_prompt_tokens, cfg.model.max_answer_tokens)
    print(f"{args.steps} steps x {rl.prompts_per_step} prompts, engine {rl.engine}, {rl.device}, "
          f"overlap_generation {rl.overlap_generation}", flush=True)

    import ray

    from stages.safe_rlhf.roles import RoundRoles

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ctx = SimpleNamespace(cfg=cfg, name="bench-round", run_dir=Path(tmp), log=print, placement=None, actor_prefix="")
            t0 = time.perf_counter()
            roles = RoundRoles(ctx, rl, inputs, Path(tmp) / "sync-ray")
            setup_ray = time.perf_counter() - t0
            print("Ray actors up after (s): " + ", ".join(f"{n} {t}" for n, t in roles.ready_s.items()), flush=True)
            try:
                results["ray"] = run_steps(roles, setup, args.steps, cfg.seed)
            finally:
                roles.shutdown()
        finally:
            ray.shutdown()
        t0 = time.perf_counter()
        local = LocalRoles(cfg, rl, inputs, Path(tmp))
        setup_local = time.perf_counter() - t0
        results["in-process"] = run_steps(local, setup, args.steps, cfg.seed)

    def med(path, key):
        return statistics.median(m[key] for m in results[path][1:])

    print(f"{'phase (median of steps 2..)':<30}{'Ray s':>9}{'in-process s':>14}{'Ray / in-process':>18}")
    for key in PHASES:
        print(f"{key:<30}{med('ray', key):>9.3f}{med('in-process', key):>14.3f}{med('ray', key) / med('in-process', key):>18.2f}")
    ray_step, local_step = med("ray", "time_step"), med("in-process", "time_step")
    print(f"{'whole step':<30}{ray_step:>9.3f}{local_step:>14.3f}{ray_step / local_step:>18.2f}")
    print(f"{'set-up (actors / objects)':<30}{setup_ray:>9.1f}{setup_local:>14.1f}")
    same = all(abs(a["reward_mean"] - b["reward_mean"]) < 0.05 for a, b in zip(results["ray"], results["in-process"]))
    print(f"same trajectory (reward_mean within 0.05 at every step): {same}")
    for path in ("ray", "in-process"):
        print(f"  reward_mean by step, {path}: {[round(m['reward_mean'], 3) for m in results[path]]}")


if __name__ == "__main__":
    main()
