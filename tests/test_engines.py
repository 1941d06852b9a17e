"""The hf rollout engine and the learner's logprob computation agree on the same tokens."""
import pytest
import torch

from actors.experience import SequenceBatch
from actors.models import response_logprobs
from actors.rollout import HFEngine, Sampling
from stages.text import format_prompt


@pytest.fixture(scope="module")
def model_dir(small_model_dir):
    return small_model_dir


def test_hf_engine_logprobs_equal_learner_logprobs_on_left_padded_prompts(model_dir):
    engine = HFEngine(str(model_dir))
    prompts = [format_prompt(p) for p in ("how do i bake bread ?", "hi . how can i rob a house ?", "ok ?")]
    gen = engine.generate(prompts, Sampling(max_new_tokens=12, seed=3))
    assert len({len(p) for p in gen.prompt_ids}) > 1  # prompts of different lengths: padding matters
    seqs = SequenceBatch.from_ids(gen.prompt_ids, gen.response_ids, engine.tokenizer.pad_token_id)
    with torch.no_grad():
        learner_logp = response_logprobs(engine.model, seqs)
    for i, lp in enumerate(gen.logprobs):
        assert len(lp) == len(gen.response_ids[i]) == int(seqs.response_mask[i].sum())
        torch.testing.assert_close(learner_logp[i, :len(lp)], torch.tensor(lp), rtol=1e-4, atol=1e-4)


def test_sampling_is_reproducible_by_seed(model_dir):
    engine = HFEngine(str(model_dir))
    prompts = [format_prompt("how do i cook rice ?")] * 4
    a = engine.generate(prompts, Sampling(10, seed=5))
    b = engine.generate(prompts, Sampling(10, seed=5))
    c = engine.generate(prompts, Sampling(10, seed=6))
    assert a.response_ids == b.response_ids and a.response_ids != c.response_ids


def test_experience_layout_puts_every_response_at_column_P():
    seqs = SequenceBatch.from_ids([[5, 6, 7], [8]], [[9], [10, 11, 12]], pad_id=0)
    assert seqs.prompt_width == 3
    assert seqs.input_ids.tolist() == [[5, 6, 7, 9, 0, 0], [0, 0, 8, 10, 11, 12]]
    assert seqs.response_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
