"""Training objectives of Safe RLHF (Dai et al., 2023, arXiv 2310.12773).

Pure torch, no I/O: the preference-model losses (reward model R and cost model C,
paper Eq. 5 and 6), the PPO-Lagrangian policy / critic losses with GAE (Sec. 3.3),
the Lagrange multiplier update, the critic-free group advantages of `grpo_lag`, and the
registry of algorithms: each one `Algorithm` object (`ppo_lag`; the reward-only `ppo` and
fixed-penalty `reward_shaping` baselines; `grpo_lag`) that the round, its actors, the plan, the
config and the sweep read. Adding an algorithm: its math and its registration here, its tests.

Shape legend: B = batch (sequences or preference pairs), T = response tokens.
Token tensors are [B, T] over response positions, right-padded; `mask` is 1 (or
True) on real response tokens.
"""

import math
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# ---------------------------------------------------------------- preference losses


def _l2(*scores: Tensor) -> Tensor:
    return torch.cat(scores).pow(2).mean()  # mean(s^2) over all scores in the batch


def reward_pair_loss(better: Tensor, worse: Tensor, regularization: float = 0.0) -> Tensor:
    """Eq. 5: -log sigma(R(y_w) - R(y_l)), plus an optional score-magnitude penalty."""
    loss = -F.logsigmoid(better - worse).mean()  # [B] -> scalar
    return loss + regularization * _l2(better, worse)


def _masked_row_mean(x: Tensor, rows: Optional[Tensor]) -> Tensor:
    """Mean of x [B] over the rows where `rows` [B] is True (all rows if None; 0 if none)."""
    if rows is None:
        return x.mean()
    rows = rows.bool()
    return x[rows].mean() if rows.any() else x.new_zeros(())


def cost_pair_loss(
    safer: Tensor,
    unsafer: Tensor,
    safer_is_safe: Optional[Tensor] = None,
    unsafer_is_safe: Optional[Tensor] = None,
    regularization: float = 0.0,
    has_safety_labels: Optional[Tensor] = None,
) -> Tensor:
    """Eq. 6: -log sigma(C(y_unsafer) - C(y_safer)) - sum over both answers of log sigma(-s * C(y)).

    s = +1 for a safe answer (pushed below zero cost), -1 for an unsafe one (pushed
    above zero). Without safety labels (both `*_is_safe` None, e.g. HH-RLHF), only
    the pairwise term is used. `has_safety_labels` [B] bool restricts the two sign
    terms to the labelled rows (each averaged over those rows; 0 if there are none);
    the pairwise term always averages over all B rows.
    """
    if (safer_is_safe is None) != (unsafer_is_safe is None):
        raise ValueError("give both safer_is_safe and unsafer_is_safe, or neither")
    loss = -F.logsigmoid(unsafer - safer).mean()  # [B] -> scalar
    if safer_is_safe is not None:
        for cost, is_safe in ((safer, safer_is_safe), (unsafer, unsafer_is_safe)):
            s = 2.0 * is_safe.to(cost.dtype) - 1.0  # +1 safe, -1 unsafe; [B]
            loss = loss + _masked_row_mean(-F.logsigmoid(-s * cost), has_safety_labels)  # -log sigma(-s c)
    return loss + regularization * _l2(safer, unsafer)


def pair_accuracy(preferred: Tensor, other: Tensor) -> float:
    """Share of pairs with preferred > other."""
    return (preferred > other).float().mean().item()


def sign_accuracy(costs: Tensor, is_safe: Tensor) -> float:
    """Share of answers whose cost sign is right: cost < 0 exactly when the answer is safe."""
    return ((costs < 0) == is_safe.bool()).float().mean().item()


# ---------------------------------------------------------------- token-level helpers


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over sequences of each sequence's mean over its masked tokens.

    Sequences with no masked token are left out; returns 0 if none has a token.
    """
    m = mask.bool()  # [B, T]
    n = m.sum(-1)  # tokens per sequence; [B]
    per_seq = torch.where(m, x, torch.zeros_like(x)).sum(-1) / n.clamp(min=1)  # [B]
    has_tokens = n > 0
    if not has_tokens.any():
        return per_seq.sum() * 0.0  # 0, still attached to x's graph
    return per_seq[has_tokens].mean()


def last_token_index(mask: Tensor) -> Tensor:
    """[B, L] mask -> [B] index of each row's last 1 (0 for an empty row), whatever the padding side.

    A score model reads its end score here; reading at `mask.sum(1) - 1` instead is right only for
    right padding, and on left-padded rows reads the wrong token (DESIGN.md: it looked exactly like
    reward hacking).
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask.bool()).argmax(-1)


