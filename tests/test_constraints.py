"""One constraint per harm category (issue 29, section 3): the pure math in core/objectives
against hand-computed cases, and the cost model's per-category heads."""
import math

import pytest
import torch

from core import objectives as obj


def sp(x):  # -log sigma(x) = log(1 + e^-x)
    return math.log1p(math.exp(-x))


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


def category_case():
    """Two pairs, two categories. Pair 0: answer 0 harmful in category 0; pair 1: answer 1 harmful in 1."""
    costs_0 = t64([[1.0, -1.0], [0.0, 2.0]])
    costs_1 = t64([[-1.0, 0.5], [0.0, -2.0]])
    in_0 = torch.tensor([[True, False], [False, False]])
    in_1 = torch.tensor([[False, False], [False, True]])
    return costs_0, costs_1, in_0, in_1


def test_category_cost_loss_hand_case():
    costs_0, costs_1, in_0, in_1 = category_case()
    labelled = torch.tensor([True, True])
    loss = obj.category_cost_loss(costs_0, costs_1, in_0, in_1, labelled, labelled)
    # category 0: pair 0 ranks the answers, C_0: 1 (harmful) against -1; sign terms: answer 0 harmful
    # (s = -1) with cost 1, not harmful with 0; answer 1 not harmful with -1 and 0
    cat0 = sp(1 - (-1)) + (sp(1.0) + sp(0.0)) / 2 + (sp(1.0) + sp(0.0)) / 2
    # category 1: pair 1 ranks them, C_1: -2 (harmful) against 2; answer 0 not harmful with -1 and 2;
    # answer 1 not harmful with 0.5, harmful with -2
    cat1 = sp(-2 - 2) + (sp(1.0) + sp(-2.0)) / 2 + (sp(-0.5) + sp(-2.0)) / 2
    assert loss.item() == pytest.approx((cat0 + cat1) / 2, abs=1e-12)


def test_category_cost_loss_leaves_out_answers_whose_categories_are_unknown():
    costs_0, costs_1, in_0, in_1 = category_case()
    known, unknown_1 = torch.tensor([True, True]), torch.tensor([True, False])  # answer 1 of pair 1 unknown
    loss = obj.category_cost_loss(costs_0, costs_1, in_0, in_1, known, unknown_1)
    moved = costs_1.clone()
    moved[1] += 7.0
    assert obj.category_cost_loss(costs_0, moved, in_0, in_1, known, unknown_1).item() == pytest.approx(loss.item(), abs=1e-12)
    # category 1 has no ranked pair left (its term is 0, not a nan)
    assert math.isfinite(loss.item())


def test_category_cost_loss_pushes_harmful_costs_up_in_their_category_only():
    costs_0, costs_1, in_0, in_1 = category_case()
    costs_0 = costs_0.clone().requires_grad_(True)
    labelled = torch.tensor([True, True])
    obj.category_cost_loss(costs_0, costs_1, in_0, in_1, labelled, labelled).backward()
    assert costs_0.grad[0, 0] < 0  # harmful in category 0: descending the loss raises C_0
    assert costs_0.grad[0, 1] > 0  # not harmful in category 1: lowers C_1


def test_lambda_weighted_cost_advantage_hand_case():
    a_c = t64([[[1.0, 2.0]], [[3.0, -1.0]]])  # [K=2, B=1, T=2]
    lambdas = t64([0.5, 1.5])
    combined, lam = obj.category_cost_advantage(a_c, lambdas)
    # sum_k lambda_k A_c,k = (0.5 + 4.5, 1 - 1.5) = (5, -0.5); lambda = 2
    assert lam == 2.0
    assert torch.allclose(combined, t64([[2.5, -0.25]]), atol=1e-12, rtol=0)
    # in ppo_lag's loss: (A_r - lambda A_c) / (1 + lambda) = (A_r - sum_k lambda_k A_c,k) / (1 + sum_k lambda_k)
    a_r = t64([[1.0, 1.0]])
    assert torch.allclose((a_r - lam * combined) / (1 + lam), (a_r - t64([[5.0, -0.5]])) / 3.0, atol=1e-12, rtol=0)
    zero, lam0 = obj.category_cost_advantage(a_c, t64([0.0, 0.0]))
    assert lam0 == 0.0 and torch.equal(zero, torch.zeros(1, 2, dtype=torch.float64))


