"""One Safe RLHF step through the Ray round against the same step in one process.

    .venv/bin/python bench/round_step.py [--run-dir runs/tiny] [--steps 6] [--engine vllm|hf] [--layout split|colocated] [--threads N] [--weight-sync checkpoint|gloo] [--micro-batch-size N] [--overlap]
    .venv/bin/python bench/round_step.py --run-dir runs/smollm2 --steps 3     # at 135M (after the preset's run)

Both run `stages.safe_rlhf.round.ppo_step` (the round's own code: generate, score, advantages,
lambda, learn, weight push) on the same batch size, engine, models (the run's SFT policy and its
first fitted reward and cost models) and seeds. The Ray path uses the round's actors
(`RoundRoles`: rollout worker, scorers, DeepSpeed learner groups, placement group); the in-process
path calls the same plain classes directly (`LocalRoles` below), with the checkpoint weight push.
Prints each phase's median over the steps after the first, and the ratio Ray / in-process, and the
peak resident memory of each of the Ray round's processes (`--layout colocated`: fewer of them).

Then where each step's time goes: in the roles (Ray path: some actor runs a method, from Ray's
task timeline; in-process: inside a role's call) or outside them (the driver's own work, and on
the Ray path Ray's dispatch, transfer and gather). The difference of the two "outside" figures is
Ray's own time on the step's critical path; the rest of a gap between the paths is the roles'
compute itself (here: one-thread actors sharing 2 cores, against one process on 2 threads).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("time_generate", "time_score", "time_learn", "time_sync")


def timed(method):
    """A LocalRoles method whose time counts as time in the roles."""
    def call(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.in_roles_s += time.perf_counter() - t0
    return call


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
            self.scorer.update(self.learners[role].hosted)  # layout colocated: the scorers its rank 0 holds
        self.sync_dir, self.retries = tmp / "sync", 0
        self.policy_step = self.rollout_step = 0
        self.in_roles_s = 0.0  # time inside the roles' calls, for `run_steps`

    def generate(self, prompts, sampling, step):
        return self.finish_generation(self.start_generation(prompts, sampling), step)

    def start_generation(self, prompts, sampling):  # one process: nothing runs beside the caller
        return prompts, sampling, self.rollout_step

    @timed
    def finish_generation(self, pending, step):
        from stages.safe_rlhf.roles import worker_sampling

        prompts, sampling, weights_step = pending  # as the round's one worker
        return self.rollout.generate(prompts, worker_sampling(sampling, 0)), weights_step

    @timed
    def score(self, seqs, scored, step, texts=None, text_scored=(), categories=False):
        # as RoundRoles.score: a score model with its own tokenizer (MiniLM in configs/smollm2.yaml) reads text
        if categories:
            raise NotImplementedError("round_step measures the one-constraint round (safe_rlhf.constraints single)")

        def end_scores(role):
            return self.scorer[role].score_conversations(**texts) if role in text_scored else self.scorer[role].score(scored)

        return {"ref_logp": self.scorer["reference"].logprobs(seqs), "reward": end_scores("reward"),
                "cost": end_scores("cost") if "cost" in self.scorer else None,
                "old_logp": self.learners["policy"].forward(seqs),
                "reward_values": self.learners["reward_critic"].forward(seqs) if "reward_critic" in self.learners else None,
                "cost_values": self.learners["cost_critic"].forward(seqs) if "cost_critic" in self.learners else None}

    @timed
    def train(self, batches):
        stats = {}
        for role, b in batches.items():
            stats.update(self.learners[role].train_step(b))
        return stats

    @timed
    def push_weights(self, step):
        import shutil

        t0 = time.perf_counter()
        shutil.rmtree(self.sync_dir, ignore_errors=True)
        self.learners["policy"].export(str(self.sync_dir))
        self.rollout.update_weights(str(self.sync_dir))
        self.rollout_step = self.policy_step
        return time.perf_counter() - t0


def run_steps(roles, setup, steps: int, seed: int) -> list[dict]:
    from core import objectives as O
    from stages.safe_rlhf.round import ppo_step

    rl, k = setup.rl, setup.round
    rc = rl.rounds[k - 1]
    lagrange = O.LagrangeMultiplier(rc.lambda_init, rc.lambda_lr, -3.0, rl.lambda_max, rl.lambda_window)
    out, rollout = [], None
    for step in range(1, steps + 1):
        t0, in_roles = time.time(), getattr(roles, "in_roles_s", None)
        m, rollout = ppo_step(roles, setup, lagrange, step, seed, rollout)
        m["window"] = (t0, time.time())
        if in_roles is not None:
            m["in_roles_s"] = roles.in_roles_s - in_roles
        out.append(m)
    return out


def covered_s(spans: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of [start, end] inside at least one of the (sorted) spans."""
    total, reach = 0.0, start
    for a, b in spans:
        a, b = max(a, reach), min(b, end)
        if b > a:
            total += b - a
            reach = b
    return total


def time_in_actors(steps: list[dict]) -> None:
    """Each step's time in which some actor ran a method, from Ray's task timeline -> m["in_roles_s"]."""
    import ray

    time.sleep(3)  # workers report their task events about once a second
    spans = sorted((e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6) for e in ray.timeline()
                   if e.get("ph") == "X" and e.get("cat", "").startswith("task::"))  # the methods, not Ray's parts
    for m in steps:
        m["in_roles_s"] = covered_s(spans, *m["window"])


