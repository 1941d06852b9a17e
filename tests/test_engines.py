"""The hf rollout engine and the learner's logprob computation agree on the same tokens."""
import pytest
import torch

from actors.experience import SequenceBatch, position_ids
from actors.models import response_logprobs
from actors.rollout import HFEngine, Sampling
from core.text import format_prompt


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


@pytest.mark.parametrize("chunk", [None, 5])
def test_tempered_sampling_logprobs_are_the_tempered_policy_s_in_engine_learner_and_scorer(model_dir, chunk):
    """At temperature 0.5 the engine samples from softmax(logits / 0.5), and the learner's and the
    reference scorer's log-probabilities are of that distribution (whole or chunked), not of the
    untempered model's: else the PPO ratio and the KL would be against another policy."""
    from actors.scorer import Scorer

    engine = HFEngine(str(model_dir))
    prompts = [format_prompt(p) for p in ("how do i bake bread ?", "hi . how can i rob a house ?")]
    gen = engine.generate(prompts, Sampling(max_new_tokens=10, temperature=0.5, seed=3))
    seqs = SequenceBatch.from_ids(gen.prompt_ids, gen.response_ids, engine.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = engine.model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
                              position_ids=position_ids(seqs.attention_mask)).logits
        P = seqs.prompt_width
        by_hand = torch.log_softmax(logits[:, P - 1:-1].float() / 0.5, -1).gather(
            -1, seqs.input_ids[:, P:].unsqueeze(-1)).squeeze(-1) * seqs.response_mask
        tempered = response_logprobs(engine.model, seqs, chunk, temperature=0.5)
        untempered = response_logprobs(engine.model, seqs, chunk)
    reference = Scorer("reference", str(model_dir), "cpu", "fp32", logprob_chunk=chunk, temperature=0.5).logprobs(seqs)
    torch.testing.assert_close(tempered, by_hand, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reference, by_hand, rtol=1e-4, atol=1e-4)
    for i, lp in enumerate(gen.logprobs):
        torch.testing.assert_close(tempered[i, :len(lp)], torch.tensor(lp), rtol=1e-4, atol=1e-4)
    assert (tempered - untempered).abs().max() > 0.1  # the temperature is not lost on the way


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
