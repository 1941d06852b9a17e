"""The algorithm registry (core/objectives, ALGORITHMS): each algorithm one object that the round,
its actors, the plan, the config and the graph read; grpo_lag's formulas against hand-computed cases."""
import math
from types import SimpleNamespace

import pytest
import torch

from core import objectives as obj

TOL = 1e-9


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


def mask_of(lengths, width):
    return t64([[1.0 if t < n else 0.0 for t in range(width)] for n in lengths])


# ---------------------------------------------------------------- group normalisation (grpo_lag)


def test_group_normalized_hand_case_population_std():
    # one group of 3: mean 3, population std sqrt((9 + 0 + 9) / 3) = sqrt(6)
    a = obj.group_normalized(t64([0.0, 3.0, 6.0]), 3, eps=0.0)
    assert torch.allclose(a, t64([-3 / math.sqrt(6), 0.0, 3 / math.sqrt(6)]), atol=TOL, rtol=0)
    # two groups of 2 are normalised apart: (1, 3) -> (-1, 1); (10, 30) -> (-1, 1)
    a = obj.group_normalized(t64([1.0, 3.0, 10.0, 30.0]), 2, eps=0.0)
    assert torch.allclose(a, t64([-1.0, 1.0, -1.0, 1.0]), atol=TOL, rtol=0)


def test_group_normalized_eps_keeps_an_all_equal_group_at_zero():
    a = obj.group_normalized(t64([2.0, 2.0, 2.0, 2.0, 1.0, 5.0]), 2)  # groups (2, 2), (2, 2), (1, 5)
    assert torch.equal(a[:4], torch.zeros(4, dtype=torch.float64))
    # eps in the denominator: (5 - 3) / (2 + eps)
    assert a[5].item() == pytest.approx(2.0 / (2.0 + obj.GROUP_STD_EPS), abs=1e-12)


def test_group_normalized_batch_scale_keeps_a_near_tie_small():
    # groups (0, 3, 6) and (1, 1, 1.3): deviations (-3, 0, 3) and (-0.1, -0.1, 0.2); batch std
    # sqrt((9 + 0 + 9 + 0.01 + 0.01 + 0.04) / 6) = sqrt(18.06 / 6), one divisor for both groups
    x = t64([0.0, 3.0, 6.0, 1.0, 1.0, 1.3])
    std = math.sqrt(18.06 / 6)
    a = obj.group_normalized(x, 3, eps=0.0, scale="batch")
    assert torch.allclose(a, t64([-3, 0, 3, -0.1, -0.1, 0.2]) / std, atol=TOL, rtol=0)
    # per group, the near tie is blown up to the same unit spread as the real gap
    g = obj.group_normalized(x, 3, eps=0.0)
    assert torch.allclose(g[3:], t64([-1 / math.sqrt(2), -1 / math.sqrt(2), math.sqrt(2)]), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="scale"):
        obj.group_normalized(x, 3, scale="prompt")


def test_grpo_lag_advantages_read_group_scale():
    s = obj.StepScores(reward=t64([1.0, 0.0, 0.0, 0.0]), logp=torch.zeros(4, 2, dtype=torch.float64), ref_logp=torch.zeros(4, 2, dtype=torch.float64),
                       mask=torch.ones(4, 2, dtype=torch.float64), cost=t64([0.0, 2.0, 1.0, 1.1]))
    reward = t64([1.0, 0.0, 0.0, 0.0])
    group = obj.group_advantages(s, reward, obj.AdvantageSettings(kl_coeff=0.0, clip_score=10.0, group_size=2))
    batch = obj.group_advantages(s, reward, obj.AdvantageSettings(kl_coeff=0.0, clip_score=10.0, group_size=2,
                                                                   group_scale="batch"))
    assert group.cost[2, 0].item() == pytest.approx(-1.0, abs=1e-3)  # a 0.1 gap at unit spread
    # batch: cost deviations (-1, 1, -0.05, 0.05), std sqrt((1 + 1 + 0.0025 + 0.0025) / 4)
    assert batch.cost[2, 0].item() == pytest.approx(-0.05 / math.sqrt(2.005 / 4), abs=1e-6)


def test_group_normalized_refuses_a_partial_group():
    with pytest.raises(ValueError, match="whole groups"):
        obj.group_normalized(t64([1.0, 2.0, 3.0]), 2)