def test_category_multipliers_move_apart_on_their_own_episode_costs():
    m = obj.CategoryMultipliers(["privacy", "weapons"], init=1.0, lr=0.1, thresholds=[0.0, 1.0])
    m.observe(t64([[1.0, 0.0], [3.0, 0.0]]))  # mean costs 2 and 0
    lam = m.step()
    # log lambda_k += lr * lambda_k * (J_k - d_k): +0.2 for privacy, -0.1 for weapons
    assert lam.tolist() == pytest.approx([math.exp(0.2), math.exp(-0.1)], abs=1e-12)
    again = obj.CategoryMultipliers(["privacy", "weapons"], init=1.0, lr=0.1, thresholds=[0.0, 1.0])
    again.load_state_dict(m.state_dict())
    assert torch.equal(again.values, m.values)
    with pytest.raises(ValueError, match="categories"):
        obj.CategoryMultipliers(["weapons"], 1.0, 0.1, [0.0]).load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="thresholds"):
        obj.CategoryMultipliers(["a", "b"], 1.0, 0.1, [0.0])


def test_category_multipliers_give_the_loss_their_sum_and_each_window():
    m = obj.CategoryMultipliers(["shared", "weapons"], init=1.0, lr=0.1, thresholds=[-1.0, 2.0], max_value=5.0, window=2)
    assert m.value == 2.0 and m.threshold == -1.0 and m.thresholds == [-1.0, 2.0]
    lam = obj.lagrangian_update(m, t64([[1.0, 4.0], [3.0, 0.0], [5.0, 0.0]]))  # the algorithms' update, on [B, K]
    # windows of 2 keep the last two costs: J = (4, 0); log lambda += 0.1 * 1 * (J - d): +0.5 and -0.2
    assert m.window_means() == [4.0, 0.0]
    assert lam.tolist() == pytest.approx([math.exp(0.5), math.exp(-0.2)], abs=1e-12)
    assert m.value == pytest.approx(math.exp(0.5) + math.exp(-0.2), abs=1e-12)


def grouped_scores(reward, costs, values=None):
    """B answers of one token each, no KL (logp = ref_logp), for the advantage estimators."""
    b = len(reward)
    zeros = torch.zeros(b, 1, dtype=torch.float64)
    costs = torch.as_tensor(costs, dtype=torch.float64)
    return obj.StepScores(t64(reward), costs[:, 0], zeros, zeros, torch.ones(b, 1, dtype=torch.float64),
                          None if values is None else values[0], None if values is None else values[1])


def test_grpo_lag_per_category_normalises_each_cost_in_its_group_then_weights_them():
    hp = obj.AdvantageSettings(kl_coeff=0.0, clip_score=50.0, group_size=3)
    costs = t64([[0.0, 0.0], [1.0, 0.0], [2.0, 3.0]])  # one group of three answers; [B, K]
    s = grouped_scores([1.0, 2.0, 3.0], costs)
    adv, lam = obj.ALGORITHMS["grpo_lag"].constrained_advantages(s, costs, t64([1.0, 3.0]), hp)
    # column 0: (0, 1, 2), mean 1, population std sqrt(2/3): (-1.2247, 0, 1.2247)
    # column 1: (0, 0, 3), mean 1, std sqrt(2): (-0.7071, -0.7071, 1.4142)
    a0 = [(x - 1.0) / (math.sqrt(2 / 3) + 1e-6) for x in (0.0, 1.0, 2.0)]
    a1 = [(x - 1.0) / (math.sqrt(2.0) + 1e-6) for x in (0.0, 0.0, 3.0)]
    expected = [(1 * u + 3 * v) / 4 for u, v in zip(a0, a1)]  # sum_k lambda_k A_c,k / sum_k lambda_k
    assert lam == 4.0
    assert adv.cost[:, 0].tolist() == pytest.approx(expected, abs=1e-9)
    capped, lam_capped = obj.ALGORITHMS["grpo_lag"].constrained_advantages(s, costs, t64([1.0, 3.0]), hp, max_lambda=2.5)
    assert lam_capped == 2.5 and torch.equal(capped.cost, adv.cost)  # lambda_max caps the sum, not the weights
    assert expected == pytest.approx([-0.8365, -0.5303, 1.3668], abs=1e-4)
    assert adv.reward[:, 0].tolist() == pytest.approx(a0, abs=1e-9)  # rewards (1, 2, 3) normalise as column 0
    # normalising the mix instead would give other advantages: the order matters
    mixed = obj.group_normalized((costs * t64([0.25, 0.75])).sum(1), 3)
    assert (mixed - adv.cost[:, 0]).abs().max() > 0.05