def kl_shaped_rewards(
    reward: Tensor,
    cost: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    kl_coeff: float,
    clip: float,
) -> Tuple[Tensor, Tensor]:
    """Per-token rewards and costs with a KL penalty toward the reference policy.

    rewards_t = -beta * (log pi - log pi_ref) and costs_t = +beta * (log pi - log pi_ref),
    with the end scores `reward`, `cost` [B] added at each sequence's last token;
    both are clamped to [-clip, clip] and zero off the mask. No gradient.
    """
    m = mask.bool()  # [B, T]
    kl = (logp - ref_logp).detach()  # per-token log-ratio; [B, T]
    rewards = -kl_coeff * kl  # r_t = -beta * KL_t
    costs = kl_coeff * kl  # c_t = +beta * KL_t
    rows = torch.nonzero(m.any(-1)).squeeze(-1)  # sequences with at least one token
    last = last_token_index(m)[rows]
    rewards[rows, last] += reward.detach().to(rewards.dtype)[rows]  # r_T += R(x, y)
    costs[rows, last] += cost.detach().to(costs.dtype)[rows]  # c_T += C(x, y)
    zero = torch.zeros_like(rewards)
    rewards = torch.where(m, rewards.clamp(-clip, clip), zero)
    costs = torch.where(m, costs.clamp(-clip, clip), zero)
    return rewards, costs


@torch.no_grad()
def gae(values: Tensor, rewards: Tensor, mask: Tensor, gamma: float, lam: float) -> Tuple[Tensor, Tensor]:
    """Generalised advantage estimation; returns (advantages, returns), both [B, T].

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},
    with V and A zero after a sequence's last token; returns = A + V.
    """
    m = mask.to(values.dtype)  # [B, T]
    values = values.detach() * m
    rewards = rewards.detach().to(values.dtype) * m
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # V_{t+1}; [B]
    next_advantage = torch.zeros_like(values[:, 0])  # A_{t+1}; [B]
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # delta_t = r_t + gamma V_{t+1} - V_t
        next_advantage = (delta + gamma * lam * next_advantage) * m[:, t]  # A_t = delta_t + gamma lam A_{t+1}
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = (advantages + values) * m  # R_t = A_t + V_t
    return advantages, returns


def token_logprobs(hidden: Tensor, targets: Tensor, project, chunk: Optional[int] = None,
                   temperature: float = 1.0) -> Tensor:
    """log softmax(project(hidden) / temperature)[target] for each token, `chunk` tokens at a time.

    hidden [N, H] (the final hidden states before the output layer), targets [N] long, `project`
    maps [n, H] to logits [n, V] (the model's output layer) -> [N] fp32 log-probabilities.
    The naive way materialises the logits of every token at once in fp32, and log_softmax a second
    copy: for 128 x 1,024 tokens and V = 32,000 that is 17 GB twice. Here at most [chunk, V]
    exists at a time, log p = logit[target] - logsumexp(logits) needs no second copy, and under
    autograd each chunk is recomputed in backward (torch.utils.checkpoint), so training keeps no
    logits either. chunk None: all tokens at once. temperature: the sampling temperature the tokens
    were drawn at, so that these are the log-probabilities of the policy that sampled them.
    """

    def chunk_logprobs(h: Tensor, t: Tensor) -> Tensor:
        logits = project(h).float() / temperature  # [c, V]
        return logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # [c]

    n = hidden.shape[0]
    if chunk is None or chunk >= n:
        return chunk_logprobs(hidden, targets)
    from torch.utils.checkpoint import checkpoint

    recompute = torch.is_grad_enabled()
    parts = [checkpoint(chunk_logprobs, hidden[s:s + chunk], targets[s:s + chunk], use_reentrant=False) if recompute
             else chunk_logprobs(hidden[s:s + chunk], targets[s:s + chunk]) for s in range(0, n, chunk)]
    return torch.cat(parts)


# ---------------------------------------------------------------- PPO-Lagrangian losses


