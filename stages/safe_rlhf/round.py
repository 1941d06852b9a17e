"""The `safe_rlhf@k` stage: one round of PPO-Lagrangian (Safe RLHF, arXiv 2310.12773, Sec. 3.3).

Each step, as the algorithm reads (`ppo_step`):

    prompts     the step's prompts: seeded permutations of the training prompts, a function of the step
    generate    rollout workers sample answers (vLLM or hf)                         roles.generate
    score       reference logprobs, reward and cost end scores, policy logprobs,
                critic values                                                       roles.score
    advantages  KL-shaped per-token rewards and costs, GAE on each critic           objectives
    lambda      log_lambda += lr * lambda * (mean episode cost - threshold)         objectives
    learn       PPO epochs over minibatches: policy, reward critic, cost critic      roles.train
    sync        the policy's weights to the rollout workers                         roles.push_weights

That is ppo_lag; the other algorithms differ by their registration (objectives.ALGORITHMS), e.g.
grpo_lag: group_size answers per prompt, returns normalised within each group, no critics.

With `overlap_generation`, step t+1's rollouts are generated while step t scores and learns, by
the rollout workers' weights of step t-1 (one step stale, logged as `rollout_staleness`); the PPO
ratio and the KL then take the sampling engine's own log-probabilities as the behaviour policy's.

The roles are Ray actors (roles.py). Every `checkpoint_every_steps` the learners and the multiplier
are saved (checkpoints.py); an interrupted round resumes from the last checkpoint on the same
trajectory (with overlap, the checkpoint also holds the next step's rollouts, already generated
by then). A learner that dies restarts the round from its last checkpoint (`max_round_restarts`
times); rollout workers and scorers are retried in place (roles.py).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch

from actors.experience import CriticMinibatch, PolicyMinibatch, SequenceBatch, pad_values
from actors.rollout import Generation, Sampling
from cluster.launch import ActorDied
from cluster.metrics import record_step
from core import objectives as O
from core.files import read_jsonl
from stages.base import Progress, StageResult
from stages.safe_rlhf.checkpoints import RoundCheckpoints
from stages.safe_rlhf.plots import training_curves
from stages.safe_rlhf.roles import RoundRoles
from stages.safe_rlhf.settings import SafeRLHFConfig
from stages.safe_rlhf.setup import RoundPlace, RoundSetup, reference_answers, step_prompts


# ---------------------------------------------------------------------- one step
@dataclass
class Experience:
    seqs: SequenceBatch
    old_logp: torch.Tensor  # [B, T] policy logprobs at rollout time
    ref_logp: torch.Tensor  # [B, T] reference policy logprobs
    reward: torch.Tensor  # [B] reward model end scores
    cost: torch.Tensor | None  # [B] cost model end scores
    reward_values: torch.Tensor | None  # [B, T]; None without a reward critic
    cost_values: torch.Tensor | None  # [B, T]; None without a cost critic
    constraint_costs: torch.Tensor | None = None  # [B, 1 + K] per_category: shared cost, then each category's
    reward_advantages: torch.Tensor | None = None
    reward_returns: torch.Tensor | None = None
    cost_advantages: torch.Tensor | None = None
    cost_returns: torch.Tensor | None = None


def advantage_settings(rl: SafeRLHFConfig) -> O.AdvantageSettings:
    return O.AdvantageSettings(kl_coeff=rl.kl_coeff, clip_score=rl.clip_score, gamma=rl.gamma, gae_lambda=rl.gae_lambda,
                               shaping_nu=rl.shaping_nu, group_size=rl.group_size,
                               group_scale=rl.group_scale)


def step_scores(exp: Experience) -> O.StepScores:
    return O.StepScores(exp.reward, exp.cost, exp.old_logp, exp.ref_logp, exp.seqs.response_mask.float(),
                        exp.reward_values, exp.cost_values)


def set_advantages(exp: Experience, adv: O.Advantages) -> None:
    exp.reward_advantages, exp.reward_returns = adv.reward, adv.reward_returns
    exp.cost_advantages, exp.cost_returns = adv.cost, adv.cost_returns


def compute_advantages(exp: Experience, rl: SafeRLHFConfig) -> None:
    """The algorithm's advantages (ppo_lag: KL-shaped per-token rewards and costs, then GAE on each
    critic, paper Sec. 3.3; grpo_lag: group-normalised returns)."""
    set_advantages(exp, O.get_algorithm(rl.algorithm).advantages(step_scores(exp), advantage_settings(rl)))


def multipliers_and_advantages(exp: Experience, rl: SafeRLHFConfig,
                               lagrange: O.LagrangeMultiplier | O.CategoryMultipliers) -> float:
    """Update lambda on the step's episode costs and set the advantages -> the policy loss's lambda.
    One constraint: advantages, then lambda (neither reads the other). per_category: each
    constraint's lambda first, since the cost advantage is their weighted sum; the loss's lambda is
    the lambdas' sum (Algorithm.constrained_advantages)."""
    algorithm = O.get_algorithm(rl.algorithm)
    if exp.constraint_costs is None:
        compute_advantages(exp, rl)
        return algorithm.update_multiplier(lagrange, exp.cost)  # log_lambda += lr * lambda * (mean(window) - threshold)
    lambdas = algorithm.update_multiplier(lagrange, exp.constraint_costs)  # [K], each on its own column
    adv, lam = algorithm.constrained_advantages(step_scores(exp), exp.constraint_costs, lambdas, advantage_settings(rl),
                                                rl.lambda_max)
    set_advantages(exp, adv)
    return lam