def test_ppo_lag_per_category_cost_advantage_is_the_lambda_weighted_sum_where_the_critic_learned_the_mix():
    hp = obj.AdvantageSettings(kl_coeff=0.05, clip_score=50.0, gamma=1.0, gae_lambda=0.95)
    g = torch.Generator().manual_seed(0)
    b, t, k = 4, 5, 3
    costs = torch.randn(b, k, generator=g, dtype=torch.float64)
    values = torch.randn(k, b, t, generator=g, dtype=torch.float64)  # a value per cost column
    lambdas = t64([0.5, 2.0, 1.5])
    logp = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.float64)
    mask[0, 3:] = 0.0
    w = lambdas / lambdas.sum()
    mixed_values = (w.view(k, 1, 1) * values).sum(0)
    s = obj.StepScores(torch.randn(b, generator=g, dtype=torch.float64), costs[:, 0], logp, logp - 0.1, mask,
                       torch.randn(b, t, generator=g, dtype=torch.float64), mixed_values)
    ppo_lag = obj.ALGORITHMS["ppo_lag"]
    adv, lam = ppo_lag.constrained_advantages(s, costs, lambdas, hp)
    assert lam == pytest.approx(4.0)
    # independently: GAE of each column with its own values, then sum_k lambda_k A_c,k / lambda
    from dataclasses import replace

    each = torch.stack([ppo_lag.advantages(replace(s, cost=costs[:, j], cost_values=values[j]), hp).cost for j in range(k)])
    torch.testing.assert_close(adv.cost, (lambdas.view(k, 1, 1) * each).sum(0) / lam, atol=1e-12, rtol=0)
    # the reward side is the one-constraint round's
    torch.testing.assert_close(adv.reward, ppo_lag.advantages(s, hp).reward, atol=0, rtol=0)