def ppo_lag_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    reward_advantages: Tensor,
    cost_advantages: Optional[Tensor],
    mask: Tensor,
    lagrange_lambda: float,
    clip_ratio: float,
) -> Tensor:
    """Clipped surrogate on the combined advantage (A_r - lambda * A_c) / (1 + lambda).

    `cost_advantages` None gives plain PPO (A = A_r). Advantages, old_logp and lambda
    carry no gradient.
    """
    if cost_advantages is None:
        advantages = reward_advantages.detach()  # A = A_r
    else:
        lagrange_lambda = float(lagrange_lambda)
        advantages = (reward_advantages.detach() - lagrange_lambda * cost_advantages.detach()) / (
            1.0 + lagrange_lambda
        )  # A = (A_r - lambda A_c) / (1 + lambda)
    ratio = torch.exp(logp - old_logp.detach())  # pi_theta / pi_old; [B, T]
    surrogate = torch.min(
        ratio * advantages,
        ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio) * advantages,
    )  # min(ratio A, clip(ratio, 1-eps, 1+eps) A)
    return masked_mean(-surrogate, mask)


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float) -> Tensor:
    """0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2))."""
    old_values, returns = old_values.detach(), returns.detach()
    clipped = torch.max(torch.min(values, old_values + clip), old_values - clip)  # clip(V, V_old -+ eps)
    loss = torch.max((values - returns) ** 2, (clipped - returns) ** 2)  # [B, T]
    return 0.5 * masked_mean(loss, mask)


@torch.no_grad()
def clip_fraction(logp: Tensor, old_logp: Tensor, mask: Tensor, clip_ratio: float) -> Tensor:
    """Share of masked tokens (pooled over the batch) whose ratio lies outside [1 - eps, 1 + eps]:
    a 0-dim tensor on the inputs' device (0 with no masked token), read by the caller when it syncs."""
    m = mask.bool()
    ratio = torch.exp(logp - old_logp)  # [B, T]
    outside = (ratio < 1.0 - clip_ratio) | (ratio > 1.0 + clip_ratio)
    return (outside & m).sum() / m.sum().clamp(min=1)


@torch.no_grad()
def approx_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> float:
    """masked_mean(log pi - log pi_ref), a sample estimate of KL(pi || pi_ref)."""
    return masked_mean(logp - ref_logp, mask).item()


# ---------------------------------------------------------------- Lagrange multiplier


class LagrangeMultiplier:
    """lambda = exp(log_lambda), updated by SGD on -(J_c - threshold) * lambda.

    J_c is the mean of the last `window` observed episode costs. The gradient with
    respect to log_lambda is -(J_c - threshold) * lambda, so each step does
    log_lambda += lr * lambda * (J_c - threshold): lambda rises while the cost
    constraint J_c <= threshold is violated and falls otherwise.
    """

    def __init__(
        self,
        init: float,
        lr: float,
        threshold: float,
        max_value: Optional[float] = None,
        window: int = 128,
        delay_steps: int = 0,
    ):
        if init <= 0:
            raise ValueError(f"init must be > 0 (lambda = exp(log_lambda)), got {init}")
        self.lr = float(lr)
        self.threshold = float(threshold)
        self.max_value = None if max_value is None else float(max_value)
        self.window_size = int(window)
        self.delay_steps = int(delay_steps)
        self.log_lambda = math.log(init)
        self.window: deque = deque(maxlen=self.window_size)
        self.steps = 0
        self._clamp()

    @property
    def value(self) -> float:
        return math.exp(self.log_lambda)

    def _clamp(self) -> None:
        if self.max_value is not None:
            self.log_lambda = min(self.log_lambda, math.log(self.max_value))  # lambda <= max_value

    def observe(self, episode_costs: Union[Tensor, Iterable[float], float]) -> None:
        """Append end-of-sequence costs to the window."""
        if isinstance(episode_costs, Tensor):
            episode_costs = episode_costs.detach().flatten().tolist()
        elif isinstance(episode_costs, (int, float)):
            episode_costs = [episode_costs]
        self.window.extend(float(c) for c in episode_costs)

    def window_mean(self) -> float:
        """J_c: the mean of the window of episode costs."""
        return sum(self.window) / len(self.window)

    def step(self) -> float:
        """One update (skipped for the first `delay_steps` calls or with an empty window)."""
        self.steps += 1
        if self.steps > self.delay_steps and self.window:
            mean_cost = self.window_mean()  # J_c
            self.log_lambda += self.lr * self.value * (mean_cost - self.threshold)  # log_lambda += lr lambda (J_c - d)
            self._clamp()
        return self.value

    def state_dict(self) -> Dict:
        return {
            "log_lambda": self.log_lambda,
            "window": list(self.window),
            "steps": self.steps,
            "lr": self.lr,
            "threshold": self.threshold,
            "max_value": self.max_value,
            "window_size": self.window_size,
            "delay_steps": self.delay_steps,
        }

    def load_state_dict(self, state: Dict) -> None:
        self.lr = float(state["lr"])
        self.threshold = float(state["threshold"])
        self.max_value = state["max_value"]
        self.window_size = int(state["window_size"])
        self.delay_steps = int(state["delay_steps"])
        self.log_lambda = float(state["log_lambda"])
        self.window = deque((float(c) for c in state["window"]), maxlen=self.window_size)
        self.steps = int(state["steps"])


