"""Score model: backbone + linear head, last-token score, HF save/load, padding-side invariance."""
import pytest
import torch

from actors.experience import pad
from actors.score_model import ScoreModel
from core.objectives import last_token_index


def make_backbone_dir(tmp_path, kind):
    from transformers import AutoModel, BertConfig, GPT2Config, LlamaConfig

    cfg = {"llama": LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64),
           "gpt2": GPT2Config(vocab_size=120, n_embd=64, n_layer=2, n_head=2, n_positions=64),
           "bert": BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=128, max_position_embeddings=64)}[kind]
    torch.manual_seed(0)
    path = tmp_path / kind
    AutoModel.from_config(cfg).save_pretrained(path)
    return path


SEQS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def one_by_one(model, seqs):
    return torch.stack([model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[1][0] for s in seqs])


def test_last_token_index_for_both_padding_sides():
    _, right = pad(SEQS, 0, "right")
    _, left = pad(SEQS, 0, "left")
    assert last_token_index(right).tolist() == [6, 1, 3]
    assert last_token_index(left).tolist() == [6, 6, 6]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_score_does_not_depend_on_padding_side(tmp_path, kind):
    model = ScoreModel.from_backbone(make_backbone_dir(tmp_path, kind)).eval()
    with torch.no_grad():
        model.score_head.weight.normal_()  # a head that is not near zero, so differences show
        alone = one_by_one(model, SEQS)
        for side in ("right", "left"):
            ids, mask = pad(SEQS, 0, side)
            _, end = model(ids, mask)
            torch.testing.assert_close(end, alone, rtol=1e-4, atol=1e-4)


def test_right_padding_index_on_left_padded_batch_reads_the_wrong_token(tmp_path):
    """The bug DESIGN.md warns about: the test above would catch it."""
    model = ScoreModel.from_backbone(make_backbone_dir(tmp_path, "llama")).eval()
    with torch.no_grad():
        model.score_head.weight.normal_()
        ids, mask = pad(SEQS, 0, "left")
        values, _ = model(ids, mask)
        wrong = values.gather(1, (mask.sum(1) - 1).unsqueeze(1)).squeeze(1)
        assert not torch.allclose(wrong, one_by_one(model, SEQS), atol=1e-3)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_save_and_reload_give_identical_scores(tmp_path, kind):
    model = ScoreModel.from_backbone(make_backbone_dir(tmp_path, kind), score_type="cost").eval()
    with torch.no_grad():
        model.score_head.weight.normal_()
        model.score_head.bias.fill_(0.25)
    model.save_pretrained(tmp_path / "saved", safe_cost_mean=-1.5)
    again = ScoreModel.from_pretrained(tmp_path / "saved").eval()
    assert again.score_type == "cost"
    ids, mask = pad(SEQS, 0, "right")
    with torch.no_grad():
        assert torch.equal(model(ids, mask)[1], again(ids, mask)[1])
    import json
    assert json.loads((tmp_path / "saved" / "score_config.json").read_text())["safe_cost_mean"] == -1.5
    # The backbone directory is a plain Hugging Face model that transformers loads by itself.
    from transformers import AutoModel
    AutoModel.from_pretrained(tmp_path / "saved")


def test_per_token_values_have_sequence_shape(tmp_path):
    model = ScoreModel.from_backbone(make_backbone_dir(tmp_path, "llama"))
    ids, mask = pad(SEQS, 0, "right")
    values, end = model(ids, mask)
    assert values.shape == (3, 7) and end.shape == (3,)
    assert torch.equal(end, values[torch.arange(3), torch.tensor([6, 1, 3])])


def test_a_backbone_from_a_causal_lm_loads_without_a_load_report_and_names_the_weights_it_lacks(tmp_path, capfd, caplog):
    """The SFT checkpoint's lm_head is left out by design: no "LOAD REPORT ... UNEXPECTED" in every
    fit's log. A backbone weight the checkpoint lacks still is reported, by name."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    caplog.set_level("WARNING")
    ScoreModel.from_backbone(tmp_path)
    assert "LOAD REPORT" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.name == "actors.score_model"]

    weights = tmp_path / "model.safetensors"
    kept = {k: v for k, v in load_file(weights).items() if "layers.1.mlp" not in k}
    save_file(kept, weights, metadata={"format": "pt"})
    ScoreModel.from_backbone(tmp_path)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "actors.score_model"]
    assert "3 weights not in the checkpoint start random" in warning
    assert "layers.1.mlp.down_proj.weight" in warning


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_mean_pooling_scores_the_head_on_the_masked_mean_whatever_the_padding(tmp_path, kind):
    model = ScoreModel.from_backbone(make_backbone_dir(tmp_path, kind), score_type="cost", pooling="mean").eval()
    with torch.no_grad():
        model.score_head.weight.normal_()
        model.score_head.bias.fill_(0.5)
        by_hand = []
        for s in SEQS:  # each sequence alone: the mean of its hidden states, then the head
            hidden = model.backbone(input_ids=torch.tensor([s])).last_hidden_state[0]  # [L, H]
            by_hand.append(hidden.mean(0) @ model.score_head.weight[0] + 0.5)
        by_hand = torch.stack(by_hand)
        for side in ("right", "left"):
            ids, mask = pad(SEQS, 0, side)
            torch.testing.assert_close(model(ids, mask)[1], by_hand, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(model.pooled_features(ids, mask) @ model.score_head.weight[0] + 0.5, by_hand,
                                       rtol=1e-4, atol=1e-4)
        last = ScoreModel(model.backbone, "cost", pooling="last").eval()
        last.score_head.load_state_dict(model.score_head.state_dict())
        assert not torch.allclose(last(*pad(SEQS, 0, "right"))[1], by_hand, atol=1e-3)  # the two poolings differ
    model.save_pretrained(tmp_path / "saved")
    again = ScoreModel.from_pretrained(tmp_path / "saved").eval()
    assert again.pooling == "mean"
    with torch.no_grad():
        assert torch.equal(again(*pad(SEQS, 0, "right"))[1], model(*pad(SEQS, 0, "right"))[1])


def test_a_score_model_saved_before_pooling_existed_reads_its_last_token(tmp_path):
    import json

    model = ScoreModel.from_backbone(make_backbone_dir(tmp_path, "llama"))
    model.save_pretrained(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "score_config.json").read_text())
    assert meta.pop("pooling") == "last"
    (tmp_path / "saved" / "score_config.json").write_text(json.dumps(meta))
    assert ScoreModel.from_pretrained(tmp_path / "saved").pooling == "last"
    with pytest.raises(ValueError, match="pooling 'max'"):
        ScoreModel(model.backbone, pooling="max")