def grpo_case():
    """4 answers, 2 prompts (groups of 2), T = 3, beta = 0.1.
    log-ratio sums: 1, 2, 0, 3; end rewards R = 1, 0, 2, 2; end costs C = -1, 1, 1.3, 0.7."""
    lengths = [2, 1, 3, 3]
    mask = mask_of(lengths, 3)
    kl = t64([[0.5, 0.5, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    ref = torch.zeros(4, 3, dtype=torch.float64)
    s = obj.StepScores(reward=t64([1.0, 0.0, 2.0, 2.0]), cost=t64([-1.0, 1.0, 1.3, 0.7]), logp=kl * mask,
                       ref_logp=ref, mask=mask)
    return s, obj.AdvantageSettings(kl_coeff=0.1, clip_score=50.0, group_size=2), lengths


def test_grpo_lag_advantages_hand_case():
    s, hp, lengths = grpo_case()
    adv = obj.get_algorithm("grpo_lag").advantages(s, hp)
    # episode reward totals R - beta * sum KL: 0.9, -0.2 | 2.0, 1.7 -> mean 0.35, std 0.55 | mean 1.85, std 0.15
    e = obj.GROUP_STD_EPS
    a_r = [0.55 / (0.55 + e), -0.55 / (0.55 + e), 0.15 / (0.15 + e), -0.15 / (0.15 + e)]
    # episode cost totals C + beta * sum KL: -0.9, 1.2 | 1.3, 1.0 -> std 1.05 | 0.15
    a_c = [-1.05 / (1.05 + e), 1.05 / (1.05 + e), 0.15 / (0.15 + e), -0.15 / (0.15 + e)]
    for b, n in enumerate(lengths):  # every token of an answer gets its answer's advantage, none off the mask
        assert adv.reward[b].tolist() == pytest.approx([a_r[b]] * n + [0.0] * (3 - n), abs=1e-9)
        assert adv.cost[b].tolist() == pytest.approx([a_c[b]] * n + [0.0] * (3 - n), abs=1e-9)
    assert adv.reward_returns is None and adv.cost_returns is None  # no critics


def test_grpo_lag_combines_after_normalisation_and_the_policy_gradient_is_the_hand_value():
    """(A_r - lambda A_c) / (1 + lambda) with lambda 0.5, at ratio 1 (inside the clip):
    answers 1..4: (1 + 0.5) / 1.5 = 1, (-1 - 0.5) / 1.5 = -1, (1 - 0.5) / 1.5 = 1/3, -1/3 (eps aside).
    d loss / d logp[b, t] = -A_b / (n_b * B)."""
    s, hp, lengths = grpo_case()
    alg = obj.get_algorithm("grpo_lag")
    adv = alg.advantages(s, hp)
    logp = s.logp.clone().requires_grad_(True)
    loss = alg.policy_loss(logp, s.logp, adv.reward, adv.cost, s.mask, 0.5, 0.2)
    loss.backward()
    combined = [1.0, -1.0, 1 / 3, -1 / 3]
    for b, n in enumerate(lengths):
        want = [-combined[b] / (n * 4)] * n + [0.0] * (3 - n)
        assert logp.grad[b].tolist() == pytest.approx(want, abs=1e-6)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # each group's advantages sum to zero at ratio 1


def test_grpo_lag_advantages_do_not_depend_on_the_other_groups():
    s, hp, _ = grpo_case()
    alg = obj.get_algorithm("grpo_lag")
    first = alg.advantages(s, hp)
    s2 = obj.StepScores(reward=s.reward + t64([0, 0, 100.0, -50.0]), cost=s.cost, logp=s.logp, ref_logp=s.ref_logp,
                        mask=s.mask)
    again = alg.advantages(s2, hp)
    assert torch.equal(first.reward[:2], again.reward[:2]) and torch.equal(first.cost, again.cost)


def test_lambda_update_is_ppo_lags_for_grpo_lag_and_absent_for_the_baselines():
    def multiplier():
        return obj.LagrangeMultiplier(init=1.0, lr=0.1, threshold=0.0)

    for name in ("ppo_lag", "grpo_lag"):
        m = multiplier()
        lam = obj.get_algorithm(name).update_multiplier(m, t64([1.0, 3.0]))
        assert lam == pytest.approx(math.exp(0.1 * 1.0 * 2.0), abs=1e-12)  # log lambda += lr * lambda * (2 - 0)
        assert list(m.window) == [1.0, 3.0]
    for name in ("ppo", "reward_shaping"):
        m = multiplier()
        assert obj.get_algorithm(name).update_multiplier(m, t64([1.0, 3.0])) == 0.0
        assert m.value == 1.0 and not m.window and m.steps == 0


# ---------------------------------------------------------------- the old algorithms, unchanged


@pytest.mark.parametrize("name", ["ppo_lag", "ppo", "reward_shaping"])
def test_critic_algorithms_give_the_bits_of_kl_shaping_then_gae(name):
    """What round.compute_advantages computed before the registry, written out."""
    g = torch.Generator().manual_seed(0)
    B, T = 4, 5
    mask = mask_of([5, 1, 3, 4], T).float()
    reward, cost = torch.randn(B, generator=g), torch.randn(B, generator=g)
    logp, ref, rv, cv = (torch.randn(B, T, generator=g) for _ in range(4))
    alg = obj.get_algorithm(name)
    cost_in = cost if alg.uses_cost_model else None
    cost_values = cv if alg.uses_cost_critic else None
    hp = obj.AdvantageSettings(kl_coeff=0.01, clip_score=50.0, gamma=1.0, gae_lambda=0.95, shaping_nu=2.0)
    adv = alg.advantages(obj.StepScores(reward, cost_in, logp, ref, mask, rv, cost_values), hp)
    end = obj.shaped_end_reward(name, reward, cost_in, 2.0)
    rewards, costs = obj.kl_shaped_rewards(end, cost_in if cost_in is not None else torch.zeros_like(reward), logp, ref,
                                           mask, 0.01, 50.0)
    a_r, ret_r = obj.gae(rv, rewards, mask, 1.0, 0.95)
    assert torch.equal(adv.reward, a_r) and torch.equal(adv.reward_returns, ret_r)
    if name == "ppo_lag":
        a_c, ret_c = obj.gae(cv, costs, mask, 1.0, 0.95)
        assert torch.equal(adv.cost, a_c) and torch.equal(adv.cost_returns, ret_c)
    else:
        assert adv.cost is None and adv.cost_returns is None


# ---------------------------------------------------------------- what the rest of the house reads


def test_each_algorithm_names_its_roles():
    roles = {n: (a.learner_roles, a.scorer_roles, a.constrained) for n, a in obj.ALGORITHMS.items()}
    assert roles == {
        "ppo_lag": (("policy", "reward_critic", "cost_critic"), ("reward", "reference", "cost"), True),
        "ppo": (("policy", "reward_critic"), ("reward", "reference"), False),
        "reward_shaping": (("policy", "reward_critic"), ("reward", "reference", "cost"), False),
        "grpo_lag": (("policy",), ("reward", "reference", "cost"), True),
    }
    assert [a.answers_per_prompt(4) for a in obj.ALGORITHMS.values()] == [1, 1, 1, 4]


def test_grpo_lag_round_has_five_actors_and_ppo_lag_seven():
    from pipeline.config import parse_config
    from stages.safe_rlhf.resources import resource_plan

    names = {alg: [a.name for a in resource_plan(parse_config({"name": "t", "safe_rlhf": {"algorithm": alg}}).safe_rlhf).actors]
             for alg in ("ppo_lag", "grpo_lag")}
    assert names["grpo_lag"] == ["rollout-0", "scorer-reward-0", "scorer-reference-0", "scorer-cost-0", "learner-policy-0"]
    assert len(names["ppo_lag"]) == 7


def test_config_lists_the_registry_and_checks_whole_groups():
    from pipeline.config import ConfigError, parse_config
    from stages.safe_rlhf.settings import SafeRLHFConfig

    assert set(SafeRLHFConfig.model_fields["algorithm"].annotation.__args__) == set(obj.ALGORITHMS)
    cfg = parse_config({"name": "t", "safe_rlhf": {"algorithm": "grpo_lag", "prompts_per_step": 16, "group_size": 8}})
    assert cfg.safe_rlhf.group_size == 8
    with pytest.raises(ConfigError, match="must be a multiple"):
        parse_config({"name": "t", "safe_rlhf": {"algorithm": "grpo_lag", "prompts_per_step": 18}})
    with pytest.raises(ConfigError) as e:
        parse_config({"name": "t", "safe_rlhf": {"group_size": 1}})
    assert [p for p, _ in e.value.errors] == ["safe_rlhf.group_size"]
    parse_config({"name": "t", "safe_rlhf": {"prompts_per_step": 18}})  # ppo_lag samples no groups


def test_group_size_is_in_a_rounds_fingerprint_only_where_it_samples_groups():
    from pipeline.config import parse_config
    from pipeline.graph import build_graph

    def round_keys(alg):
        spec = next(s for s in build_graph(parse_config({"name": "t", "safe_rlhf": {"algorithm": alg}}))
                    if s.name == "safe_rlhf@1")
        return spec.config_keys, spec.deps

    ppo_lag, grpo_lag = round_keys("ppo_lag"), round_keys("grpo_lag")
    assert "safe_rlhf.group_size" not in ppo_lag[0] and "safe_rlhf.group_size" in grpo_lag[0]
    assert "fit_cost" in grpo_lag[1]


def test_constraints_are_in_a_rounds_fingerprint_only_where_it_keeps_per_category_ones():
    """A run made before safe_rlhf.constraints existed keeps its rounds (and their checkpoints) on resume."""
    from pipeline.config import parse_config
    from pipeline.graph import build_graph

    def keys(constraints):
        graph = build_graph(parse_config({"name": "t", "cost": {"per_category": True}, "evaluate": {"baselines": True},
                                          "safe_rlhf": {"constraints": constraints}}))
        return {s.name: s.config_keys for s in graph if s.base_name in ("safe_rlhf", "baseline_ppo", "baseline_reward_shaping")}

    single, per_category = keys("single"), keys("per_category")
    assert not any("safe_rlhf.constraints" in k for k in single.values())
    assert all("safe_rlhf.constraints" in per_category[n] for n in per_category if n.startswith("safe_rlhf@"))
    assert "safe_rlhf.constraints" not in per_category["baseline_ppo"]  # baselines run with one constraint or none


def test_group_scale_is_in_a_rounds_fingerprint_only_off_its_default_and_grouped():
    from pipeline.config import parse_config
    from pipeline.graph import build_graph

    def keys(algorithm, scale):
        graph = build_graph(parse_config({"name": "t", "safe_rlhf": {"algorithm": algorithm, "group_scale": scale}}))
        return [s.config_keys for s in graph if s.base_name == "safe_rlhf"]

    assert not any("safe_rlhf.group_scale" in k for k in keys("grpo_lag", "group"))  # earlier runs keep their rounds
    assert all("safe_rlhf.group_scale" in k for k in keys("grpo_lag", "batch"))
    assert not any("safe_rlhf.group_scale" in k for k in keys("ppo_lag", "batch"))  # no groups: it changes nothing



def test_a_field_marked_added_is_in_a_rounds_fingerprint_only_off_its_default():
    # safe_rlhf.max_grad_norm came after runs were made: at its default a round's fingerprint is as before.
    from pipeline.config import parse_config
    from pipeline.graph import build_graph

    def keys(**rl):
        return [s.config_keys for s in build_graph(parse_config({"name": "t", "safe_rlhf": rl})) if s.base_name == "safe_rlhf"]

    assert keys() == keys(max_grad_norm=1.0) and not any("safe_rlhf.max_grad_norm" in k for k in keys())
    assert all("safe_rlhf.max_grad_norm" in k for k in keys(max_grad_norm=0.5))

def test_grpo_lag_step_samples_whole_groups_of_one_prompt():
    from stages.safe_rlhf.round import step_inputs
    from stages.safe_rlhf.setup import step_prompts

    pool = [f"p{i}" for i in range(10)]

    def setup(alg):
        rl = SimpleNamespace(algorithm=alg, group_size=4, prompts_per_step=8, max_new_tokens=8, temperature=1.0, top_p=1.0)
        return SimpleNamespace(rl=rl, round=1, pool=pool)

    grouped, _ = step_inputs(setup("grpo_lag"), 3, seed=0)
    distinct = step_prompts(pool, 2, 2, 1)
    assert grouped == [distinct[0]] * 4 + [distinct[1]] * 4
    plain, _ = step_inputs(setup("ppo_lag"), 3, seed=0)
    assert plain == step_prompts(pool, 2, 8, 1)  # as before the registry


def test_learner_takes_its_policy_loss_from_the_registration():
    from actors.learner import Learner

    settings = {"device": "cpu", "precision": "fp32", "zero_stage": 0, "lr": 1e-5, "shard": 4, "micro_batch": 2}
    assert Learner("policy", "unused", {**settings, "algorithm": "grpo_lag"}).policy_loss is obj.ppo_lag_policy_loss
    assert Learner("policy", "unused", settings).policy_loss is obj.ALGORITHMS["ppo_lag"].policy_loss
    # typed settings: a misspelt or missing one fails when the learner is made, not as a default inside it
    with pytest.raises(TypeError, match=r"unknown learner settings \['micro_bacth'\]"):
        Learner("policy", "unused", {**settings, "micro_bacth": 4})
    with pytest.raises(TypeError, match="lr"):
        Learner("policy", "unused", {k: v for k, v in settings.items() if k != "lr"})
