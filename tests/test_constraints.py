"""One constraint per harm category (issue 29, section 3): the pure math in stages/objectives.py
against hand-computed cases, and the cost model's per-category heads."""
import math

import pytest
import torch

from stages import objectives as obj


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


@pytest.mark.slow
def test_cost_fit_per_category_exports_a_head_per_frequent_category(tmp_path):
    import json

    from actors.score_model import ScoreModel
    from tests.conftest import run_cli, write_yaml

    cfg = write_yaml(tmp_path / "c.yaml", {
        "name": "cat", "world": {"n_pairs": 300, "n_sft": 200}, "model": {"small": {"vocab_size": 600}},
        "sft": {"epochs": 1}, "reward": {"epochs": 1}, "cost": {"epochs": 1, "per_category": True, "min_category_pairs": 8},
        "ray": {"num_cpus": 2, "include_dashboard": False}})
    proc = run_cli("run", "--config", cfg, "--run-dir", tmp_path / "run", "--until", "fit_cost", timeout=900)
    stage = tmp_path / "run" / "stages" / "fit_cost"
    model = ScoreModel.from_pretrained(stage / "model")
    assert len(model.categories) >= 2
    assert f"cost heads per category ({len(model.categories)}): {', '.join(model.categories)}" in proc.stderr
    metrics = json.loads((stage / "manifest.json").read_text())["metrics"]
    accuracies = {k: v for k, v in metrics.items() if k.startswith("eval_sign_accuracy_")}
    assert set(accuracies) == {f"eval_sign_accuracy_{c}" for c in model.categories}
    assert all(0.0 <= v <= 1.0 for v in accuracies.values())