# ---------------------------------------------------------------- one constraint per harm category


def category_cost_loss(costs_0: Tensor, costs_1: Tensor, in_0: Tensor, in_1: Tensor,
                       labelled_0: Tensor, labelled_1: Tensor) -> Tensor:
    """Eq. 6 per harm category k, for a cost model with one head per category; costs_i [B, K] are
    answer i's category end scores C_k, in_i [B, K] bool whether answer i is labelled harmful in k,
    labelled_i [B] bool whether answer i's categories are known (safe, or unsafe with its categories).

    Bradley-Terry per category, over the labelled pairs where exactly one answer is harmful in k:
        -log sigma(C_k(harmful in k) - C_k(the other)),
    and the sign term per category, over each labelled answer: -log sigma(-s_k C_k), s_k = -1 when
    the answer is harmful in k, +1 when it is not (a safe answer is safe in every category).
    Each term is averaged over its rows (0 where a category has none); the categories are averaged."""
    in_0, in_1 = in_0.bool(), in_1.bool()
    both = (labelled_0.bool() & labelled_1.bool()).unsqueeze(-1)  # [B, 1]
    differ = (in_0 != in_1) & both  # pairs that rank the two answers in k (both answers' categories known); [B, K]
    harmful = torch.where(in_0, costs_0, costs_1)  # C_k of the answer harmful in k (where they differ)
    other = torch.where(in_0, costs_1, costs_0)
    pair = -F.logsigmoid(harmful - other)  # -log sigma(C_k(y_harmful) - C_k(y_other)); [B, K]
    loss = _masked_col_mean(pair, differ)  # [K]
    for costs, member, known in ((costs_0, in_0, labelled_0), (costs_1, in_1, labelled_1)):
        s = 1.0 - 2.0 * member.to(costs.dtype)  # +1 not harmful in k, -1 harmful in k; [B, K]
        rows = known.bool().unsqueeze(-1).expand_as(member)  # [B, K]
        loss = loss + _masked_col_mean(-F.logsigmoid(-s * costs), rows)  # -log sigma(-s_k C_k)
    return loss.mean()  # over categories


def _masked_col_mean(x: Tensor, rows: Tensor) -> Tensor:
    """x [B, K] -> [K]: each column's mean over its rows where `rows` [B, K] is True (0 where none)."""
    n = rows.sum(0)  # [K]
    return torch.where(rows, x, torch.zeros_like(x)).sum(0) / n.clamp(min=1)


def category_cost_advantage(cost_advantages: Tensor, lambdas: Tensor) -> Tuple[Tensor, float]:
    """One multiplier per category, in the policy loss as one: cost_advantages [K, B, T] (A_c,k),
    lambdas [K] -> (A_c, lambda) with lambda = sum_k lambda_k and A_c = sum_k lambda_k A_c,k / lambda,
    so ppo_lag_policy_loss's (A_r - lambda A_c) / (1 + lambda) is
    (A_r - sum_k lambda_k A_c,k) / (1 + sum_k lambda_k): the cost advantage is the lambda-weighted sum."""
    total = float(lambdas.detach().to(torch.float64).sum())  # in float64, as ppo_lag's mix sums them
    lambdas = lambdas.detach().to(cost_advantages.dtype)
    weighted = (lambdas.view(-1, 1, 1) * cost_advantages.detach()).sum(0)  # sum_k lambda_k A_c,k; [B, T]
    return (weighted / total if total > 0 else torch.zeros_like(weighted)), total


