"""Tests for core/objectives: hand-computed cases and plain-Python loop references."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import objectives as obj

TOL = 1e-9
REPO = Path(__file__).resolve().parents[1]
LENGTHS = [5, 1, 3, 4]  # ragged right-padded batch, one sequence of length 1
T = 5


def softplus(x):  # -logsigmoid(x) = log(1 + e^-x)
    return math.log1p(math.exp(-x))


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


def ragged_mask(lengths, width=T):
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(width)] for n in lengths], dtype=torch.float64)


def randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- naive loop references


def ref_masked_mean(x, lengths):
    seq_means = [sum(row[:n]) / n for row, n in zip(x, lengths) if n > 0]
    return sum(seq_means) / len(seq_means) if seq_means else 0.0


def ref_gae(values, rewards, lengths, gamma, lam):
    advantages, returns = [], []
    for v, r, n in zip(values, rewards, lengths):
        adv = [0.0] * len(v)
        running = 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            delta = r[t] + gamma * next_v - v[t]
            running = delta + gamma * lam * running
            adv[t] = running
        advantages.append(adv)
        returns.append([adv[t] + v[t] if t < n else 0.0 for t in range(len(v))])
    return advantages, returns


def ref_policy_loss(logp, old_logp, a_r, a_c, lengths, lam, eps):
    per_token = []
    for b in range(len(logp)):
        row = []
        for t in range(len(logp[b])):
            a = a_r[b][t] if a_c is None else (a_r[b][t] - lam * a_c[b][t]) / (1 + lam)
            ratio = math.exp(logp[b][t] - old_logp[b][t])
            clipped = min(max(ratio, 1 - eps), 1 + eps)
            row.append(-min(ratio * a, clipped * a))
        per_token.append(row)
    return ref_masked_mean(per_token, lengths)


def ref_value_loss(values, old_values, returns, lengths, clip):
    per_token = []
    for v_row, o_row, r_row in zip(values, old_values, returns):
        row = []
        for v, o, r in zip(v_row, o_row, r_row):
            vc = min(max(v, o - clip), o + clip)
            row.append(max((v - r) ** 2, (vc - r) ** 2))
        per_token.append(row)
    return 0.5 * ref_masked_mean(per_token, lengths)


# ---------------------------------------------------------------- preference losses


def test_reward_pair_loss_matches_hand_computation():
    better, worse = t64([1.0, 0.0]), t64([0.0, 0.0])
    # pairs: -logsigmoid(1) = log(1 + e^-1), -logsigmoid(0) = log 2
    expected = (softplus(1.0) + math.log(2)) / 2
    assert obj.reward_pair_loss(better, worse).item() == pytest.approx(expected, abs=TOL)
    # regularisation: mean([1, 0, 0, 0]^2) = 0.25, times 0.1
    assert obj.reward_pair_loss(better, worse, regularization=0.1).item() == pytest.approx(expected + 0.025, abs=TOL)


def test_reward_pair_loss_decreases_as_margin_grows():
    worse = t64([0.0])
    assert obj.reward_pair_loss(t64([2.0]), worse) < obj.reward_pair_loss(t64([1.0]), worse)


def test_cost_pair_loss_with_safety_labels_matches_hand_computation():
    safer, unsafer = t64([-1.0, 0.5]), t64([2.0, 1.0])
    safer_is_safe, unsafer_is_safe = torch.tensor([True, False]), torch.tensor([False, False])
    # pairwise: -logsigmoid(unsafer - safer): rows 2 - (-1) = 3 and 1 - 0.5 = 0.5
    pairwise = (softplus(3.0) + softplus(0.5)) / 2
    # safer sign terms -logsigmoid(-s c): row0 safe s=+1 -> -logsigmoid(1); row1 unsafe s=-1 -> -logsigmoid(0.5)
    safer_sign = (softplus(1.0) + softplus(0.5)) / 2
    # unsafer, both unsafe s=-1: -logsigmoid(2), -logsigmoid(1)
    unsafer_sign = (softplus(2.0) + softplus(1.0)) / 2
    expected = pairwise + safer_sign + unsafer_sign
    loss = obj.cost_pair_loss(safer, unsafer, safer_is_safe, unsafer_is_safe)
    assert loss.item() == pytest.approx(expected, abs=TOL)
    # regularisation: mean([1, 0.25, 4, 1]) = 1.5625, times 0.2
    loss_reg = obj.cost_pair_loss(safer, unsafer, safer_is_safe, unsafer_is_safe, regularization=0.2)
    assert loss_reg.item() == pytest.approx(expected + 0.2 * 1.5625, abs=TOL)


def test_cost_pair_loss_hh_style_uses_only_pairwise_term():
    safer, unsafer = t64([-1.0, 0.5]), t64([2.0, 1.0])
    pairwise = (softplus(3.0) + softplus(0.5)) / 2
    assert obj.cost_pair_loss(safer, unsafer).item() == pytest.approx(pairwise, abs=TOL)
    # + 0.2 * mean([1, 0.25, 4, 1])
    loss_reg = obj.cost_pair_loss(safer, unsafer, regularization=0.2)
    assert loss_reg.item() == pytest.approx(pairwise + 0.2 * 1.5625, abs=TOL)


def test_cost_pair_loss_sign_terms_push_safe_below_zero_and_unsafe_above():
    safe, unsafe = torch.tensor([True]), torch.tensor([False])
    # with the pairwise gap held fixed at 1, shifting both costs down helps a safe/safe pair ...
    high = obj.cost_pair_loss(t64([0.0]), t64([1.0]), safe, safe)
    low = obj.cost_pair_loss(t64([-2.0]), t64([-1.0]), safe, safe)
    assert low < high
    # ... and hurts an unsafe/unsafe pair
    high = obj.cost_pair_loss(t64([0.0]), t64([1.0]), unsafe, unsafe)
    low = obj.cost_pair_loss(t64([-2.0]), t64([-1.0]), unsafe, unsafe)
    assert low > high


def test_cost_pair_loss_has_safety_labels_averages_sign_terms_over_labelled_rows():
    safer, unsafer = t64([-1.0, 0.5]), t64([2.0, 1.0])
    safer_is_safe, unsafer_is_safe = torch.tensor([True, True]), torch.tensor([False, True])
    pairwise = (softplus(3.0) + softplus(0.5)) / 2
    # only row 0 labelled: safer safe -> -logsigmoid(1); unsafer unsafe -> -logsigmoid(2)
    loss = obj.cost_pair_loss(
        safer, unsafer, safer_is_safe, unsafer_is_safe, has_safety_labels=torch.tensor([True, False])
    )
    assert loss.item() == pytest.approx(pairwise + softplus(1.0) + softplus(2.0), abs=TOL)
    # no row labelled: sign terms contribute 0
    none = obj.cost_pair_loss(
        safer, unsafer, safer_is_safe, unsafer_is_safe, has_safety_labels=torch.tensor([False, False])
    )
    assert none.item() == pytest.approx(pairwise, abs=TOL)
    # all labelled equals no mask
    full = obj.cost_pair_loss(safer, unsafer, safer_is_safe, unsafer_is_safe, has_safety_labels=torch.tensor([True, True]))
    assert full.item() == pytest.approx(obj.cost_pair_loss(safer, unsafer, safer_is_safe, unsafer_is_safe).item(), abs=TOL)


def test_cost_pair_loss_rejects_half_given_labels():
    with pytest.raises(ValueError):
        obj.cost_pair_loss(t64([0.0]), t64([1.0]), safer_is_safe=torch.tensor([True]))


def test_pair_accuracy_counts_strict_wins():
    # 1 > 0 yes, 2 > 3 no, 3 > 3 no (tie)
    assert obj.pair_accuracy(t64([1.0, 2.0, 3.0]), t64([0.0, 3.0, 3.0])) == pytest.approx(1 / 3)


def test_sign_accuracy_requires_negative_cost_exactly_when_safe():
    costs = t64([-1.0, 1.0, -0.5, 0.0])
    is_safe = torch.tensor([True, False, False, True])
    # right, right, wrong (unsafe but negative), wrong (safe but 0 is not < 0)
    assert obj.sign_accuracy(costs, is_safe) == pytest.approx(0.5)


# ---------------------------------------------------------------- masked_mean


def test_masked_mean_averages_sequence_means_and_skips_empty_rows():
    x = t64([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = t64([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    # row means 1.5 and 8; empty row excluded -> 4.75 (a token-pooled mean would give 27/5 = 5.4)
    assert obj.masked_mean(x, mask).item() == pytest.approx(4.75, abs=TOL)
    assert obj.masked_mean(x, mask.bool()).item() == pytest.approx(4.75, abs=TOL)


def test_masked_mean_all_empty_is_zero_not_nan():
    x = t64([[1.0, 2.0]])
    out = obj.masked_mean(x, torch.zeros(1, 2))
    assert out.item() == 0.0


def test_masked_mean_ignores_nonfinite_padding():
    x = t64([[1.0, float("nan")], [float("inf"), 3.0]])
    mask = t64([[1, 0], [0, 1]])
    assert obj.masked_mean(x, mask).item() == pytest.approx(2.0, abs=TOL)


def test_masked_mean_matches_loop_reference_on_ragged_batch():
    lengths = LENGTHS + [0]
    x = randn(len(lengths), T, seed=1)
    expected = ref_masked_mean(x.tolist(), lengths)
    assert obj.masked_mean(x, ragged_mask(lengths)).item() == pytest.approx(expected, abs=TOL)


# ---------------------------------------------------------------- kl_shaped_rewards


def test_kl_shaped_rewards_hand_case_end_score_on_last_token():
    logp = t64([[-1.0, -1.0, -1.0], [-2.0, 5.0, 5.0]])
    ref_logp = t64([[-1.1, -1.2, -1.3], [-2.5, 0.0, 0.0]])  # log-ratios 0.1 0.2 0.3 | 0.5 (pad, pad)
    mask = t64([[1, 1, 1], [1, 0, 0]])
    rewards, costs = obj.kl_shaped_rewards(t64([1.0, 2.0]), t64([-1.0, 3.0]), logp, ref_logp, mask, kl_coeff=0.1, clip=10.0)
    # rewards: -0.1 * log-ratio, + end reward at the last real token
    assert torch.allclose(rewards, t64([[-0.01, -0.02, -0.03 + 1.0], [-0.05 + 2.0, 0.0, 0.0]]), atol=TOL, rtol=0)
    # costs: +0.1 * log-ratio, + end cost at the last real token
    assert torch.allclose(costs, t64([[0.01, 0.02, 0.03 - 1.0], [0.05 + 3.0, 0.0, 0.0]]), atol=TOL, rtol=0)


def test_kl_shaped_rewards_clamps_to_clip():
    logp = t64([[-1.0, -1.0, -1.0], [-2.0, 5.0, 5.0]])
    ref_logp = t64([[-1.1, -1.2, -21.0], [-2.5, 0.0, 0.0]])  # row 0 token 2 log-ratio 20
    mask = t64([[1, 1, 1], [1, 0, 0]])
    rewards, costs = obj.kl_shaped_rewards(t64([1.0, 2.0]), t64([-1.0, 3.0]), logp, ref_logp, mask, kl_coeff=0.1, clip=1.5)
    # row 0 last: -2 + 1 = -1 (inside); row 1: 1.95 -> 1.5
    assert torch.allclose(rewards, t64([[-0.01, -0.02, -1.0], [1.5, 0.0, 0.0]]), atol=TOL, rtol=0)
    # row 0 last: 2 - 1 = 1 (inside); row 1: 3.05 -> 1.5
    assert torch.allclose(costs, t64([[0.01, 0.02, 1.0], [1.5, 0.0, 0.0]]), atol=TOL, rtol=0)
    _, costs_small = obj.kl_shaped_rewards(t64([0.0, 0.0]), t64([0.0, 0.0]), logp, ref_logp, mask, kl_coeff=1.0, clip=1.5)
    assert costs_small[0, 2].item() == pytest.approx(1.5, abs=TOL)  # per-token KL 20 clamped too


def test_kl_shaped_rewards_matches_loop_reference_on_ragged_batch():
    B = len(LENGTHS)
    logp, ref_logp = randn(B, T, seed=2), randn(B, T, seed=3)
    reward, cost = randn(B, seed=4) * 3, randn(B, seed=5) * 3
    beta, clip = 0.3, 2.0
    rewards, costs = obj.kl_shaped_rewards(reward, cost, logp, ref_logp, ragged_mask(LENGTHS), beta, clip)
    for b, n in enumerate(LENGTHS):
        for t in range(T):
            kl = logp[b, t].item() - ref_logp[b, t].item()
            r = -beta * kl + (reward[b].item() if t == n - 1 else 0.0)
            c = beta * kl + (cost[b].item() if t == n - 1 else 0.0)
            exp_r = min(max(r, -clip), clip) if t < n else 0.0
            exp_c = min(max(c, -clip), clip) if t < n else 0.0
            assert rewards[b, t].item() == pytest.approx(exp_r, abs=TOL)
            assert costs[b, t].item() == pytest.approx(exp_c, abs=TOL)


# ---------------------------------------------------------------- GAE


def test_gae_hand_case():
    values, rewards, mask = t64([[1.0, 2.0, 7.0]]), t64([[0.0, 1.0, 9.0]]), t64([[1, 1, 0]])
    adv, ret = obj.gae(values, rewards, mask, gamma=0.9, lam=0.5)
    # t=1: delta = 1 + 0.9*0 - 2 = -1, A = -1
    # t=0: delta = 0 + 0.9*2 - 1 = 0.8, A = 0.8 + 0.9*0.5*(-1) = 0.35
    assert torch.allclose(adv, t64([[0.35, -1.0, 0.0]]), atol=TOL, rtol=0)
    assert torch.allclose(ret, t64([[1.35, 1.0, 0.0]]), atol=TOL, rtol=0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5)])
def test_gae_matches_loop_reference_on_ragged_batch(gamma, lam):
    B = len(LENGTHS)
    values, rewards = randn(B, T, seed=6), randn(B, T, seed=7)  # garbage past the mask on purpose
    adv, ret = obj.gae(values, rewards, ragged_mask(LENGTHS), gamma, lam)
    ref_adv, ref_ret = ref_gae(values.tolist(), rewards.tolist(), LENGTHS, gamma, lam)
    assert torch.allclose(adv, t64(ref_adv), atol=TOL, rtol=0)
    assert torch.allclose(ret, t64(ref_ret), atol=TOL, rtol=0)


def test_gae_carries_no_gradient():
    values = randn(2, T, seed=8).requires_grad_()
    adv, ret = obj.gae(values, randn(2, T, seed=9), ragged_mask([5, 1]), 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


# ---------------------------------------------------------------- policy loss

# log-ratios giving ratios well inside, at the edge of, and outside [0.8, 1.2]
LOG_RATIOS = [[math.log(r) for r in row] for row in [
    [0.5, 0.95, 1.0, 1.1, 1.5],
    [1.5, 2.0, 2.0, 2.0, 2.0],
    [0.7, 1.25, 0.9, 3.0, 3.0],
    [1.19, 0.81, 0.6, 1.4, 1.0],
]]


def policy_inputs():
    B = len(LENGTHS)
    old_logp = randn(B, T, seed=10)
    logp = old_logp + t64(LOG_RATIOS)
    return logp, old_logp, randn(B, T, seed=11), randn(B, T, seed=12), ragged_mask(LENGTHS)


def test_policy_loss_hand_case_clipping():
    eps = 0.2
    logp = t64([[math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)]])
    old, mask = torch.zeros(1, 4, dtype=torch.float64), torch.ones(1, 4)
    a_r = t64([[1.0, -1.0, 1.0, -1.0]])
    # ratio 1.5, A=1: min(1.5, 1.2) = 1.2 -> -1.2;  ratio 1.5, A=-1: min(-1.5, -1.2) -> +1.5
    # ratio 0.5, A=1: min(0.5, 0.8) = 0.5 -> -0.5;  ratio 0.5, A=-1: min(-0.5, -0.8) -> +0.8
    expected = (-1.2 + 1.5 - 0.5 + 0.8) / 4
    assert obj.ppo_lag_policy_loss(logp, old, a_r, None, mask, 0.0, eps).item() == pytest.approx(expected, abs=TOL)
    # lambda = 3 with A_r = 2, A_c = -2: A = (2 + 3*2) / 4 = 2 on every token -> each term doubles
    a = obj.ppo_lag_policy_loss(logp, old, 2 * torch.ones(1, 4), -2 * torch.ones(1, 4), mask, 3.0, eps)
    # A=2: ratio 1.5 -> -min(3, 2.4) = -2.4; ratio 0.5 -> -min(1, 1.6) = -1
    assert a.item() == pytest.approx((-2.4 - 2.4 - 1.0 - 1.0) / 4, abs=TOL)


@pytest.mark.parametrize("lam", [0.0, 1.0, 3.0])
def test_policy_loss_matches_loop_reference(lam):
    logp, old_logp, a_r, a_c, mask = policy_inputs()
    loss = obj.ppo_lag_policy_loss(logp, old_logp, a_r, a_c, mask, lam, 0.2)
    expected = ref_policy_loss(logp.tolist(), old_logp.tolist(), a_r.tolist(), a_c.tolist(), LENGTHS, lam, 0.2)
    assert loss.item() == pytest.approx(expected, abs=TOL)


def test_policy_loss_depends_on_cost_advantages_when_lambda_positive():
    logp, old_logp, a_r, a_c, mask = policy_inputs()
    with_cost = obj.ppo_lag_policy_loss(logp, old_logp, a_r, a_c, mask, 1.0, 0.2)
    without = obj.ppo_lag_policy_loss(logp, old_logp, a_r, None, mask, 1.0, 0.2)
    assert abs(with_cost.item() - without.item()) > 1e-3


def test_policy_loss_reduces_to_ppo_when_lambda_zero_or_no_cost():
    logp, old_logp, a_r, a_c, mask = policy_inputs()
    ppo = ref_policy_loss(logp.tolist(), old_logp.tolist(), a_r.tolist(), None, LENGTHS, 0.0, 0.2)
    lam0 = obj.ppo_lag_policy_loss(logp, old_logp, a_r, a_c, mask, 0.0, 0.2)
    no_cost = obj.ppo_lag_policy_loss(logp, old_logp, a_r, None, mask, 5.0, 0.2)  # lambda unused without A_c
    assert lam0.item() == pytest.approx(ppo, abs=TOL)
    assert no_cost.item() == pytest.approx(ppo, abs=TOL)


def test_policy_loss_gradient_flows_to_logp_only():
    logp, old_logp, a_r, a_c, mask = policy_inputs()
    plain = obj.ppo_lag_policy_loss(logp, old_logp, a_r, a_c, mask, 1.0, 0.2)
    logp = logp.clone().requires_grad_()
    a_r, a_c = a_r.clone().requires_grad_(), a_c.clone().requires_grad_()
    loss = obj.ppo_lag_policy_loss(logp, old_logp, a_r, a_c, mask, 1.0, 0.2)
    assert loss.item() == plain.item()  # invariant to requires_grad on advantages
    loss.backward()
    assert logp.grad is not None and torch.isfinite(logp.grad).all() and logp.grad.abs().sum() > 0
    assert (logp.grad * (1 - mask)).abs().sum() == 0  # no gradient on padding
    assert a_r.grad is None and a_c.grad is None


def test_policy_loss_without_cost_gives_no_gradient_to_advantages_or_old_logp():
    logp, old_logp, a_r, _, mask = policy_inputs()
    logp, old_logp, a_r = logp.clone().requires_grad_(), old_logp.clone().requires_grad_(), a_r.clone().requires_grad_()
    obj.ppo_lag_policy_loss(logp, old_logp, a_r, None, mask, 0.0, 0.2).backward()
    assert logp.grad.abs().sum() > 0
    assert a_r.grad is None and old_logp.grad is None


def test_policy_loss_gradient_hand_case():
    # one sequence, 2 tokens, ratio 1 on token 0 (A=1) and ratio 1.5 on token 1 (A=1, clipped branch)
    logp = t64([[0.0, math.log(1.5)]]).requires_grad_()
    loss = obj.ppo_lag_policy_loss(logp, torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2), None, torch.ones(1, 2), 0.0, 0.2)
    loss.backward()
    # d/dlogp of -(ratio * A) / 2 = -ratio * A / 2 = -0.5; clipped token has zero gradient
    assert torch.allclose(logp.grad, t64([[-0.5, 0.0]]), atol=TOL, rtol=0)


# ---------------------------------------------------------------- value loss and diagnostics


def test_clipped_value_loss_hand_case():
    old, mask = t64([[1.0, 1.0]]), torch.ones(1, 2)
    values, returns = t64([[2.0, 2.0]]), t64([[0.0, 3.0]])
    # token 0: clipped V = 1.5; max((2-0)^2, (1.5-0)^2) = 4
    # token 1: max((2-3)^2, (1.5-3)^2) = 2.25;  0.5 * mean(4, 2.25) = 1.5625
    assert obj.clipped_value_loss(values, old, returns, mask, 0.5).item() == pytest.approx(1.5625, abs=TOL)


def test_clipped_value_loss_matches_loop_reference():
    B = len(LENGTHS)
    old = randn(B, T, seed=13)
    values = old + randn(B, T, seed=14)  # many outside the +-0.3 band
    returns = randn(B, T, seed=15)
    loss = obj.clipped_value_loss(values, old, returns, ragged_mask(LENGTHS), 0.3)
    expected = ref_value_loss(values.tolist(), old.tolist(), returns.tolist(), LENGTHS, 0.3)
    assert loss.item() == pytest.approx(expected, abs=TOL)


def test_clip_fraction_counts_masked_tokens_outside_range():
    logp = torch.log(t64([[0.5, 1.0, 1.1, 1.5], [3.0, 3.0, 1.0, 1.0]]))
    mask = t64([[1, 1, 1, 1], [1, 0, 0, 0]])
    # outside [0.8, 1.2]: 0.5, 1.5, 3.0 (row 1 token 0) -> 3 of 5 masked tokens
    assert obj.clip_fraction(logp, torch.zeros_like(logp), mask, 0.2).item() == pytest.approx(3 / 5)
    assert obj.clip_fraction(logp, logp, torch.zeros_like(mask), 0.2).item() == 0.0  # no masked token


def test_approx_kl_is_masked_mean_of_log_ratio():
    logp, ref = t64([[0.0, -1.0, 9.0], [-0.5, 9.0, 9.0]]), t64([[-1.0, -1.5, 0.0], [-2.5, 0.0, 0.0]])
    mask = t64([[1, 1, 0], [1, 0, 0]])
    # row means (1 + 0.5)/2 = 0.75 and 2 -> 1.375
    assert obj.approx_kl(logp, ref, mask) == pytest.approx(1.375, abs=TOL)


# ---------------------------------------------------------------- Lagrange multiplier


def test_lagrange_lambda_rises_when_cost_above_threshold():
    m = obj.LagrangeMultiplier(init=1.0, lr=0.1, threshold=0.0)
    m.observe([1.0, 1.0])
    # log_lambda = 0 + 0.1 * 1 * (1 - 0) = 0.1
    assert m.step() == pytest.approx(math.exp(0.1), abs=TOL)
    assert m.value == pytest.approx(math.exp(0.1), abs=TOL)


def test_lagrange_lambda_falls_when_cost_below_threshold():
    m = obj.LagrangeMultiplier(init=2.0, lr=0.1, threshold=1.0)
    m.observe(t64([-1.0, 0.0]))  # mean -0.5
    # log_lambda = log 2 + 0.1 * 2 * (-0.5 - 1) = log 2 - 0.3
    assert m.step() == pytest.approx(2.0 * math.exp(-0.3), abs=TOL)


def test_lagrange_threshold_can_be_reassigned():
    m = obj.LagrangeMultiplier(init=1.0, lr=0.1, threshold=0.0)
    m.observe([1.0])
    m.threshold = 3.0
    assert m.step() < 1.0  # 1 < 3 now, so lambda falls


def test_lagrange_stays_during_delay_steps():
    m = obj.LagrangeMultiplier(init=1.0, lr=0.1, threshold=0.0, delay_steps=2)
    m.observe([5.0])
    assert m.step() == 1.0
    assert m.step() == 1.0
    assert m.step() == pytest.approx(math.exp(0.5), abs=TOL)  # 0.1 * 1 * 5


def test_lagrange_empty_window_changes_nothing():
    m = obj.LagrangeMultiplier(init=1.5, lr=0.1, threshold=0.0)
    assert m.step() == pytest.approx(1.5, abs=TOL)
    assert m.state_dict()["steps"] == 1


def test_lagrange_respects_max_value():
    m = obj.LagrangeMultiplier(init=1.0, lr=1.0, threshold=0.0, max_value=1.05)
    m.observe([10.0])
    assert m.step() == pytest.approx(1.05, abs=TOL)
    assert m.step() == pytest.approx(1.05, abs=TOL)


def test_lagrange_window_keeps_last_values():
    m = obj.LagrangeMultiplier(init=1.0, lr=0.1, threshold=0.0, window=3)
    m.observe([100.0, 1.0])
    m.observe(t64([2.0, 3.0]))
    assert m.state_dict()["window"] == [1.0, 2.0, 3.0]
    # mean 2 (the 100 has left the window): log_lambda = 0.2
    assert m.step() == pytest.approx(math.exp(0.2), abs=TOL)


def test_lagrange_state_dict_round_trip_continues_identically():
    a = obj.LagrangeMultiplier(init=0.7, lr=0.05, threshold=0.5, max_value=4.0, window=4, delay_steps=1)
    for costs in ([1.0, 2.0], [0.3], [2.5, -1.0, 0.1]):
        a.observe(costs)
        a.step()
    state = a.state_dict()
    json.dumps(state)  # plain python
    b = obj.LagrangeMultiplier(init=3.0, lr=9.0, threshold=-2.0, window=100, delay_steps=50)
    b.load_state_dict(state)
    assert b.state_dict() == state
    for costs in ([3.0, 3.0, 3.0], [-2.0], [0.4, 0.6]):
        a.observe(costs)
        b.observe(costs)
        assert a.step() == b.step()
    assert a.state_dict() == b.state_dict()
    assert len(b.state_dict()["window"]) == 4


# ---------------------------------------------------------------- algorithm registry


def test_algorithm_registry_end_reward_and_cost_critic():
    reward, cost = t64([1.0, 2.0]), t64([0.5, -1.0])
    assert torch.equal(obj.shaped_end_reward("ppo_lag", reward, cost, 2.0), reward)
    assert torch.equal(obj.shaped_end_reward("ppo", reward, cost, 2.0), reward)
    # 1 - 2*0.5 = 0, 2 - 2*(-1) = 4
    assert torch.allclose(obj.shaped_end_reward("reward_shaping", reward, cost, 2.0), t64([0.0, 4.0]), atol=TOL, rtol=0)
    assert obj.uses_cost_critic("ppo_lag")
    assert not obj.uses_cost_critic("ppo")
    assert not obj.uses_cost_critic("reward_shaping")


def test_algorithm_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="ppo_lag"):
        obj.uses_cost_critic("dpo")
    with pytest.raises(ValueError, match="reward_shaping"):
        obj.shaped_end_reward("ppo-lag", t64([1.0]), t64([1.0]), 1.0)


# ---------------------------------------------------------------- import hygiene


def test_import_loads_no_distributed_or_inference_stack():
    code = (
        "import sys, core.objectives; "
        "print(sorted(m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_linear_head_on_fixed_features_reaches_the_hand_solved_minimum():
    """One feature, 1 on the preferred answer and 0 on the other: the score gap is w, and the
    reward loss plus 0.25 w^2 is softplus(-w) + 0.25 w^2, minimal where sigma(-w) = 0.5 w."""
    lo, hi = 0.0, 2.0
    for _ in range(200):  # bisection on sigma(-w) - 0.5 w, decreasing in w
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 / (1 + math.exp(mid)) > 0.5 * mid else (lo, mid)
    w, b, loss = obj.fit_linear_head(torch.ones(5, 1), torch.zeros(5, 1), obj.reward_pair_loss, l2=0.25)
    assert w.item() == pytest.approx(lo, abs=1e-6)
    assert loss == pytest.approx(math.log1p(math.exp(-lo)) + 0.25 * lo * lo, abs=1e-9)


def test_a_linear_cost_head_with_sign_terms_is_at_a_stationary_point_of_eq6():
    """Random features, Eq. 6 with sign labels on half the rows: the fitted (w, b) has zero gradient
    of the full objective, computed afresh here, and beats the zero head."""
    g = torch.Generator().manual_seed(0)
    fa, fb = torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g) + 0.3
    a_safe, b_safe = torch.rand(40, generator=g) > 0.3, torch.rand(40, generator=g) > 0.7
    labelled = torch.arange(40) % 2 == 0

    def loss(a, b):
        return obj.cost_pair_loss(a, b, a_safe, b_safe, 0.001, has_safety_labels=labelled)

    w, b, value = obj.fit_linear_head(fa, fb, loss, l2=1e-3)
    w64 = w.double().clone().requires_grad_(True)
    b64 = b.double().clone().requires_grad_(True)
    total = loss(fa.double() @ w64 + b64, fb.double() @ w64 + b64) + 1e-3 * w64.pow(2).sum()
    total.backward()
    assert w64.grad.abs().max().item() < 1e-5 and abs(b64.grad.item()) < 1e-5
    assert total.item() == pytest.approx(value, abs=1e-6)
    assert value < loss(torch.zeros(40), torch.zeros(40)).item() - 0.05
