"""The `safe_rlhf@k` stage: one round of PPO-Lagrangian (Safe RLHF, arXiv 2310.12773, Sec. 3.3).

Each step reads like the algorithm:

    prompts  -> generate (rollout workers: vLLM or hf)
             -> score (reference logprobs, reward and cost end scores, policy logprobs, critic values)
             -> advantages (KL-shaped rewards and costs, GAE per critic; stages/objectives.py)
             -> lambda update (LagrangeMultiplier on the window of episode costs)
             -> learn (PPO epochs over minibatches: policy, reward critic, cost critic)
             -> sync weights (policy -> rollout workers)

Roles are Ray actors (cluster/roles.py) over plain classes (actors/). Every
`checkpoint_every_steps` the policy and critics (weights and optimizer), the multiplier with its
window, the step counter, the prompt cursor and RNG states are saved; an interrupted round
resumes from the last checkpoint and continues the same trajectory (prompts and sampling seeds
are functions of the step).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from actors.experience import CriticMinibatch, PolicyMinibatch, SequenceBatch
from actors.rollout import Generation, Sampling
from stages.base import Progress, StageResult
from stages import objectives as O


# ---------------------------------------------------------------------- inputs
def round_inputs(ctx) -> dict:
    """Where this round starts: policy, reward/cost models (for scorers and critics), prompts."""
    k = ctx.params["round"]
    prev = f"safe_rlhf@{k - 1}"
    if prev in ctx.inputs:
        policy = ctx.input(prev, "policy")
    elif "sft" in ctx.inputs:
        policy = ctx.input("sft", "model")
    else:
        policy = Path(ctx.cfg.model.path)
    algorithm = ctx.params.get("algorithm", ctx.cfg.safe_rlhf.algorithm)
    out = {"policy": policy, "reward_model": ctx.input(ctx.latest("fit_reward"), "model"),
           "train_pairs": ctx.input(ctx.latest("ingest"), "train")}
    if algorithm != "ppo":
        out["cost_model"] = ctx.input(ctx.latest("fit_cost"), "model")
    if "world" in ctx.inputs:
        out["eval_prompts"] = ctx.input("world", "eval_prompts")
    return out


def prompt_pool(train_parquet: Path) -> list[str]:
    """Distinct training prompts, in a stable order."""
    import pyarrow.parquet as pq

    from stages.text import format_prompt

    seen, out = set(), []
    for r in pq.read_table(train_parquet, columns=["prompt", "context"]).to_pylist():
        text = format_prompt(r["prompt"], r["context"])
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def auto_threshold(cost_model: Path, unsafe_share: float) -> float:
    """d = (1-u) * mean cost of safe eval answers + u * mean cost of unsafe ones: the mean cost of a
    policy that is unsafe a share u of the time, on the fitted cost model's own scale. (Threshold 0
    meant nothing on that scale in DESIGN.md's experiment; u = 0 would demand zero harm before
    lambda may fall.)"""
    meta = json.loads((Path(cost_model) / "score_config.json").read_text())
    if meta.get("safe_cost_mean") is None or meta.get("unsafe_cost_mean") is None:
        raise ValueError(f"threshold: auto needs is_safe labels (safe and unsafe answers) in the cost model's eval data "
                         f"({cost_model}); set safe_rlhf.rounds[k].threshold to a number")
    return (1 - unsafe_share) * float(meta["safe_cost_mean"]) + unsafe_share * float(meta["unsafe_cost_mean"])


# ---------------------------------------------------------------------- the round's pieces
@dataclass
class Experience:
    seqs: SequenceBatch
    old_logp: torch.Tensor  # [B, T]
    ref_logp: torch.Tensor  # [B, T]
    reward: torch.Tensor  # [B] reward model end scores
    cost: torch.Tensor | None  # [B] cost model end scores
    reward_values: torch.Tensor  # [B, T]
    cost_values: torch.Tensor | None  # [B, T]
    reward_advantages: torch.Tensor | None = None
    reward_returns: torch.Tensor | None = None
    cost_advantages: torch.Tensor | None = None
    cost_returns: torch.Tensor | None = None


def rollout_engine_kwargs(cfg, rl) -> dict:
    """RolloutWorker settings from the config (shared with red teaming)."""
    kw = {"device": rl.device, "dtype": rl.precision, "max_prompt_tokens": cfg.model.max_prompt_tokens}
    if rl.engine == "vllm":
        kw.update(max_model_len=cfg.model.max_prompt_tokens + rl.max_new_tokens + 8, max_num_seqs=rl.max_num_seqs,
                  tensor_parallel_size=rl.tensor_parallel_size, gpu_memory_utilization=rl.gpu_memory_utilization,
                  seed=cfg.seed, weight_sync=rl.weight_sync)
    return kw


class RoundRoles:
    """The round's actors: rollout workers, scorers, learner groups."""

    def __init__(self, ctx, rl, inputs: dict, launch_prefix: str, sync_dir: Path):
        import ray

        from actors.rollout import RolloutWorker
        from actors.scorer import Scorer
        from cluster.roles import Launcher, LearnerGroup, RolloutWeightSync, resource_plan

        model = ctx.cfg.model
        env = {"DS_ACCELERATOR": rl.device, "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "VLLM_LOGGING_LEVEL": "WARNING",
               **{k: v for k, v in os.environ.items() if k.startswith("SAFE_RLHF_KILL")}}
        self.plan = resource_plan(rl)
        self.launcher = Launcher(self.plan, env, launch_prefix)
        start = self.launcher.start
        engine_kw = rollout_engine_kwargs(ctx.cfg, rl)
        restarts = rl.max_actor_restarts  # rollout workers and scorers come back; learners do not
        self.rollout = [start(RolloutWorker, f"rollout-{i}", rl.engine, str(inputs["policy"]), max_restarts=restarts, **engine_kw)
                        for i in range(rl.rollout_workers)]
        self.reward = start(Scorer, "scorer-reward-0", "reward", str(inputs["reward_model"]), rl.device, rl.precision,
                            max_restarts=restarts)
        self.reference = start(Scorer, "scorer-reference-0", "reference", str(inputs["policy"]), rl.device, rl.precision,
                               max_restarts=restarts)
        self.cost = (start(Scorer, "scorer-cost-0", "cost", str(inputs["cost_model"]), rl.device, rl.precision,
                           max_restarts=restarts) if "cost_model" in inputs else None)
        settings = {"device": rl.device, "precision": rl.precision, "zero_stage": rl.zero_stage, "seed": ctx.cfg.seed,
                    "micro_batch": max(1, rl.prompts_per_step // rl.minibatches // rl.learners_per_role),
                    "clip_ratio": rl.clip_ratio, "clip_value": rl.clip_value}
        n = rl.learners_per_role
        self.policy = LearnerGroup(self.launcher, "policy", str(inputs["policy"]), {**settings, "lr": rl.actor_lr}, n)
        self.reward_critic = LearnerGroup(self.launcher, "reward_critic", str(inputs["reward_model"]), {**settings, "lr": rl.critic_lr}, n)
        self.cost_critic = (LearnerGroup(self.launcher, "cost_critic", str(inputs["cost_model"]), {**settings, "lr": rl.critic_lr}, n)
                            if O.uses_cost_critic(rl.algorithm) else None)
        ray.get([w.ready.remote() for w in self.rollout] + [s.ready.remote() for s in self.scorers])
        self.weights = RolloutWeightSync(rl.weight_sync, self.policy, self.rollout, sync_dir)
        self.weights.connect()

    @property
    def scorers(self):
        return [s for s in (self.reward, self.reference, self.cost) if s is not None]

    @property
    def critics(self):
        return [c for c in (self.reward_critic, self.cost_critic) if c is not None]

    def shutdown(self) -> None:
        self.weights.close()
        self.launcher.shutdown()


def _dead_actor_name(err) -> str:
    import re

    m = re.search(r"name: ([\w@.-]+)", str(err))
    return m.group(1) if m else "an actor"


class ActorCallFailed(Exception):
    """A call to a named rollout worker or scorer failed because the actor died."""

    def __init__(self, name: str, err: Exception):
        super().__init__(f"{name}: {type(err).__name__}")
        self.name = name


def gather(named_refs: dict) -> dict:
    """ray.get each actor's result, naming the actor whose call failed."""
    import ray
    from ray.exceptions import RayActorError

    out = {}
    for name, ref in named_refs.items():
        try:
            out[name] = ray.get(ref)
        except RayActorError as err:
            raise ActorCallFailed(name, err) from err
    return out


def with_retry(call, roles: "RoundRoles", step: int, log, attempts: int = 3):
    """Run `call()`; when a rollout worker or scorer died, wait for Ray to restart it, give the
    rollout workers the current policy weights again (a restarted actor starts from its initial
    model, outside any transfer group), and retry the same step (its prompts and seeds are
    functions of the step)."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            return call()
        except ActorCallFailed as err:
            if attempt == attempts:
                raise
            log(f"  {err.name} died; retrying step {step} once Ray has restarted it")
            ray.get([a.ready.remote() for a in roles.rollout + roles.scorers], timeout=600)
            roles.weights.reconnect()


def generate(roles: RoundRoles, prompts: list[str], sampling: Sampling) -> Generation:
    """Split the prompts across the rollout workers and merge what they return."""
    n = len(roles.rollout)
    parts = [prompts[i::n] for i in range(n)]
    gens = list(gather({f"rollout-{i}": w.generate.remote(p, Sampling(sampling.max_new_tokens, sampling.temperature,
                                                                        sampling.top_p, sampling.seed * 131 + i))
                        for i, (w, p) in enumerate(zip(roles.rollout, parts))}).values())
    order = [(i, j) for j in range(max(len(p) for p in parts)) for i in range(n) if j < len(parts[i])]
    pick = lambda field: [getattr(gens[i], field)[j] for i, j in order]
    return Generation(pick("prompt_ids"), pick("response_ids"), pick("texts"), pick("logprobs"))


def score(roles: RoundRoles, seqs: SequenceBatch, retry=lambda call: call()) -> Experience:
    """Reference logprobs, reward and cost end scores (scorers, with retry), then policy logprobs
    and critic values (learners)."""
    def scorers():
        refs = {"scorer-reference-0": roles.reference.logprobs.remote(seqs), "scorer-reward-0": roles.reward.score.remote(seqs)}
        if roles.cost is not None:
            refs["scorer-cost-0"] = roles.cost.score.remote(seqs)
        got = gather(refs)
        return {"ref_logp": got["scorer-reference-0"], "reward": got["scorer-reward-0"], "cost": got.get("scorer-cost-0")}

    got = retry(scorers)
    return Experience(seqs=seqs, old_logp=roles.policy.forward(seqs), ref_logp=got["ref_logp"], reward=got["reward"],
                      cost=got.get("cost"), reward_values=roles.reward_critic.forward(seqs),
                      cost_values=roles.cost_critic.forward(seqs) if roles.cost_critic else None)


def compute_advantages(exp: Experience, rl) -> None:
    """KL-shaped per-token rewards and costs, then GAE on each critic (paper Sec. 3.3)."""
    mask = exp.seqs.response_mask.float()  # [B, T]
    end_reward = O.shaped_end_reward(rl.algorithm, exp.reward, exp.cost, rl.shaping_nu)  # [B]
    cost = exp.cost if exp.cost is not None else torch.zeros_like(exp.reward)
    rewards, costs = O.kl_shaped_rewards(end_reward, cost, exp.old_logp, exp.ref_logp, mask, rl.kl_coeff, rl.clip_score)
    exp.reward_advantages, exp.reward_returns = O.gae(exp.reward_values, rewards, mask, rl.gamma, rl.gae_lambda)
    if exp.cost_values is not None:
        exp.cost_advantages, exp.cost_returns = O.gae(exp.cost_values, costs, mask, rl.gamma, rl.gae_lambda)


def learn(roles: RoundRoles, exp: Experience, lagrange_lambda: float, rl, generator: torch.Generator) -> dict:
    """PPO epochs over shuffled minibatches: policy, reward critic, cost critic."""
    stats: dict[str, list[float]] = {}
    B = len(exp.seqs)
    for _ in range(rl.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for rows in order.chunk(rl.minibatches):
            seqs = exp.seqs.select(rows)
            updates = [roles.policy.train_step(PolicyMinibatch(
                seqs, exp.old_logp[rows], exp.reward_advantages[rows],
                exp.cost_advantages[rows] if exp.cost_advantages is not None else None, lagrange_lambda))]
            updates.append(roles.reward_critic.train_step(CriticMinibatch(seqs, exp.reward_values[rows], exp.reward_returns[rows])))
            if roles.cost_critic is not None:
                updates.append(roles.cost_critic.train_step(CriticMinibatch(seqs, exp.cost_values[rows], exp.cost_returns[rows])))
            for u in updates:
                for k, v in u.items():
                    stats.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in stats.items()}


def sync_root(run_dir: Path, name: str, device: str) -> Path:
    """Where policy weights travel to the rollout workers with weight_sync: checkpoint. CPU (one node): local shared memory
    where there is one. GPU clusters: the run directory, which must be shared storage there."""
    shm = Path("/dev/shm")
    base = shm if device == "cpu" and shm.is_dir() and os.access(shm, os.W_OK) else run_dir
    return base / f"safe-rlhf-sync-{abs(hash(str(run_dir.resolve()))) % 10**8}-{name.replace('@', '-')}"


# ---------------------------------------------------------------------- checkpoints
class RoundCheckpoints:
    """ckpt/<role>/step_N (DeepSpeed: weights + optimizer) and ckpt/state_step_N.json, then
    ckpt/latest naming N, written last. Two are kept."""

    def __init__(self, root: Path):
        self.root = root

    def latest(self) -> dict | None:
        f = self.root / "latest"
        if not f.exists():
            return None
        return json.loads((self.root / f"state_step_{int(f.read_text())}.json").read_text())

    def save(self, roles: RoundRoles, state: dict) -> None:
        step = state["step"]
        tag = f"step_{step}"
        roles.policy.save_checkpoint(str(self.root / "policy"), tag)
        for c in roles.critics:
            c.save_checkpoint(str(self.root / c.role), tag)
        (self.root / f"state_step_{step}.json").write_text(json.dumps(state))
        tmp = self.root / "latest.tmp"
        tmp.write_text(str(step))
        os.replace(tmp, self.root / "latest")
        for old in sorted(self.root.glob("state_step_*.json"), key=lambda p: int(p.stem.split("_")[-1]))[:-2]:
            n = old.stem.split("_")[-1]
            old.unlink()
            for role_dir in self.root.iterdir():
                if role_dir.is_dir():
                    shutil.rmtree(role_dir / f"step_{n}", ignore_errors=True)

    def load(self, roles: RoundRoles, state: dict) -> None:
        tag = f"step_{state['step']}"
        roles.policy.load_checkpoint(str(self.root / "policy"), tag)
        for c in roles.critics:
            c.load_checkpoint(str(self.root / c.role), tag)


# ---------------------------------------------------------------------- the stage
def next_prompts(pool: list[str], step: int, batch: int, seed: int) -> list[str]:
    """The step's prompts: epochs of seeded permutations, so the cursor is a function of the step."""
    out = []
    cursor = step * batch
    while len(out) < batch:
        epoch, offset = divmod(cursor, len(pool))
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        take = order[offset:offset + batch - len(out)]
        out += [pool[i] for i in take]
        cursor += len(take)
    return out


def run(ctx) -> StageResult:
    cfg, rl = ctx.cfg, ctx.cfg.safe_rlhf
    if "algorithm" in ctx.params:  # a baseline run of the same round: ppo or reward_shaping
        rl = rl.model_copy(update={"algorithm": ctx.params["algorithm"]})
    k = ctx.params["round"]
    rcfg = rl.rounds[k - 1]
    steps = rcfg.steps or rl.steps_per_round
    inputs = round_inputs(ctx)
    if rcfg.threshold != "auto":
        threshold = float(rcfg.threshold)
    elif "cost_model" in inputs:
        threshold = auto_threshold(inputs["cost_model"], rl.auto_unsafe_share)
    else:
        threshold = 0.0  # reward-only ppo: no constraint, logged for completeness
    pool = prompt_pool(inputs["train_pairs"])
    ctx.log(f"  round {k}: {rl.algorithm}, {steps} steps x {rl.prompts_per_step} prompts ({len(pool)} distinct), "
            f"engine {rl.engine}, threshold {threshold:.3f}, lambda_init {rcfg.lambda_init}, lambda_lr {rcfg.lambda_lr}")
    from ray.exceptions import RayActorError

    for attempt in range(1, rl.max_round_restarts + 2):
        try:
            history, summary = _round(ctx, rl, k, steps, threshold, inputs, pool)
            break
        except RayActorError as err:  # a learner died (rollout workers and scorers are retried in place)
            if attempt > rl.max_round_restarts:
                raise
            ctx.log(f"  {_dead_actor_name(err)} died; restarting round {k} from its last checkpoint "
                    f"(attempt {attempt + 1} of {rl.max_round_restarts + 1})")
    _plot(history, ctx.out_dir / "training.png")
    return StageResult({"policy": "policy", "metrics": "metrics.jsonl", "plot": "training.png"}, summary)


def _round(ctx, rl, k: int, steps: int, threshold: float, inputs: dict, pool: list[str]) -> tuple[list[dict], dict]:
    """Launch the roles, continue from the last checkpoint if there is one, run the steps."""
    from cluster.metrics import record_step

    rcfg, seed = rl.rounds[k - 1], ctx.cfg.seed
    lagrange = O.LagrangeMultiplier(rcfg.lambda_init, rcfg.lambda_lr, threshold, rl.lambda_max, rl.lambda_window,
                                    rl.lambda_delay_steps)
    ckpts = RoundCheckpoints(ctx.out_dir / "ckpt")
    metrics_path = ctx.out_dir / "metrics.jsonl"
    sync_dir = sync_root(ctx.run_dir, ctx.name, rl.device)
    t_setup = time.perf_counter()
    roles = RoundRoles(ctx, rl, inputs, launch_prefix="", sync_dir=sync_dir)
    ctx.log(f"  actors up in {time.perf_counter() - t_setup:.1f}s: {', '.join(a.name for a in roles.plan.actors)}")
    start_step, history = 0, []
    try:
        saved = ckpts.latest()
        if saved is not None:
            ckpts.load(roles, saved)
            lagrange.load_state_dict(saved["lagrange"])
            torch.set_rng_state(torch.tensor(saved["torch_rng"], dtype=torch.uint8))
            random.setstate(tuple(saved["python_rng"][:1]) + (tuple(saved["python_rng"][1]),) + tuple(saved["python_rng"][2:]))
            start_step = saved["step"]
            history = [m for m in (json.loads(l) for l in metrics_path.read_text().splitlines()) if m["step"] <= start_step]
            roles.weights.push()
            ctx.log(f"  resumed round {k} from its checkpoint at step {start_step} (lambda {lagrange.value:.4f})")
        # Steps after the checkpoint (from an interrupted attempt) are dropped: each step once.
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in history))
        progress = Progress(ctx.log, f"safe_rlhf@{k}", steps, every_s=15)
        sampling_base = Sampling(rl.max_new_tokens, rl.temperature, rl.top_p)
        for step in range(start_step + 1, steps + 1):
            m = ppo_step(roles, rl, lagrange, pool, step, k, seed, sampling_base, ctx.log)
            m["threshold"] = threshold
            history.append(m)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            ctx.report(m)
            record_step(ctx.name, m)
            _maybe_fail(ctx.name, step)
            progress.update(step, reward=m["reward_mean"], cost=m.get("cost_mean", float("nan")),
                            lam=m.get("lambda", 0.0), unsafe=m.get("unsafe_share", float("nan")), kl=m["kl"])
            if step % rl.checkpoint_every_steps == 0 or step == steps:
                rng = random.getstate()
                ckpts.save(roles, {"step": step, "lagrange": lagrange.state_dict(), "cursor": step * rl.prompts_per_step,
                                   "torch_rng": torch.get_rng_state().tolist(),
                                   "python_rng": [rng[0], list(rng[1]), rng[2]]})
        roles.policy.export(str(ctx.out_dir / "policy"))
        summary = summarize(history)
        if "eval_prompts" in inputs:
            summary.update(evaluate_policy(roles, inputs["eval_prompts"], rl, seed))
            ctx.log(f"  round {k} policy (oracle): harmful_rate={summary['harmful_rate']}, helpfulness={summary['helpfulness']}")
    finally:
        roles.shutdown()
        shutil.rmtree(sync_dir, ignore_errors=True)
    return history, summary


