"""The registry of algorithms: each one `Algorithm` object that the round, its actors, the plan, the config and the sweep read.

Shapes as in core/objectives/__init__.py."""
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

import torch

from core.objectives.advantages import Advantages, AdvantageSettings, StepScores, gae_advantages, group_advantages
from core.objectives.constraints import category_cost_advantage
from core.objectives.lagrange import LagrangeMultiplier
from core.objectives.ppo import ppo_lag_policy_loss

Tensor = torch.Tensor


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