def auto_threshold(costs: List[float], safe: List[bool], unsafe_share: float) -> Tuple[float, float, float]:
    """d = (1-u) * mean cost of the safe reference answers + u * mean cost of the unsafe ones: the
    mean cost of a policy that is unsafe a share u of the time, on the round's cost model's own
    scale. (Threshold 0 meant nothing on that scale in DESIGN.md's experiment; u = 0 would demand
    zero harm before lambda may fall.) The reference answers stay fixed and u is held or lowered
    from round to round, so a refitted cost model, whose scale drifts, does not loosen the
    constraint: an earlier rule re-derived d from each refit's own eval split and loosened it
    every round (-5.23, -4.62, -4.35). Returns (d, mean safe cost, mean unsafe cost)."""
    safe_costs = [c for c, s in zip(costs, safe) if s]
    unsafe_costs = [c for c, s in zip(costs, safe) if not s]
    if not safe_costs or not unsafe_costs:
        raise ValueError("threshold: auto needs safe and unsafe labelled answers (is_response_*_safe) in the first "
                         "ingest's held-out pairs; set safe_rlhf.rounds[k].threshold to a number")
    safe_mean, unsafe_mean = sum(safe_costs) / len(safe_costs), sum(unsafe_costs) / len(unsafe_costs)
    return (1 - unsafe_share) * safe_mean + unsafe_share * unsafe_mean, safe_mean, unsafe_mean


def auto_constraint_thresholds(costs: List[List[float]], safe: List[bool], harmful: List[List[bool]],
                               unsafe_share: float) -> List[Tuple[float, float, float, int]]:
    """Threshold auto for each constraint k of safe_rlhf.constraints per_category: costs [N][K] (the
    reference answers' shared cost, then each category head's), harmful [N][K] (unsafe at all for the
    shared column; harmful in k for a category's) -> for each k (d_k, mean safe cost, mean cost of the
    answers harmful in k, how many there were): auto_threshold on k's own head, with the answers
    harmful in k as the unsafe ones (answers harmful only elsewhere left out), at the round's u.

    Each category gets the whole u, not a share of it: with shares (u x n_k / n_unsafe, 0.002-0.017
    on the default world) every threshold sat at its head's safe mean, where any harmful answer, in
    whatever category, holds every head above it (the heads share a backbone and rise together), so
    every lambda stayed at its cap all round (docs/algorithms.md). A category no reference answer is
    harmful in takes every unsafe answer as its unsafe ones (its count is then 0)."""
    out = []
    for k in range(len(costs[0])):
        in_k = [h[k] for h in harmful]
        n = sum(in_k)
        if n:  # the safe answers and those harmful in k
            rows = [(c[k], not h) for c, s, h in zip(costs, safe, in_k) if s or h]
        else:
            rows = [(c[k], s) for c, s in zip(costs, safe)]
        d, safe_mean, unsafe_mean = auto_threshold([c for c, _ in rows], [s for _, s in rows], unsafe_share)
        out.append((d, safe_mean, unsafe_mean, n))
    return out


class CategoryMultipliers:
    """One LagrangeMultiplier per constraint (safe_rlhf.constraints per_category: the shared cost, then
    one per harm category head), each with its own threshold d_k, each updated on its own episode costs
    (column k of [B, K]) as ppo_lag's one multiplier is on the episode cost."""

    def __init__(self, categories, init: float, lr: float, thresholds, **kw):
        self.categories = list(categories)
        thresholds = list(thresholds)
        if len(thresholds) != len(self.categories):
            raise ValueError(f"{len(thresholds)} thresholds for {len(self.categories)} categories")
        self.multipliers = [LagrangeMultiplier(init, lr, d, **kw) for d in thresholds]

    @property
    def values(self) -> Tensor:
        return torch.tensor([m.value for m in self.multipliers], dtype=torch.float64)  # [K]

    @property
    def value(self) -> float:
        """sum_k lambda_k (the policy loss's lambda is this capped at lambda_max: Algorithm.constrained_advantages)."""
        return sum(m.value for m in self.multipliers)

    @property
    def threshold(self) -> float:
        """The first constraint's threshold (the shared cost's, in the round)."""
        return self.multipliers[0].threshold

    def observe(self, episode_costs: Tensor) -> None:
        """episode_costs [B, K]."""
        for k, m in enumerate(self.multipliers):
            m.observe(episode_costs[:, k])

    def step(self) -> Tensor:
        return torch.tensor([m.step() for m in self.multipliers], dtype=torch.float64)  # [K]

    @property
    def thresholds(self) -> List[float]:
        return [m.threshold for m in self.multipliers]

    def window_means(self) -> List[float]:
        """Each constraint's J_c: the mean of its window of episode costs."""
        return [m.window_mean() for m in self.multipliers]

    def state_dict(self) -> Dict:
        return {"categories": self.categories, "multipliers": [m.state_dict() for m in self.multipliers]}

    def load_state_dict(self, state: Dict) -> None:
        if state["categories"] != self.categories:
            raise ValueError(f"a checkpoint of categories {state['categories']}, not {self.categories}")
        for m, st in zip(self.multipliers, state["multipliers"]):
            m.load_state_dict(st)