def peak_rss_gib(roles) -> dict[str, float]:
    """Each round actor's peak resident memory so far (VmHWM of its process), GiB."""
    import os

    import ray

    handles = dict(zip(roles.rollout_names, roles.rollout))
    handles.update({f"scorer-{r}-0": h for r, h in roles.scorer_actors.items()})
    handles.update({n: h for g in roles.learners.values() for n, h in zip(g.names, g.ranks)})
    pids = ray.get([h.__ray_call__.remote(lambda self: os.getpid()) for h in handles.values()])
    out = {}
    for name, pid in zip(handles, pids):
        status = Path(f"/proc/{pid}/status").read_text()
        kib = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1])
        out[name] = kib / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/tiny", help="a run whose sft, fit_reward, fit_cost and ingest are done")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--engine", choices=["vllm", "hf"], help="default: the run's")
    ap.add_argument("--layout", choices=["split", "colocated"], help="safe_rlhf.layout (default: the run's)")
    ap.add_argument("--weight-sync", choices=["checkpoint", "gloo"], help="safe_rlhf.weight_sync of the Ray path (default: "
                    "the run's; the in-process path always pushes through a checkpoint directory)")
    ap.add_argument("--threads", type=int, help="safe_rlhf.threads_per_actor (default: the run's)")
    ap.add_argument("--micro-batch-size", type=int, help="safe_rlhf.micro_batch_size (default: the run's)")
    ap.add_argument("--overlap", action="store_true", help="safe_rlhf.overlap_generation on (both paths; only Ray can "
                    "run generation beside learning)")
    args = ap.parse_args()

    from pipeline.config import load_config
    from stages.safe_rlhf.setup import RoundSetup

    run = Path(args.run_dir).resolve()
    cfg = load_config(run / "config.yaml")
    rl = cfg.safe_rlhf.model_copy(update={**({"engine": args.engine} if args.engine else {}),
                                          **({"layout": args.layout} if args.layout else {}),
                                          **({"threads_per_actor": args.threads} if args.threads else {}),
                                          **({"weight_sync": args.weight_sync} if args.weight_sync else {}),
                                          **({"micro_batch_size": args.micro_batch_size} if args.micro_batch_size else {}),
                                          "overlap_generation": args.overlap})
    stage = lambda n, out: run / "stages" / n / out
    # a world-free run (configs/smollm2.yaml) has no sft stage: its starting policy is model.path
    policy = stage("sft", "model") if (run / "stages" / "sft").is_dir() else Path(cfg.model.path)
    inputs = {"policy": policy, "reward_model": stage("fit_reward", "model"),
              "cost_model": stage("fit_cost", "model"), "train_pairs": stage("ingest", "train.parquet")}
    missing = [str(p) for p in inputs.values() if not p.exists()]
    if missing:
        sys.exit(f"missing {missing}: run the pipeline first (e.g. `python -m pipeline run --run-dir {args.run_dir}`)")
    setup = dataclasses.replace(RoundSetup.for_inputs(cfg, rl, 1, inputs), steps=args.steps, threshold=-3.0)
    print(f"{args.steps} steps x {rl.prompts_per_step} prompts, engine {rl.engine}, {rl.device}, layout {rl.layout}, "
          f"threads_per_actor {rl.threads_per_actor}, weight_sync {rl.weight_sync}, micro_batch_size {rl.micro_batch_size}, "
          f"overlap_generation {rl.overlap_generation}", flush=True)

    import ray

    from stages.safe_rlhf.roles import RoundRoles

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            t0 = time.perf_counter()
            roles = RoundRoles(cfg, rl, inputs, Path(tmp) / "sync-ray", name="bench-round")
            setup_ray = time.perf_counter() - t0
            print("Ray actors up after (s): " + ", ".join(f"{n} {t}" for n, t in roles.ready_s.items()), flush=True)
            try:
                results["ray"] = run_steps(roles, setup, args.steps, cfg.seed)
                rss = peak_rss_gib(roles)
                time_in_actors(results["ray"])
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
    print(f"peak resident memory of the round's {len(rss)} processes (VmHWM, GiB): {sum(rss.values()):.2f} = "
          + " + ".join(f"{n} {g:.2f}" for n, g in rss.items()))
    wall = lambda m: m["window"][1] - m["window"][0]
    outside = {path: statistics.median(wall(m) - m["in_roles_s"] for m in results[path][1:]) for path in results}
    inside = {path: statistics.median(m["in_roles_s"] for m in results[path][1:]) for path in results}
    print("where a step's time goes (median of steps 2..)")
    print(f"{'  in the roles':<30}{inside['ray']:>9.3f}{inside['in-process']:>14.3f}"
          f"{inside['ray'] / inside['in-process']:>18.2f}   (Ray: some actor runs a method)")
    print(f"{'  outside them':<30}{outside['ray']:>9.3f}{outside['in-process']:>14.3f}"
          f"{'':>18}   (the driver; Ray: also dispatch, transfer, gather)")
    ray_own = outside["ray"] - outside["in-process"]
    print(f"Ray's own time on a step's critical path: {ray_own * 1e3:.0f} ms ({ray_own / ray_step:.1%} of the Ray step)")
    same = all(abs(a["reward_mean"] - b["reward_mean"]) < 0.05 for a, b in zip(results["ray"], results["in-process"]))
    print(f"same trajectory (reward_mean within 0.05 at every step): {same}")
    for path in ("ray", "in-process"):
        print(f"  reward_mean by step, {path}: {[round(m['reward_mean'], 3) for m in results[path]]}")


if __name__ == "__main__":
    main()
