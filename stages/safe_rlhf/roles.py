"""The round's actors, and how a step calls them.

Actors, named as the dashboard lists them: `rollout-i` (vLLM, or transformers with engine hf),
`scorer-reward-0`, `scorer-reference-0`, `scorer-cost-0`, and the DeepSpeed learner groups
`learner-policy-i`, `learner-reward_critic-i`, `learner-cost_critic-i`, all in one placement group
(resources.py); an algorithm's registration says which scorers and critics it has (grpo_lag: no
critics). They start together: the engines load while the learner groups meet. With
`safe_rlhf.layout: colocated` there are no scorer actors: each scorer is built inside its host
learner's rank 0 (resources.scorer_hosts) and called through `HostedScorer`, the same calls.

A step's independent calls go out together and are gathered once: the three scorers and the
learners' forwards in `score`, the three learner groups' updates in `train`. The results are the
same bits as one call after another (each actor's work depends only on its own inputs);
`safe_rlhf.dispatch_together: false` makes them one after another, and tests/test_round.py
compares the two. With `safe_rlhf.overlap_generation` the round starts the next step's
generation (`start_generation`) before the learners update and gathers it afterwards
(`finish_generation`); the rollout workers then still hold the weights of the step before.

Faults. A rollout worker or scorer that dies (the OOM killer, a lost node, kill -9) is restarted by
Ray (`max_actor_restarts`); the phase of the step that failed (generate, score or the weight push)
is retried in place once it is back and holds the round's models again (the launcher's
`await_restarted`: cluster/launch.py, cluster/restarts.py) and the rollout workers the current
weights. A weight transfer whose peer died fails after `weight_sync_timeout_s` and is handled the
same way. At most `max_step_retries` retries per step, then the stage fails (`resume` continues
from the last checkpoint). A learner that dies raises `ActorDied` with kind "learner": round.py
restarts the round from its last checkpoint (colocated: a host learner's death is that too).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from actors.experience import CriticMinibatch, PolicyMinibatch, SequenceBatch
from actors.learner import Learner, LearnerSettings
from actors.rollout import Generation, RolloutWorker, Sampling
from actors.scorer import Scorer
from cluster.launch import ActorDied, Launcher
from cluster.weight_sync import make_weight_sync
from core.text import same_tokenizer
from stages.common.model_actors import actor_env, engine_settings
from stages.run_config import RunConfig
from stages.safe_rlhf.resources import cpus_to_start_ahead, learner_roles, resource_plan, scorer_hosts, scorer_roles
from stages.safe_rlhf.settings import SafeRLHFConfig


class TransferFailed(Exception):
    """A weight transfer failed without an actor death of its own (its peer died mid-transfer)."""


def _split(n: int, parts: int) -> list[slice]:
    """Contiguous row ranges of a batch of n for `parts` ranks."""
    size = -(-n // parts)
    return [slice(i * size, min(n, (i + 1) * size)) for i in range(parts)]


class LearnerGroup:
    """N learners of one role as one data-parallel group, with typed methods that return refs."""

    def __init__(self, launcher: Launcher, role: str, members: list[tuple[str, tuple, dict]]):
        self.role, self.size = role, len(members)
        self.names = [name for name, _, _ in members]
        self.ranks = launcher.start_group(Learner, members)

    def forward(self, seqs: SequenceBatch) -> list:
        return [r.forward.remote(seqs.select(s)) for r, s in zip(self.ranks, _split(len(seqs), self.size))]

    def train_step(self, batch: PolicyMinibatch | CriticMinibatch) -> list:
        return [r.train_step.remote(batch.select(s)) for r, s in zip(self.ranks, _split(len(batch.seqs), self.size))]


class HostedScorer:
    """A scorer that runs inside a learner's process (`layout: colocated`), called as a Scorer actor
    is: `hosted.score.remote(batch)` is the learner's `score_with.remote(role, "score", batch)`."""

    def __init__(self, learner, role: str):
        self.learner, self.role = learner, role

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        return _HostedMethod(self.learner, self.role, method)


class _HostedMethod:
    def __init__(self, learner, role: str, method: str):
        self.learner, self.role, self.method = learner, role, method

    def remote(self, *args, **kwargs):
        return self.learner.score_with.remote(self.role, self.method, *args, **kwargs)