# ---------------------------------------------------------------- advantage estimators

# eps of the group baseline's std: a group whose answers all score the same gets advantage 0, not 0/0
GROUP_STD_EPS = 1e-6


@dataclass(frozen=True)
class StepScores:
    """One step's scored rollouts: what an algorithm turns into advantages."""
    reward: Tensor  # [B] reward model end scores R(x, y)
    cost: Optional[Tensor]  # [B] cost model end scores C(x, y); None when the algorithm uses no cost model
    logp: Tensor  # [B, T] behaviour policy logprobs of the sampled tokens
    ref_logp: Tensor  # [B, T] reference policy logprobs
    mask: Tensor  # [B, T] 1.0 on response tokens
    reward_values: Optional[Tensor] = None  # [B, T] reward critic values; None without that critic
    cost_values: Optional[Tensor] = None  # [B, T] cost critic values; None without that critic


@dataclass(frozen=True)
class AdvantageSettings:
    kl_coeff: float  # beta of the per-token KL penalty
    clip_score: float  # clip of the per-token shaped reward / cost
    gamma: float = 1.0  # GAE discount
    gae_lambda: float = 0.95  # GAE lambda
    shaping_nu: float = 1.0  # reward_shaping's fixed cost penalty
    group_size: int = 1  # answers per prompt, consecutive rows of the batch (grouped algorithms)
    group_scale: str = "group"  # grouped algorithms: divide by each group's std, or by the batch's (group_normalized)


@dataclass(frozen=True)
class Advantages:
    reward: Tensor  # [B, T] A_r
    cost: Optional[Tensor]  # [B, T] A_c; None for a reward-only algorithm
    reward_returns: Optional[Tensor]  # [B, T] the reward critic's targets; None without critics
    cost_returns: Optional[Tensor]  # [B, T] the cost critic's targets; None without that critic


def gae_advantages(s: StepScores, end_reward: Tensor, hp: AdvantageSettings) -> Advantages:
    """KL-shaped per-token rewards and costs, then GAE on each critic (paper Sec. 3.3)."""
    cost = s.cost if s.cost is not None else torch.zeros_like(s.reward)
    rewards, costs = kl_shaped_rewards(end_reward, cost, s.logp, s.ref_logp, s.mask, hp.kl_coeff, hp.clip_score)
    reward_adv, reward_ret = gae(s.reward_values, rewards, s.mask, hp.gamma, hp.gae_lambda)
    cost_adv = cost_ret = None
    if s.cost_values is not None:
        cost_adv, cost_ret = gae(s.cost_values, costs, s.mask, hp.gamma, hp.gae_lambda)
    return Advantages(reward_adv, cost_adv, reward_ret, cost_ret)


@torch.no_grad()
def group_normalized(x: Tensor, group_size: int, eps: float = GROUP_STD_EPS, scale: str = "group") -> Tensor:
    """x [B] -> (x - mean of its group) / (spread + eps) [B], each group `group_size` consecutive
    rows (one prompt's answers). scale "group": the spread is the group's own population std (GRPO);
    "batch": one std of every row's deviation from its group mean, over the whole batch, so a group
    whose answers barely differ keeps small advantages instead of noise blown up to unit spread."""
    if x.shape[0] % group_size:
        raise ValueError(f"a batch of {x.shape[0]} is not whole groups of {group_size}")
    if scale not in ("group", "batch"):
        raise ValueError(f"scale must be 'group' or 'batch', got {scale!r}")
    g = x.detach().view(-1, group_size)  # [B/G, G]
    dev = g - g.mean(-1, keepdim=True)  # [B/G, G]
    if scale == "group":
        std = g.std(-1, correction=0, keepdim=True)  # [B/G, 1]
    else:
        std = dev.pow(2).mean().sqrt()  # [], the batch's within-group population std
    return (dev / (std + eps)).view(-1)  # A_i = (x_i - mean_g) / (std + eps)