def learn(roles: RoundRoles, exp: Experience, lagrange_lambda: float, rl: SafeRLHFConfig, generator: torch.Generator) -> dict:
    """PPO epochs over shuffled minibatches; each minibatch updates the policy and the critics together."""
    stats: dict[str, list[float]] = {}
    for _ in range(rl.ppo_epochs):
        order = torch.randperm(len(exp.seqs), generator=generator)
        for rows in order.chunk(rl.minibatches):
            seqs = exp.seqs.select(rows)
            batches = {"policy": PolicyMinibatch(seqs, exp.old_logp[rows], exp.reward_advantages[rows],
                                                 exp.cost_advantages[rows] if exp.cost_advantages is not None else None,
                                                 lagrange_lambda)}
            if exp.reward_values is not None:
                batches["reward_critic"] = CriticMinibatch(seqs, exp.reward_values[rows], exp.reward_returns[rows])
            if exp.cost_values is not None:
                batches["cost_critic"] = CriticMinibatch(seqs, exp.cost_values[rows], exp.cost_returns[rows])
            for k, v in roles.train(batches).items():
                stats.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in stats.items()}


@dataclass
class Rollout:
    """A step's rollouts: what the engine sampled, the policy step whose weights sampled it (0: the
    round's start) and the seconds from dispatch until they were gathered."""
    gen: Generation
    weights_step: int
    seconds: float

    def state_dict(self) -> dict:  # JSON: Python floats round-trip exactly
        return {"gen": asdict(self.gen), "weights_step": self.weights_step, "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: dict) -> "Rollout":
        return cls(Generation(**state["gen"]), state["weights_step"], state["seconds"])


def step_inputs(setup: RoundSetup, step: int, seed: int) -> tuple[list[str], Sampling]:
    """Step `step`'s prompts and sampling (1-based): functions of the step alone. prompts_per_step
    answers: as many prompts, or (grpo_lag) prompts_per_step / group_size prompts, each repeated
    group_size times in consecutive rows (one group)."""
    rl, k = setup.rl, setup.round
    g = O.get_algorithm(rl.algorithm).answers_per_prompt(rl.group_size)
    prompts = [p for p in step_prompts(setup.pool, step - 1, rl.prompts_per_step // g, seed * 1000 + k) for _ in range(g)]
    return prompts, Sampling(rl.max_new_tokens, rl.temperature, rl.top_p, seed=seed * 100_000 + k * 10_000 + step)


def score_rollouts(roles: RoundRoles, setup: RoundSetup, gen: Generation, step: int, seed: int) -> tuple:
    """The step's rollouts scored by every scorer and critic -> (sequences, scores, which answers
    were cut at max_new_tokens)."""
    seqs = SequenceBatch.from_ids(gen.prompt_ids, gen.response_ids, pad_id=0)  # any id: masks exclude padding
    # The reward and cost models were trained on answers that end with EOS: an answer cut at
    # max_new_tokens is scored with EOS appended (the policy's tokens stay as sampled).
    eos = gen.eos_token_id
    cut = [not gen.ended(r) for r in gen.response_ids]
    scored = SequenceBatch.from_ids(gen.prompt_ids, [r + [eos] if c else r for r, c in zip(gen.response_ids, cut)], pad_id=0)
    texts = None
    if setup.text_scored:  # the rows' prompts are step_inputs' (a function of the step), in order
        asked = [setup.turns[p] for p in step_inputs(setup, step, seed)[0]]
        texts = {"prompts": [p for p, _ in asked], "answers": gen.texts, "contexts": [c for _, c in asked],
                 "max_prompt_tokens": setup.max_prompt_tokens, "max_answer_tokens": setup.max_answer_tokens}
    return seqs, roles.score(seqs, scored, step, texts, setup.text_scored, categories=bool(setup.constraints)), cut


def cost_metrics(exp: Experience, setup: RoundSetup, lagrange, lam: float) -> dict:
    """A step's figures on cost and the multipliers, as the algorithm has them."""
    rl, m = setup.rl, {}
    algorithm = O.get_algorithm(rl.algorithm)
    if exp.cost is not None:
        m.update(cost_mean=exp.cost.mean().item(), unsafe_share=(exp.cost > 0).float().mean().item())
    if algorithm.group_sampling:  # a group whose answers all score alike has no advantage: it teaches nothing
        m["reward_group_std"] = exp.reward.view(-1, rl.group_size).std(-1, correction=0).mean().item()
    if setup.constraints:  # lambda: the loss's, the sum; episode_cost: the shared constraint's J_c
        means = lagrange.window_means()
        m.update({"lambda": lam, "episode_cost": means[0]})
        for name, value, mean, costs in zip(setup.constraints, lagrange.values.tolist(), means, exp.constraint_costs.T):
            m.update({f"lambda_{name}": value, f"episode_cost_{name}": mean, f"cost_mean_{name}": costs.mean().item()})
    elif algorithm.constrained:
        m.update({"lambda": lagrange.value, "episode_cost": lagrange.window_mean()})
    return m


def ppo_step(roles: RoundRoles, setup: RoundSetup, lagrange: O.LagrangeMultiplier | O.CategoryMultipliers, step: int, seed: int,
             rollout: Rollout | None = None) -> tuple[dict, Rollout | None]:
    """One step -> (metrics, the next step's rollouts when overlap_generation generated them here).
    `rollout`: this step's rollouts, when the previous step generated them."""
    rl = setup.rl
    t0 = time.perf_counter()
    if rollout is None:
        gen, weights_step = roles.generate(*step_inputs(setup, step, seed), step)
        rollout = Rollout(gen, weights_step, time.perf_counter() - t0)
    gen = rollout.gen
    t1 = time.perf_counter()
    # Overlap: the next step's rollouts start now, from the weights the rollout workers hold.
    pending = None
    if rl.overlap_generation and step < setup.steps:
        pending = roles.start_generation(*step_inputs(setup, step + 1, seed))
    seqs, scores, cut = score_rollouts(roles, setup, gen, step, seed)
    learner_logp = scores["old_logp"]  # the learner's current policy
    engine_logp = pad_values(gen.logprobs)[:, :seqs.response_mask.shape[1]]
    if rl.overlap_generation:  # the behaviour policy is the one that sampled: the engine's weights
        scores["old_logp"] = engine_logp
    exp = Experience(seqs=seqs, **scores)
    t2 = time.perf_counter()
    lam = multipliers_and_advantages(exp, rl, lagrange)
    stats = learn(roles, exp, lam, rl, torch.Generator().manual_seed(seed * 1_000_003 + setup.round * 10_007 + step))
    roles.policy_step = step
    t3 = time.perf_counter()
    following = None
    if pending is not None:  # the workers must finish sampling before their weights change
        next_gen, next_weights = roles.finish_generation(pending, step + 1)
        following = Rollout(next_gen, next_weights, time.perf_counter() - t1)
    t4 = time.perf_counter()
    t_sync = roles.push_weights(step)  # policy -> rollout workers (safe_rlhf.weight_sync)
    mask = seqs.response_mask.float()
    m = {"step": step, "reward_mean": exp.reward.mean().item(),
         "kl": O.approx_kl(exp.old_logp, exp.ref_logp, mask),
         "response_length": mask.sum(1).mean().item(),
         # the engine's logprobs of its own samples against the learner's current policy: numerical
         # noise when the workers hold the learner's weights, one update's drift under overlap
         "logprob_gap": O.masked_mean((engine_logp - learner_logp).abs(), mask).item(),
         # policy updates between the weights that sampled this step's rollouts and the ones they train
         "rollout_staleness": step - 1 - rollout.weights_step,
         **stats, "tokens_per_s": int(mask.sum()) / max(1e-9, rollout.seconds),
         # seconds the step waited on generation (its own without overlap, the next step's with it)
         "time_generate": (t1 - t0) + (t4 - t3), "time_score": t2 - t1, "time_learn": t3 - t2, "time_sync": t_sync,
         "time_step": time.perf_counter() - t0, "truncated_share": sum(cut) / len(cut)}
    m.update(cost_metrics(exp, setup, lagrange, lam))
    return {key: (float(f"{v:.6g}") if isinstance(v, float) else v) for key, v in m.items()}, following


# ---------------------------------------------------------------------- the round
def train_round(place: RoundPlace, setup: RoundSetup) -> tuple[list[dict], dict]:
    """Start the roles, continue from the last checkpoint if there is one, run the steps, export
    the policy to out_dir/policy. -> (per-step metrics, summary)."""
    rl, k, seed = setup.rl, setup.round, place.cfg.seed
    ckpts = RoundCheckpoints(place.out_dir / "ckpt")
    metrics_path = place.out_dir / "metrics.jsonl"
    t_setup = time.perf_counter()
    roles = RoundRoles(place.cfg, rl, setup.inputs, place.sync_dir, name=place.name, placement=place.placement,
                       prefix=place.prefix, pool=place.pool, log=place.log)
    time_setup = time.perf_counter() - t_setup
    ahead = roles.launcher.ahead
    kept = [n for n in roles.launcher.reused if n not in ahead]
    origin = ([f"{len(kept)} kept from the last stage"] if kept else []) + ([f"{len(ahead)} started ahead"] if ahead else [])
    place.log(f"  actors up in {time_setup:.1f}s" + (f" ({', '.join(origin)})" if origin else "") + ": "
            + ", ".join(f"{n} {t:.0f}s" for n, t in roles.ready_s.items()))
    finished = False
    try:
        threshold = round_threshold(roles, setup)
        place.log(f"  threshold {threshold['threshold']:.4f}: {threshold['threshold_rule']}")
        lagrange = round_multipliers(setup, threshold)
        start_step, history, rollout = 0, [], None
        saved = ckpts.latest()
        if saved is not None:
            ckpts.load(roles, saved)
            lagrange.load_state_dict(saved["lagrange"])
            start_step = saved["step"]
            history = [m for m in read_jsonl(metrics_path) if m["step"] <= start_step]
            roles.policy_step = start_step
            roles.push_weights(start_step)
            if rl.overlap_generation and saved.get("next_rollout"):
                rollout = Rollout.from_state(saved["next_rollout"])  # generated before the interruption
            place.log(f"  resumed round {k} from its checkpoint at step {start_step} (lambda {lagrange.value:.4f}"
                    + (f", the sum of {len(setup.constraints)} constraints)" if setup.constraints else ")"))
        # Steps after the checkpoint (from an interrupted attempt) are dropped: each step once.
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in history))
        progress = Progress(place.log, "step", setup.steps, every_s=15)
        for step in range(start_step + 1, setup.steps + 1):
            m, rollout = ppo_step(roles, setup, lagrange, step, seed, rollout)
            m["threshold"] = lagrange.threshold
            history.append(m)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            place.report(m)
            record_step(place.name, m)
            progress.update(step, reward=m["reward_mean"], cost=m.get("cost_mean", float("nan")),
                            lam=m.get("lambda", 0.0), unsafe=m.get("unsafe_share", float("nan")), kl=m["kl"])
            if step % rl.checkpoint_every_steps == 0 or step == setup.steps:
                ckpts.save(roles, {"step": step, "lagrange": lagrange.state_dict(),
                                   "next_rollout": rollout.state_dict() if rollout is not None else None})
        roles.export_policy(place.out_dir / "policy")
        summary = {**summarize(history), **threshold, "time_setup": round(time_setup, 2), "actors_kept": len(kept),
                   "actors_started_ahead": len(ahead),
                   "retries_in_place": roles.retries}
        finished = True
    finally:
        roles.shutdown(keep=finished)  # parked for the next stage (safe_rlhf.keep_actors) only when it went well
    return history, summary


def round_multipliers(setup: RoundSetup, threshold: dict):
    """The round's Lagrange multiplier, or under constraints per_category one per constraint."""
    rl, rcfg = setup.rl, setup.rl.rounds[setup.round - 1]
    kw = dict(init=rcfg.lambda_init, lr=rcfg.lambda_lr, max_value=rl.lambda_max, window=rl.lambda_window,
              delay_steps=rl.lambda_delay_steps)
    if setup.constraints:
        return O.CategoryMultipliers(setup.constraints, thresholds=[threshold[f"threshold_{c}"] for c in setup.constraints], **kw)
    return O.LagrangeMultiplier(threshold=threshold["threshold"], **kw)


def round_threshold(roles: RoundRoles, setup: RoundSetup) -> dict:
    """The round's cost threshold d and how it was derived (reported with the round's metrics);
    under constraints per_category also each constraint's, `threshold_<name>`."""
    rl, k = setup.rl, setup.round
    if setup.threshold is not None:
        rule = "set in the config" if O.get_algorithm(rl.algorithm).constrained else f"none ({rl.algorithm} has no cost constraint)"
        each = {f"threshold_{c}": setup.threshold for c in setup.constraints}  # per_category: the same d for each
        return {"threshold": setup.threshold, **each, "threshold_rule": rule + (" (each constraint)" if each else "")}
    u = rl.unsafe_share(k)
    if setup.constraints:
        return category_thresholds(roles, setup, u)
    prompts, answers, safe, _ = reference_answers(setup.inputs["reference"])
    costs = roles.score_texts("cost", prompts, answers, setup.max_prompt_tokens, setup.max_answer_tokens)
    d, safe_mean, unsafe_mean = O.auto_threshold(costs, safe, u)
    return {"threshold": d, "threshold_unsafe_share": u, "reference_safe_cost_mean": round(safe_mean, 4),
            "reference_unsafe_cost_mean": round(unsafe_mean, 4), "reference_answers": len(costs),
            "threshold_rule": (f"auto: the mean cost of a policy unsafe {u:.3g} of the time, (1-u) x {safe_mean:.3f} + "
                               f"u x {unsafe_mean:.3f}, on {len(costs)} fixed reference answers ({sum(safe)} safe) "
                               "scored by this round's cost model")}


def category_thresholds(roles: RoundRoles, setup: RoundSetup, u: float) -> dict:
    """threshold auto under constraints per_category: the rule on each constraint's own head, with
    the reference answers harmful in its category as the unsafe ones (objectives.auto_constraint_thresholds)."""
    prompts, answers, safe, categories = reference_answers(setup.inputs["reference"])
    costs = roles.score_texts("cost", prompts, answers, setup.max_prompt_tokens, setup.max_answer_tokens, categories=True)
    harmful = [[not s] + [c in cats for c in setup.constraints[1:]] for s, cats in zip(safe, categories)]
    found = O.auto_constraint_thresholds(costs, safe, harmful, u)
    out = {"threshold": found[0][0], "threshold_unsafe_share": u, "reference_answers": len(costs)}
    for name, (d, _, _, n) in zip(setup.constraints, found):
        out.update({f"threshold_{name}": d, f"reference_harmful_{name}": n})
    none = [c for c, (_, _, _, n) in zip(setup.constraints, found) if n == 0]
    out["threshold_rule"] = (f"auto per constraint: on each head, the mean cost of a policy harmful in its category "
                             f"{u:.3g} of the time, {len(costs)} fixed reference answers ({sum(safe)} safe) scored by "
                             "this round's cost model" + (f" ({', '.join(none)}: none harmful in it, so all unsafe answers)"
                                                          if none else ""))
    return out


def summarize(history: list[dict]) -> dict:
    if not history:
        return {}
    last = history[-1]
    keys = [k for k in last if k != "step" and isinstance(last[k], (int, float))]
    out = {"steps": last["step"], **{k: last[k] for k in keys}}
    n = min(10, len(history))
    for k in ("reward_mean", "cost_mean", "unsafe_share", "lambda", "kl", "truncated_share"):
        if k in last:
            out[f"{k}_first"] = history[0][k]
            out[f"{k}_last10"] = round(sum(h[k] for h in history[-n:]) / n, 6)
    for k in ("time_generate", "time_score", "time_learn", "time_sync", "time_step", "tokens_per_s", "rollout_staleness"):
        out[f"{k}_mean"] = round(sum(h[k] for h in history) / len(history), 4)
    return out


def run(ctx) -> StageResult:
    setup = RoundSetup.from_context(ctx)
    rl, k = setup.rl, setup.round
    rcfg = rl.rounds[k - 1]
    ctx.log(f"  round {k}: {rl.algorithm}, {setup.steps} steps x {rl.prompts_per_step} prompts ({len(setup.pool)} distinct), "
            f"engine {rl.engine}, lambda_init {rcfg.lambda_init}, lambda_lr {rcfg.lambda_lr}")
    restarts = 0
    while True:
        try:
            history, summary = train_round(RoundPlace.from_context(ctx), setup)
            break
        except ActorDied as err:
            if err.kind != "learner" or restarts >= rl.max_round_restarts:
                raise
            restarts += 1
            ctx.log(f"  {err}; restarting round {k} from its last checkpoint "
                    f"(restart {restarts} of {rl.max_round_restarts})")
    training_curves(history, ctx.out_dir / "training.png")
    return StageResult({"policy": "policy", "metrics": "metrics.jsonl", "plot": "training.png"},
                       {**summary, "round_restarts": restarts})