def test_per_category_constraints_refuse_an_unconstrained_algorithm():
    s = grouped_scores([1.0, 2.0], [[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="constrained algorithm"):
        obj.ALGORITHMS["ppo"].constrained_advantages(s, t64([[0.0, 1.0], [1.0, 0.0]]), t64([1.0, 1.0]),
                                                     obj.AdvantageSettings(0.0, 50.0))


def test_auto_thresholds_per_constraint_hand_case():
    # four reference answers: two safe, one harmful in weapons, one harmful in privacy; columns: shared, weapons, privacy
    costs = [[-2.0, -1.0, -3.0], [-4.0, -3.0, -1.0], [2.0, 5.0, 0.0], [4.0, 1.0, 2.0]]
    safe = [True, True, False, False]
    harmful = [[False, False, False], [False, False, False], [True, True, False], [True, False, True]]
    (d0, s0, u0, n0), (d1, s1, u1, n1), (d2, s2, u2, n2) = obj.auto_constraint_thresholds(costs, safe, harmful, 0.1)
    # shared: safe mean -3, unsafe mean 3 -> 0.9 * -3 + 0.1 * 3 = -2.4
    assert (s0, u0, n0) == (-3.0, 3.0, 2) and d0 == pytest.approx(-2.4)
    # weapons: safe mean -2, harmful in weapons: 5 alone (the privacy answer is left out) -> -1.3
    assert (s1, u1, n1) == (-2.0, 5.0, 1) and d1 == pytest.approx(-1.3)
    # privacy: safe mean -2, harmful in privacy: 2 -> -1.6
    assert (s2, u2, n2) == (-2.0, 2.0, 1) and d2 == pytest.approx(-1.6)
    # a category no reference answer is harmful in takes every unsafe answer
    _, (d, sm, um, n) = obj.auto_constraint_thresholds([c[:2] for c in costs], safe, [[h[0], False] for h in harmful], 0.1)
    assert (sm, um, n) == (-2.0, 3.0, 0) and d == pytest.approx(0.9 * -2.0 + 0.1 * 3.0)


def test_config_per_category_constraints_need_category_heads_and_a_constraint():
    from pipeline.config import ConfigError, parse_config as validate_config

    with pytest.raises(ConfigError) as err:
        validate_config({"safe_rlhf": {"constraints": "per_category"}}, "c.yaml")
    assert any(path == "safe_rlhf.constraints" and "cost.per_category" in msg for path, msg in err.value.errors)
    with pytest.raises(ConfigError) as err:
        validate_config({"cost": {"per_category": True}, "safe_rlhf": {"algorithm": "ppo", "constraints": "per_category"}}, "c.yaml")
    assert any("ppo has no cost constraint" in msg for _, msg in err.value.errors)
    with pytest.raises(ConfigError) as err:
        validate_config({"safe_rlhf": {"constraints": "per_categroy"}}, "c.yaml")
    assert any(path == "safe_rlhf.constraints" for path, _ in err.value.errors)
    ok = validate_config({"cost": {"per_category": True}, "safe_rlhf": {"algorithm": "grpo_lag", "constraints": "per_category"}}, "c.yaml")
    assert ok.safe_rlhf.constraints == "per_category"


# ---------------------------------------------------------------- the cost model's heads


def test_score_model_without_categories_is_as_before(small_model_dir, tmp_path):
    from actors.score_model import CATEGORY_HEAD, ScoreModel

    model = ScoreModel.from_backbone(small_model_dir, "cost", seed=0)
    assert not any(k.startswith("category_head") for k in model.state_dict())
    model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / CATEGORY_HEAD).exists()
    assert "categories" not in (tmp_path / "m" / "score_config.json").read_text()


def test_per_category_cost_model_saves_and_reloads_its_heads(small_model_dir, tmp_path):
    from actors.experience import pad
    from actors.score_model import ScoreModel

    plain = ScoreModel.from_backbone(small_model_dir, "cost", seed=0)
    model = ScoreModel.from_backbone(small_model_dir, "cost", seed=0, categories=("privacy", "weapons", "fraud"))
    assert torch.equal(model.score_head.weight, plain.score_head.weight)  # the shared head draws first, as before
    with torch.no_grad():
        model.category_head.bias.copy_(torch.tensor([0.5, -0.5, 1.0]))
    ids, mask = pad([[5, 6, 7, 8], [9, 10]], 0)
    shared, per_category = model.category_scores(ids, mask)
    assert per_category.shape == (2, 3)
    assert torch.equal(shared, model(ids, mask)[1])  # the shared head as forward gives it
    model.save_pretrained(tmp_path / "m")
    again = ScoreModel.from_pretrained(tmp_path / "m")
    assert again.categories == ("privacy", "weapons", "fraud")
    torch.testing.assert_close(again.category_scores(ids, mask)[1], per_category, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no per-category heads"):
        plain.category_scores(ids, mask)


def test_scorer_gives_the_shared_cost_then_each_category_from_one_pass(small_model_dir, tmp_path):
    from actors.experience import SequenceBatch
    from actors.score_model import ScoreModel, score_model_categories
    from actors.scorer import Scorer

    model = ScoreModel.from_backbone(small_model_dir, "cost", seed=0, categories=("privacy", "weapons"))
    with torch.no_grad():
        model.category_head.bias.copy_(torch.tensor([3.0, -3.0]))
    model.save_pretrained(tmp_path / "m")
    assert score_model_categories(tmp_path / "m") == ("privacy", "weapons")
    scorer = Scorer("cost", str(tmp_path / "m"))
    batch = SequenceBatch.from_ids([[5, 6], [7]], [[8, 9, 10], [11]], pad_id=0)
    both = scorer.score(batch, categories=True)
    assert both.shape == (2, 3)
    assert torch.equal(both[:, 0], scorer.score(batch))  # column 0: the shared head, as the one-constraint round reads it
    shared, per_category = model.category_scores(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(both[:, 1:], per_category.float(), atol=0, rtol=0)
    assert (both[:, 1] - both[:, 2]).min() > 5.0  # the heads' biases (+3, -3) came through, in head order


# ---------------------------------------------------------------- the per-category cost fit


def test_category_heads_count_the_labelled_pairs_that_rank_each_category():
    from stages.fit_preference import category_heads, pair_categories

    def row(c0, c1, safe0, safe1, safer=0):
        return {"response_0_harm_category": c0, "response_1_harm_category": c1, "is_response_0_safe": safe0,
                "is_response_1_safe": safe1, "safer_response_id": safer}

    rows = [row([], ["privacy"], True, False),  # ranks privacy
            row(["privacy"], ["privacy", "weapons"], False, False, safer=0),  # ranks weapons (the safer lacks it)
            row([], ["weapons"], True, False),  # ranks weapons
            row([], [], True, False),  # unsafe with no categories listed: unknown, ranks nothing
            row(["fraud"], [], False, None, safer=1)]  # the other answer unlabelled: ranks nothing
    items = [pair_categories(r, r["safer_response_id"]) for r in rows]
    assert items[0] == {"a_cats": [], "b_cats": ["privacy"], "cats_known": [True, True]}
    assert items[4] == {"a_cats": [], "b_cats": ["fraud"], "cats_known": [False, True]}
    assert category_heads(items, 2) == (["weapons"], {"fraud": 0, "privacy": 1})
    assert category_heads(items, 1) == (["privacy", "weapons"], {"fraud": 0})


def test_category_sign_accuracy_per_head():
    from stages.fit_preference import category_sign_metrics

    items = [{"a_cats": [], "b_cats": ["privacy"], "cats_known": [True, True]},
             {"a_cats": [], "b_cats": ["weapons"], "cats_known": [True, False]}]
    a = [[-1.0, -1.0], [-2.0, 0.5]]  # preferred answers: not harmful anywhere; 0.5 is wrong in weapons
    b = [[3.0, -1.0], [9.0, 9.0]]  # pair 1's other answer is unknown: left out
    m = category_sign_metrics(items, a, b, ["privacy", "weapons"])
    assert m == {"eval_sign_accuracy_privacy": 1.0, "eval_sign_accuracy_weapons": pytest.approx(2 / 3)}