@torch.no_grad()
def group_advantages(s: StepScores, end_reward: Tensor, hp: AdvantageSettings) -> Advantages:
    """Critic-free (grpo_lag): each answer's episode totals of the KL-shaped per-token rewards and
    costs, normalised within its prompt's group (the group mean is the baseline, as in GRPO, Shao et
    al. 2024, arXiv 2402.03300, Sec. 4.1.2), each separately and before the policy loss combines them
    as (A_r - lambda A_c) / (1 + lambda): Constrained GRPO (arXiv 2602.05863) combines reward and cost
    after normalisation, because normalising a combined score would rescale lambda by the group's std.
    Every token of an answer gets its answer's advantage; no critic, no GAE.

    The KL to the reference stays in the per-token reward and cost (-beta KL_t, +beta KL_t) as in
    ppo_lag, rather than GRPO's separate KL loss term: the Lagrangian then trades the same
    KL-regularised returns as ppo_lag (the comparison isolates the baseline: critic or group), and
    the learner, its minibatch and its loss are ppo_lag's unchanged (no reference logprobs shipped
    to the learner)."""
    if s.cost is None:
        raise ValueError("group_advantages needs the cost scores")
    rewards, costs = kl_shaped_rewards(end_reward, s.cost, s.logp, s.ref_logp, s.mask, hp.kl_coeff, hp.clip_score)
    m = s.mask.to(rewards.dtype)  # [B, T]
    reward_adv = group_normalized(rewards.sum(-1), hp.group_size, scale=hp.group_scale)  # A_r from sum_t r_t; [B]
    cost_adv = group_normalized(costs.sum(-1), hp.group_size, scale=hp.group_scale)  # A_c from sum_t c_t; [B]
    return Advantages(reward_adv[:, None] * m, cost_adv[:, None] * m, None, None)  # [B, T] each


# ---------------------------------------------------------------- algorithms: one registration each


def lagrangian_update(multiplier: LagrangeMultiplier, episode_costs: Tensor) -> float:
    """The episode costs join the window, then log_lambda += lr * lambda * (J_c - d) -> lambda."""
    multiplier.observe(episode_costs)
    return multiplier.step()