def actor_arguments(cfg: RunConfig, rl: SafeRLHFConfig, models: dict) -> tuple[dict, dict, dict]:
    """What a round's actors are built from, by name: (rollout {name: (args, kwargs)}, scorers
    {role: (name, args, kwargs)}, learner groups {role: [(name, args, kwargs) per rank]}).
    models: policy, reward_model, cost_model (when used); absent: none yet (`prestart`).
    With `layout: colocated` the scorers are not actors: each is built inside its host learner's
    rank 0 (the `hosted` keyword), with the arguments its actor would have had."""
    path = {k: None if models.get(k) is None else str(models[k]) for k in ("policy", "reward_model", "cost_model")}
    engine_kw = engine_settings(cfg, rl.engine, rl.max_new_tokens, weight_sync=rl.weight_sync, sleep_mode=rl.rollout_sleep)
    rollout = {f"rollout-{i}": ((rl.engine, path["policy"]), engine_kw) for i in range(rl.rollout_workers)}
    scorer_model = {"reward": path["reward_model"], "reference": path["policy"], "cost": path["cost_model"]}
    # the reference scores the tempered policy the rollouts sample from (its KL is to that policy)
    scorers = {r: (f"scorer-{r}-0", (r, scorer_model[r], rl.device, rl.precision),
                   {"logprob_chunk": rl.logprob_chunk_tokens, **({"temperature": rl.temperature} if r == "reference" else {})})
               for r in scorer_roles(rl.algorithm)}
    lr = {"policy": rl.actor_lr, "reward_critic": rl.critic_lr, "cost_critic": rl.critic_lr}
    settings = {r: LearnerSettings.from_config(rl, lr=lr[r], seed=cfg.seed) for r in lr}
    # The critics start from the reward and cost models (the paper), or from the policy where a score
    # model has its own tokenizer (reward.backbone, cost.backbone): the critics read the policy's tokens
    critic_start = {r: path[f"{r}_model"] if same_tokenizer(path[f"{r}_model"], path["policy"]) else path["policy"]
                    for r in ("reward", "cost")}
    start_model = {"policy": path["policy"], "reward_critic": critic_start["reward"], "cost_critic": critic_start["cost"]}
    # colocated: which learner hosts which scorer is the resource plan's (ActorSpec.hosts)
    guest_args = {g: scorers.pop(g)[1:] for g in scorer_hosts(rl)}
    plan = resource_plan(rl)

    def hosted(name: str) -> dict:
        guests = plan.spec(name).hosts
        return {"hosted": {g: guest_args[g] for g in guests}} if guests and path["policy"] is not None else {}

    size = rl.learners_per_role
    learners = {r: [(f"learner-{r}-{i}", (r, start_model[r], settings[r], i, size), hosted(f"learner-{r}-{i}"))
                    for i in range(size)]
                for r in learner_roles(rl.algorithm)}
    return rollout, scorers, learners


def prestart(cfg, params: dict, pool, log=print) -> list[str]:
    """Start a round's actors in the driver's pool ahead of the round, with no models (the graph's
    `prestart` of safe_rlhf@k; the driver calls it for the first round it will run, once the
    stages the round needs are running: the reward and cost fits). They are made as the round's
    Launcher would borrow them (names, threads, restart budget, environment), so the round borrows
    them and only loads its models. Only onto CPUs the fits leave free: where the fits reserve the
    whole cluster (2 cores here), the imports would only slow the fits by what they save the round.
    -> the names started."""
    import ray

    rl = cfg.safe_rlhf
    total, needed = ray.cluster_resources().get("CPU", 0.0), cpus_to_start_ahead(cfg)
    if total < needed:
        log(f"round {params['round']}'s actors start with the round: the fits before it reserve {needed - 1:g} of the "
            f"cluster's {total:g} CPUs, which leaves no whole CPU to start them ahead on")
        return []
    plan, env, restarts = resource_plan(rl), actor_env(rl), rl.max_actor_restarts
    rollout, scorers, learners = actor_arguments(cfg, rl, {})
    groups = [(RolloutWorker, [(n, a, kw)], restarts) for n, (a, kw) in rollout.items()]
    groups += [(Scorer, [member], restarts) for member in scorers.values()]
    groups += [(Learner, members, 0) for members in learners.values()]
    started = []
    for cls, members, max_restarts in groups:
        started += pool.prestart(cls, members, plan.spec(members[0][0]).cpus, max_restarts, env)
    return started