def ppo_step(roles, rl, lagrange, pool, step, round_k, seed, sampling_base, log) -> dict:
    retry = lambda call: with_retry(call, roles, step, log)
    t0 = time.perf_counter()
    prompts = next_prompts(pool, (step - 1), rl.prompts_per_step, seed * 1000 + round_k)
    sampling = Sampling(sampling_base.max_new_tokens, sampling_base.temperature, sampling_base.top_p,
                        seed=seed * 100_000 + round_k * 10_000 + step)
    gen = retry(lambda: generate(roles, prompts, sampling))
    t1 = time.perf_counter()
    pad_id = 0  # any id: attention masks exclude padded positions
    seqs = SequenceBatch.from_ids(gen.prompt_ids, gen.response_ids, pad_id)
    exp = score(roles, seqs, retry)
    t2 = time.perf_counter()
    compute_advantages(exp, rl)
    mask = seqs.response_mask.float()
    lam = 0.0
    if O.uses_cost_critic(rl.algorithm):
        lagrange.observe(exp.cost)  # episode costs of this batch join the window
        lam = lagrange.step()  # log_lambda += lr * lambda * (mean(window) - threshold)
    stats = learn(roles, exp, lam, rl, torch.Generator().manual_seed(seed * 1_000_003 + round_k * 10_007 + step))
    t3 = time.perf_counter()
    t_sync = roles.weights.push()  # policy -> rollout workers (safe_rlhf.weight_sync)
    from actors.batching import pad_values

    engine_logp = pad_values(gen.logprobs)[:, :mask.shape[1]]
    n_tokens = int(mask.sum())
    m = {"step": step, "reward_mean": exp.reward.mean().item(),
         "kl": O.approx_kl(exp.old_logp, exp.ref_logp, mask),
         "response_length": mask.sum(1).mean().item(),
         "logprob_gap": O.masked_mean((engine_logp - exp.old_logp).abs(), mask).item(),
         **stats, "tokens_per_s": n_tokens / max(1e-9, t1 - t0),
         "time_generate": t1 - t0, "time_score": t2 - t1, "time_learn": t3 - t2, "time_sync": t_sync}
    if exp.cost is not None:
        m.update(cost_mean=exp.cost.mean().item(), unsafe_share=(exp.cost > 0).float().mean().item())
    if O.uses_cost_critic(rl.algorithm):
        m.update({"lambda": lam, "episode_cost": sum(lagrange.window) / len(lagrange.window)})
    return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in m.items()}


