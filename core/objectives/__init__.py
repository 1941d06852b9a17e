"""Training objectives of Safe RLHF (Dai et al., 2023, arXiv 2310.12773).

Pure torch, no I/O: the preference-model losses (reward model R and cost model C,
paper Eq. 5 and 6), the PPO-Lagrangian policy / critic losses with GAE (Sec. 3.3),
the Lagrange multiplier update, the critic-free group advantages of `grpo_lag`, and the
registry of algorithms: each one `Algorithm` object (`ppo_lag`; the reward-only `ppo` and
fixed-penalty `reward_shaping` baselines; `grpo_lag`) that the round, its actors, the plan, the
config and the sweep read. Adding an algorithm: its math and its registration (algorithms.py), its tests.

One module per part, all re-exported here (`from core.objectives import ...`): preference (Eq. 5-6),
tokens (masks, KL-shaped reward, GAE, log-probabilities), ppo, lagrange, constraints (per category),
advantages (GAE and group-normalised), algorithms (the registry). Torch only; no project imports.

Shape legend: B = batch (sequences or preference pairs), T = response tokens.
Token tensors are [B, T] over response positions, right-padded; `mask` is 1 (or
True) on real response tokens.
"""
from core.objectives.preference import (
    reward_pair_loss, cost_pair_loss, pair_accuracy, sign_accuracy, fit_linear_head,
)
from core.objectives.tokens import (
    masked_mean, last_token_index, kl_shaped_rewards, gae, token_logprobs,
)
from core.objectives.ppo import (
    ppo_lag_policy_loss, clipped_value_loss, clip_fraction, approx_kl,
)
from core.objectives.lagrange import (
    LagrangeMultiplier,
)
from core.objectives.constraints import (
    category_cost_loss, category_cost_advantage, auto_threshold, auto_constraint_thresholds,
    CategoryMultipliers,
)
from core.objectives.advantages import (
    GROUP_STD_EPS, StepScores, AdvantageSettings, Advantages, gae_advantages, group_normalized,
    group_advantages,
)
from core.objectives.algorithms import (
    lagrangian_update, Algorithm, ALGORITHMS, ALGORITHM_NAMES, get_algorithm, uses_cost_critic,
    uses_cost_model, shaped_end_reward,
)

__all__ = [
    "reward_pair_loss", "cost_pair_loss", "pair_accuracy", "sign_accuracy", "fit_linear_head", "masked_mean",
    "last_token_index", "kl_shaped_rewards", "gae", "token_logprobs", "ppo_lag_policy_loss",
    "clipped_value_loss", "clip_fraction", "approx_kl", "LagrangeMultiplier", "category_cost_loss",
    "category_cost_advantage", "auto_threshold", "auto_constraint_thresholds",
    "CategoryMultipliers", "GROUP_STD_EPS", "StepScores", "AdvantageSettings", "Advantages",
    "gae_advantages", "group_normalized", "group_advantages", "lagrangian_update", "Algorithm",
    "ALGORITHMS", "ALGORITHM_NAMES", "get_algorithm", "uses_cost_critic", "uses_cost_model",
    "shaped_end_reward",
]