def worker_sampling(sampling: Sampling, worker: int) -> Sampling:
    """Rollout worker `worker`'s share of a step's sampling: its own seed, a function of the step's."""
    return replace(sampling, seed=sampling.seed * 131 + worker)


class RoundRoles:
    def __init__(self, cfg: RunConfig, rl: SafeRLHFConfig, inputs: dict, sync_dir: Path, *, name: str, placement=None,
                 prefix: str = "", pool=None, log=print):
        """The round `name`'s actors for `rl` (cfg: the run's config; inputs: the models), made in
        `placement` ((placement group, first bundle), e.g. a Tune trial's; None: their own), named
        with `prefix`, borrowed from and returned to the driver's actor `pool` when given."""
        self.rl, self.log = rl, log
        self.plan = resource_plan(rl)
        env = actor_env(rl)
        # A baseline round may run beside round 1 (on a machine with the CPUs for both): its actors
        # need names of their own, and it keeps none (nothing after it has their names).
        baseline = name.startswith("baseline_")
        prefix = prefix or (f"{name}:" if baseline else "")
        self.launcher = Launcher(self.plan, env, name=f"round-{name}", log=log, placement=placement,
                                 prefix=prefix, pool=None if baseline else pool)
        self.retries = 0  # in-place retries in this round (reported)
        # Which policy step's weights the learners and the rollout workers hold (0: the round's
        # start). The round sets policy_step after each update; a push or a recovery copies it.
        self.policy_step = self.rollout_step = 0
        try:
            self._start(cfg, rl, inputs, sync_dir)
        except BaseException:
            self.launcher.shutdown()
            raise

    def _start(self, cfg, rl: SafeRLHFConfig, inputs: dict, sync_dir: Path) -> None:
        start = self.launcher.start
        restarts = rl.max_actor_restarts  # rollout workers and scorers come back; learners do not
        rollout, scorers, learners = actor_arguments(cfg, rl, inputs)
        self.rollout_names = list(rollout)
        self.rollout = [start(RolloutWorker, n, *a, max_restarts=restarts, env=self.plan.worker_env(n, self.launcher.offset),
                              **kw) for n, (a, kw) in rollout.items()]
        # scorer actors (split layout); a colocated round's scorers run in their host learners
        self.scorer_actors = {r: start(Scorer, n, *a, max_restarts=restarts, **kw) for r, (n, a, kw) in scorers.items()}
        self.learners = {r: LearnerGroup(self.launcher, r, members) for r, members in learners.items()}
        self.scorer = {**self.scorer_actors, **{g: HostedScorer(handle, g) for r, members in learners.items()
                                                for handle, (_, _, kw) in zip(self.learners[r].ranks, members)
                                                for g in kw.get("hosted", {})}}
        self._get(list(self.launcher.take_resets().values()))  # actors kept from the last stage load this round's models
        # Every learner group's rendezvous (rank 0's address first), and every engine's start-up, together.
        t0 = time.perf_counter()
        masters = self._get([g.ranks[0].master_address.remote() for g in self.learners.values()])
        calls = {n: r.setup.remote(*m) for g, m in zip(self.learners.values(), masters) for r, n in zip(g.ranks, g.names)}
        calls.update({n: a.ready.remote() for n, a in zip(self.restartable_names, self.restartable)})
        self.ready_s = self.launcher.gather_timed(calls, t0)  # {actor: seconds until it was up}, in the round's log
        t1 = time.perf_counter()
        self.weights = make_weight_sync(rl.weight_sync, self.policy.ranks, self.rollout, sync_dir,
                                        timeout_s=rl.weight_sync_timeout_s)
        self._get_weights(self.weights.connect)
        self.ready_s["weight_sync"] = round(time.perf_counter() - t1, 1)

    @property
    def policy(self) -> LearnerGroup:
        return self.learners["policy"]

    @property
    def restartable(self) -> list:
        return self.rollout + list(self.scorer_actors.values())

    @property
    def restartable_names(self) -> list[str]:
        return self.rollout_names + [f"scorer-{r}-0" for r in self.scorer_actors]

    # ------------------------------------------------------------------ calling actors
    def _get(self, refs: list):
        return self.launcher.get(refs)

    def _get_weights(self, call):
        """A weight-sync call (connect, push, reconnect), its failures named."""
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return call()
        except RayActorError as err:
            raise self.launcher.died(err.actor_id, err) from err
        except RayTaskError as err:
            raise TransferFailed(f"weight transfer failed: {str(err).splitlines()[0][:200]}") from err

    def _in_place(self, phase: str, step: int, call):
        """Run `call`; when a rollout worker or scorer died (or a transfer lost its peer), wait for Ray
        to restart it, give the rollout workers the current weights again and retry the same call."""
        for attempt in range(self.rl.max_step_retries + 1):
            try:
                if attempt:
                    self._recover()
                return call()
            except (ActorDied, TransferFailed) as err:
                if isinstance(err, ActorDied) and err.kind == "learner":
                    raise
                if attempt == self.rl.max_step_retries:
                    raise RuntimeError(f"{err} during {phase} of step {step}, and {attempt} retries in place did not "
                                       "recover; resume continues from the last checkpoint") from err
                self.retries += 1
                self.log(f"  {err} during {phase} of step {step}: retrying {phase} in place once Ray has restarted it "
                         f"(retry {attempt + 1} of {self.rl.max_step_retries})")

    def _recover(self, timeout_s: float = 600.0) -> None:
        """Wait until every rollout worker and scorer answers again, holding this round's models,
        then re-form the weight transfer and push the current weights."""
        self.launcher.await_restarted(self.restartable_names, timeout_s)
        self._get_weights(self.weights.reconnect)
        # reconnect pushes the learners' current weights once any were pushed; before that the
        # restarted workers hold the round's starting weights
        self.rollout_step = self.policy_step if self.weights.pushes else 0

    # ------------------------------------------------------------------ the step's calls
    def generate(self, prompts: list[str], sampling: Sampling, step: int) -> tuple[Generation, int]:
        """The rollouts of `prompts` -> (generation, the policy step whose weights sampled it)."""
        return self.finish_generation(self.start_generation(prompts, sampling), step)

    def start_generation(self, prompts: list[str], sampling: Sampling) -> dict:
        """Dispatch the prompts to the rollout workers (worker i: every n-th prompt, its own seed)
        without waiting; `finish_generation` gathers them."""
        n = len(self.rollout)
        parts = [prompts[i::n] for i in range(n)]
        return {"parts": parts, "sampling": sampling, "refs": self._dispatch(parts, sampling),
                "weights_step": self.rollout_step}

    def _dispatch(self, parts: list[list[str]], sampling: Sampling) -> list:
        return [w.generate.remote(p, worker_sampling(sampling, i)) for i, (w, p) in enumerate(zip(self.rollout, parts))]

    def finish_generation(self, pending: dict, step: int) -> tuple[Generation, int]:
        """Gather a started generation, merged in prompt order -> (generation, weights step). A worker
        that died is retried in place; the retry samples from the weights the recovery pushed."""
        parts, sampling = pending["parts"], pending["sampling"]
        refs, weights_step = pending["refs"], pending["weights_step"]

        def call():
            nonlocal refs, weights_step
            if refs is None:  # a retry: dispatched again, to workers that now hold rollout_step's weights
                refs, weights_step = self._dispatch(parts, sampling), self.rollout_step
            try:
                return self._get(refs)
            finally:
                refs = None

        gens = self._in_place("generate", step, call)
        if self.rl.rollout_sleep:  # its GPU memory to the learner until the push (or a generation) wakes it
            self._in_place("rollout sleep", step, lambda: self._get([w.sleep.remote() for w in self.rollout]))
        n = len(self.rollout)
        order = [(i, j) for j in range(max(len(p) for p in parts)) for i in range(n) if j < len(parts[i])]
        pick = lambda field: [getattr(gens[i], field)[j] for i, j in order]
        gen = Generation(pick("prompt_ids"), pick("response_ids"), pick("texts"), pick("logprobs"), gens[0].eos_token_id,
                         gens[0].stop_token_ids)
        return gen, weights_step

    def _gather(self, calls: dict) -> dict:
        """{key: () -> [refs]} -> {key: [results]}. Together (the default): every call dispatched,
        then one gather. One by one (`dispatch_together: false`): each call's results before the
        next is dispatched, in the dict's order."""
        if self.rl.dispatch_together:
            refs = {key: make() for key, make in calls.items()}
            flat = self._get([r for rs in refs.values() for r in rs])
            out, i = {}, 0
            for key, rs in refs.items():
                out[key] = flat[i:i + len(rs)]
                i += len(rs)
            return out
        return {key: self._get(make()) for key, make in calls.items()}

    def score(self, seqs: SequenceBatch, scored: SequenceBatch, step: int, texts: dict | None = None,
              text_scored: tuple = (), categories: bool = False) -> dict[str, torch.Tensor | None]:
        """Reference logprobs, reward and cost end scores (of `scored`: the answers as the models were
        trained, ending with EOS), policy logprobs and critic values, all dispatched together:
        {"ref_logp", "reward", "cost", "old_logp", "reward_values", "cost_values"}. The roles in
        `text_scored` (a score model with its own tokenizer) score `texts` (Scorer.score_conversations's
        arguments) instead of the policy's token ids. categories (constraints per_category): also
        "constraint_costs" [B, 1 + K], the shared cost then each category head's, from the same pass."""
        def end_scores(role, **kw):
            if role in text_scored:
                return lambda: [self.scorer[role].score_conversations.remote(**texts, **kw)]
            return lambda: [self.scorer[role].score.remote(scored, **kw)]

        def call():
            calls = {"ref_logp": lambda: [self.scorer["reference"].logprobs.remote(seqs)], "reward": end_scores("reward")}
            if "cost" in self.scorer:
                calls["cost"] = end_scores("cost", **({"categories": True} if categories else {}))
            calls["old_logp"] = lambda: self.policy.forward(seqs)
            if "reward_critic" in self.learners:
                calls["reward_values"] = lambda: self.learners["reward_critic"].forward(seqs)
            if "cost_critic" in self.learners:
                calls["cost_values"] = lambda: self.learners["cost_critic"].forward(seqs)
            return {key: torch.cat(parts) for key, parts in self._gather(calls).items()}

        out = self._in_place("score", step, call)
        if categories:
            out["constraint_costs"] = out["cost"]
            out["cost"] = out["constraint_costs"][:, 0]
        for key in ("cost", "reward_values", "cost_values"):  # None where the algorithm has no such scorer or critic
            out.setdefault(key, None)
        return out

    def score_texts(self, role: str, prompts: list[str], answers: list[str], max_prompt_tokens: int,
                    max_answer_tokens: int, categories: bool = False) -> list:
        """End scores of (prompt, answer) texts by the round's reward or cost scorer (threshold auto);
        categories: [shared, each category head's] per answer."""
        kw = {"categories": True} if categories else {}
        return self._in_place("reference scoring", 0, lambda: self._get(
            [self.scorer[role].score_texts.remote(prompts, answers, max_prompt_tokens, max_answer_tokens, **kw)])[0])

    def train(self, batches: dict[str, PolicyMinibatch | CriticMinibatch]) -> dict[str, float]:
        """One minibatch update of each learner group ({role: minibatch}), the groups together;
        each group's stats averaged over its ranks."""
        results = self._gather({role: (lambda role=role, b=b: self.learners[role].train_step(b))
                                for role, b in batches.items()})
        stats = {}
        for part in results.values():
            stats.update({k: sum(s[k] for s in part) / len(part) for k in part[0]})
        return stats

    def push_weights(self, step: int) -> float:
        """The policy's current weights to every rollout worker (safe_rlhf.weight_sync); seconds."""
        seconds = self._in_place("weight push", step, lambda: self._get_weights(self.weights.push))
        self.rollout_step = self.policy_step
        return seconds

    # ------------------------------------------------------------------ checkpoints and export
    def save_checkpoint(self, root: Path, tag: str) -> None:
        self._get([r.save_checkpoint.remote(str(root / role), tag) for role, g in self.learners.items() for r in g.ranks])

    def load_checkpoint(self, root: Path, tag: str) -> None:
        self._get([r.load_checkpoint.remote(str(root / role), tag) for role, g in self.learners.items() for r in g.ranks])

    def export_policy(self, out_dir: Path) -> None:
        self._get([r.export.remote(str(out_dir)) for r in self.policy.ranks])

    def shutdown(self, keep: bool = False) -> None:
        """Kill the round's actors, or (keep: the round succeeded) park them in the driver's actor
        pool, if it has one, for the next stage."""
        try:
            self.weights.close()
        finally:
            self.launcher.shutdown(keep=keep)