def _maybe_fail(stage: str, step: int) -> None:
    """Test hook: SAFE_RLHF_FAULT="safe_rlhf@1:5" makes the driver fail after step 5 (once per process)."""
    if os.environ.get("SAFE_RLHF_FAULT") == f"{stage}:{step}":
        raise RuntimeError(f"injected fault after step {step} of {stage}")


def evaluate_policy(roles: RoundRoles, eval_prompts: Path, rl, seed: int) -> dict:
    """The round's policy judged by the world's oracle on held-out prompts (rollout worker 0)."""
    from cluster.roles import RemoteEngine
    from stages.oracle_eval import judge_policy, read_jsonl

    metrics, _ = judge_policy(RemoteEngine(roles.rollout[0]), read_jsonl(eval_prompts), Sampling(rl.max_new_tokens, 1.0, 1.0, seed=seed + 17))
    return metrics


def summarize(history: list[dict]) -> dict:
    if not history:
        return {}
    last = history[-1]
    keys = [k for k in last if k != "step" and isinstance(last[k], (int, float))]
    out = {"steps": last["step"], **{k: last[k] for k in keys}}
    n = min(10, len(history))
    for k in ("reward_mean", "cost_mean", "unsafe_share", "lambda", "kl"):
        if k in last:
            out[f"{k}_first"] = history[0][k]
            out[f"{k}_last10"] = round(sum(h[k] for h in history[-n:]) / n, 6)
    for k in ("time_generate", "time_score", "time_learn", "time_sync", "tokens_per_s"):
        out[f"{k}_mean"] = round(sum(h[k] for h in history) / len(history), 4)
    return out


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    steps = [h["step"] for h in history]
    axes[0].plot(steps, [h["reward_mean"] for h in history], label="reward")
    if history and "cost_mean" in history[0]:
        axes[0].plot(steps, [h["cost_mean"] for h in history], label="cost")
        axes[0].axhline(history[0].get("threshold", 0), color="k", lw=0.8, ls="--", label="threshold")
    axes[0].legend()
    axes[0].set_xlabel("step")
    if history and "lambda" in history[0]:
        axes[1].plot(steps, [h["lambda"] for h in history], color="tab:purple")
        axes[1].set_title("lambda")
        axes[2].plot(steps, [h["episode_cost"] for h in history], color="tab:red")
        axes[2].set_title("episode cost (window mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
