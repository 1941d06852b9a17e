"""The config tree: documented fields, presets that validate, errors by dotted path."""
import pytest

from pipeline.config import ConfigError, RunConfig, iter_fields, load_config, parse_config
from tests.conftest import REPO, run_cli


def test_every_config_field_has_a_description():
    missing = [name for name, info in iter_fields(RunConfig) if not (info.description or "").strip()]
    assert missing == []
    assert len(list(iter_fields(RunConfig))) > 60  # the walk reaches nested models and lists of models


@pytest.mark.parametrize("preset", ["tiny.yaml", "beaver-7b.yaml"])
def test_presets_validate(preset):
    cfg = load_config(REPO / "configs" / preset)
    assert cfg.name in preset


def test_beaver_preset_carries_the_papers_round_table():
    cfg = load_config(REPO / "configs" / "beaver-7b.yaml")
    table = [(r.threshold, r.lambda_init, r.lambda_lr) for r in cfg.safe_rlhf.rounds]
    assert table == [(0.0, 1.0, 0.01), (-3.0, 0.5, 0.04), (-3.0, 1.0, 0.04)]
    assert cfg.safe_rlhf.device == "cuda" and cfg.safe_rlhf.precision == "bf16"


def test_unknown_key_is_an_error_with_its_path():
    with pytest.raises(ConfigError) as e:
        parse_config({"sft": {"lrr": 0.1}, "safe_rlhf": {"rounds": [{"lambda_inti": 1}]}})
    assert dict(e.value.errors) == {"sft.lrr": "unknown key (a typo?)",
                                    "safe_rlhf.rounds[0].lambda_inti": "unknown key (a typo?)"}


def test_every_invalid_field_is_reported_by_dotted_path():
    with pytest.raises(ConfigError) as e:
        parse_config({"world": {"n_pairs": 0}, "sft": {"precision": "fp16"},
                      "model": {"small": {"num_heads": 8}},
                      "safe_rlhf": {"rounds": [{"threshold": "auto"}, {"threshold": "high"}]}})
    paths = [p for p, _ in e.value.errors]
    assert paths == ["world.n_pairs", "model.small", "sft", "safe_rlhf.rounds[1].threshold"]
    assert "head_dim" in dict(e.value.errors)["model.small"]
    assert "fp16" in dict(e.value.errors)["sft"]


def test_cross_field_check_refuses_a_run_with_no_data():
    with pytest.raises(ConfigError, match="no annotation data"):
        parse_config({"world": {"enabled": False}, "model": {"path": "/models/x"}})


def test_an_unsafe_label_without_a_classifier_judge_is_refused():
    with pytest.raises(ConfigError, match="evaluate: unsafe_label 'toxic' is for a Hugging Face safety classifier"):
        parse_config({"evaluate": {"unsafe_label": "toxic", "judge": "cost_model"}})
    assert parse_config({"evaluate": {"unsafe_label": 1, "judge": "/models/clf"}}).evaluate.unsafe_label == 1


def test_validate_command_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("world:\n  n_pairz: 10\nsft:\n  epochs: -1\n")
    proc = run_cli("validate", bad, check=False)
    assert proc.returncode == 2
    assert "world.n_pairz: unknown key" in proc.stderr and "sft.epochs:" in proc.stderr
    ok = run_cli("validate", REPO / "configs" / "tiny.yaml")
    assert "valid" in ok.stdout


def test_actors_are_kept_between_stages_on_cpu_and_never_on_gpus():
    cpu = parse_config({"name": "t"}, "<t>").safe_rlhf
    gpu = parse_config({"name": "t", "safe_rlhf": {"device": "cuda"}}, "<t>").safe_rlhf
    assert cpu.keeps_actors and not gpu.keeps_actors  # null: by device
    assert not parse_config({"name": "t", "safe_rlhf": {"keep_actors": False}}, "<t>").safe_rlhf.keeps_actors
    with pytest.raises(ConfigError, match="keep_actors: true needs device cpu"):
        parse_config({"name": "t", "safe_rlhf": {"device": "cuda", "keep_actors": True}}, "<t>")


def test_a_fits_own_lengths_default_to_the_models_and_join_the_fingerprint_only_when_set():
    # cost.max_prompt_tokens came after runs were made (marked `added`): at its default a fit's
    # config slice, and so its fingerprint, is as before.
    from pipeline.config import results_view
    from stages.fit_preference import fit_lengths

    cfg = parse_config({"model": {"max_prompt_tokens": 96, "max_answer_tokens": 48},
                        "cost": {"max_prompt_tokens": 256, "max_answer_tokens": 128}})
    assert fit_lengths(cfg, cfg.cost) == {"max_prompt_tokens": 256, "max_answer_tokens": 128}
    assert fit_lengths(cfg, cfg.reward) == {"max_prompt_tokens": 96, "max_answer_tokens": 48}
    assert results_view(cfg)["cost"]["max_prompt_tokens"] == 256
    assert "max_prompt_tokens" not in results_view(cfg)["reward"]
    assert results_view(parse_config({}))["cost"] == results_view(parse_config({"cost": {"max_answer_tokens": None}}))["cost"]


def test_a_linear_probe_with_category_heads_is_refused_by_field():
    from pydantic import ValidationError

    from stages.run_config import CostFitConfig

    assert CostFitConfig(train_backbone=False, pooling="mean").train_backbone is False
    with pytest.raises(ValidationError, match="per_category heads need train_backbone true"):
        CostFitConfig(train_backbone=False, per_category=True)
    with pytest.raises(ValidationError, match="pooling"):
        CostFitConfig(pooling="max")