@dataclass(frozen=True)
class Algorithm:
    """Everything that makes a variant, in one object: the roles it needs, how rewards and costs
    become advantages, its policy loss, its multiplier and how it updates, and how it samples.
    The round, its actors, the plan, the config, the graph and the sweep read it from here."""
    summary: str  # one line: what it optimises (the config's description lists these)
    critics: Tuple[str, ...]  # learner roles beside the policy: reward_critic, cost_critic
    uses_cost_model: bool  # the round scores answers with the cost model (scorer-cost, fit_cost upstream)
    estimator: Callable[[StepScores, Tensor, AdvantageSettings], Advantages]  # (scores, end reward, settings)
    policy_loss: Callable[..., Tensor] = ppo_lag_policy_loss  # (logp, old_logp, A_r, A_c, mask, lambda, clip)
    # lambda's update from the step's episode costs; None: no constraint (lambda 0, threshold logged only)
    multiplier_update: Optional[Callable[[LagrangeMultiplier, Tensor], float]] = None
    cost_in_end_reward: bool = False  # end reward = reward - nu * cost (fixed penalty nu)
    group_sampling: bool = False  # safe_rlhf.group_size answers per prompt, normalised as a group
    colour: str = "tab:gray"  # in the sweep's Pareto plot

    @property
    def constrained(self) -> bool:
        """A Lagrange multiplier on the episode cost: a threshold, lambda and its update."""
        return self.multiplier_update is not None

    @property
    def uses_cost_critic(self) -> bool:
        return "cost_critic" in self.critics

    @property
    def learner_roles(self) -> Tuple[str, ...]:
        return ("policy",) + self.critics

    @property
    def scorer_roles(self) -> Tuple[str, ...]:
        return ("reward", "reference") + (("cost",) if self.uses_cost_model else ())

    def answers_per_prompt(self, group_size: int) -> int:
        return group_size if self.group_sampling else 1

    def end_reward(self, reward: Tensor, cost: Optional[Tensor], nu: float) -> Tensor:
        """The end score fed into kl_shaped_rewards: R, or R - nu * C with cost_in_end_reward."""
        if not self.cost_in_end_reward:
            return reward
        if cost is None:
            raise ValueError("an algorithm with the cost in its end reward needs the cost scores")
        return reward - nu * cost  # R - nu * C

    def advantages(self, s: StepScores, hp: AdvantageSettings) -> Advantages:
        return self.estimator(s, self.end_reward(s.reward, s.cost, hp.shaping_nu), hp)

    def update_multiplier(self, multiplier: LagrangeMultiplier, episode_costs: Optional[Tensor]) -> float:
        """This step's lambda (0 for an unconstrained algorithm, whose multiplier never moves).
        With CategoryMultipliers and episode costs [B, K]: the K lambdas, a [K] tensor."""
        return 0.0 if self.multiplier_update is None else self.multiplier_update(multiplier, episode_costs)

    def constrained_advantages(self, s: StepScores, constraint_costs: Tensor, lambdas: Tensor,
                               hp: AdvantageSettings, max_lambda: Optional[float] = None) -> Tuple[Advantages, float]:
        """Several constraints (safe_rlhf.constraints per_category): constraint_costs [B, K] (the
        shared cost, then one per category head), lambdas [K] -> (advantages, lambda) such that the
        policy loss's (A_r - lambda A_c) / (1 + lambda) is (A_r - sum_k lambda_k A_c,k) / (1 + sum_k lambda_k),
        the cost advantage being the lambda-weighted mean sum_k lambda_k A_c,k / sum_k lambda_k.
        (ppo_lag's mix equals it exactly while no per-token cost reaches clip_score.)

        max_lambda (safe_rlhf.lambda_max) also caps the loss's lambda, min(sum_k lambda_k, max_lambda):
        the weights among the constraints stay lambda_k / sum lambda, but the cost never outweighs the
        reward more than one constraint at its cap would. Harm categories' costs rise and fall
        together, so their multipliers do too: uncapped, 11 constraints summed to 110 on the default
        world and the policy learned to refuse everything (docs/algorithms.md).

        With a cost critic, the K costs are first mixed into the one cost stream it learns, with
        weights lambda_k / sum lambda: the KL-shaped costs and GAE are linear in the end cost, so the
        mix's advantage is sum_k (lambda_k / lambda) A_c,k wherever the critic has learned the mix's
        values (its target moves as the lambdas do, slowly: they change by lr x lambda a step).
        Critic-free (group baselines), each cost is normalised within its group on its own and the
        normalised advantages are weighted (category_cost_advantage): normalising the mix would
        rescale each lambda_k by the group's spread, as normalising R - lambda C would (group_advantages)."""
        if not self.constrained or not self.uses_cost_model:
            raise ValueError("per-category constraints need a constrained algorithm with a cost model")
        lambdas = lambdas.detach().to(torch.float64)
        if self.uses_cost_critic:
            total = float(lambdas.sum())
            weights = lambdas / total if total > 0 else torch.full_like(lambdas, 1.0 / lambdas.numel())
            mixed = constraint_costs.detach().to(torch.float64) @ weights  # sum_k w_k C_k; [B]
            adv = self.advantages(replace(s, cost=mixed.to(s.reward.dtype)), hp)
        else:
            each = [self.advantages(replace(s, cost=constraint_costs[:, k]), hp) for k in range(constraint_costs.shape[1])]
            combined, total = category_cost_advantage(torch.stack([a.cost for a in each]), lambdas)  # [B, T]
            adv = replace(each[0], cost=combined)
        return adv, (total if max_lambda is None else min(total, max_lambda))


ALGORITHMS: Dict[str, Algorithm] = {
    "ppo_lag": Algorithm("Safe RLHF (PPO-Lagrangian, a reward and a cost critic)", ("reward_critic", "cost_critic"),
                         True, gae_advantages, multiplier_update=lagrangian_update, colour="tab:blue"),
    "ppo": Algorithm("reward only, the cost ignored", ("reward_critic",), False, gae_advantages, colour="tab:red"),
    "reward_shaping": Algorithm("reward - nu * cost, a fixed penalty", ("reward_critic",), True, gae_advantages,
                                cost_in_end_reward=True, colour="tab:orange"),
    "grpo_lag": Algorithm("critic-free Lagrangian, group-normalised reward and cost advantages (group_size answers "
                          "per prompt)", (), True, group_advantages, multiplier_update=lagrangian_update,
                          group_sampling=True, colour="tab:green"),
}
ALGORITHM_NAMES = tuple(ALGORITHMS)


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; valid choices: {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def uses_cost_critic(algorithm: str) -> bool:
    return get_algorithm(algorithm).uses_cost_critic


def uses_cost_model(algorithm: str) -> bool:
    return get_algorithm(algorithm).uses_cost_model


def shaped_end_reward(algorithm: str, reward: Tensor, cost: Optional[Tensor], nu: float) -> Tensor:
    """End score fed into kl_shaped_rewards: R for ppo / ppo_lag / grpo_lag, R - nu * C for reward_shaping."""
    return get_algorithm(algorithm).end_reward(reward, cost, nu)
