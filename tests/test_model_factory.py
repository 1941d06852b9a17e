"""The small model and tokenizer: Hugging Face directories that transformers and vLLM load."""
import json
import subprocess
import sys

import pytest

from core.text import format_prompt


@pytest.fixture(scope="module")
def model_dir(small_model_dir):
    return small_model_dir


def test_tokenizer_round_trips_world_text_and_has_special_tokens(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = format_prompt("how do i bake bread ?") + " sure . knead the dough , then let it rise ."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    answer = " sure . knead the dough , then let it rise ."
    assert len(tok(answer)["input_ids"]) == len(answer.split())  # one token per world word
    assert tok.pad_token_id != tok.eos_token_id and tok.eos_token == "</s>"


def test_small_llama_loads_and_generates_with_transformers(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.hidden_size // model.config.num_attention_heads >= 32
    assert (model_dir / "model.safetensors").is_file()
    ids = tok(format_prompt("how do i cook rice ?"), return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 5
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


VLLM_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=128, enforce_eager=True, max_num_seqs=4, seed=0)
    outs = llm.generate(["BEGINNING OF CONVERSATION: USER: how do i cook rice ? ASSISTANT:"],
                        SamplingParams(max_tokens=6, temperature=1.0, logprobs=0, seed=1, ignore_eos=True))
    o = outs[0].outputs[0]
    print("RESULT " + json.dumps({"n": len(o.token_ids), "logprobs": len(o.logprobs)}))
"""


@pytest.mark.slow
@pytest.mark.long("every vLLM round in CI (test_round, small_pipeline) loads this model in vLLM")
def test_small_llama_loads_in_vllm(model_dir, tmp_path):
    script = tmp_path / "vllm_load.py"
    script.write_text(VLLM_SCRIPT)
    env = {**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(model_dir)], capture_output=True, text=True,
                          timeout=600, env=env)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    assert json.loads(line[0][7:]) == {"n": 6, "logprobs": 6}


def test_the_tiny_models_size_is_stated_once_as_the_code_measures_it(model_dir):
    """README and configs/tiny.yaml state the default model's size; it is what the world stage builds."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import REPO

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    stated = f"{n / 1e6:.2f}M-parameter"
    for doc in (REPO / "README.md", REPO / "configs" / "tiny.yaml"):
        text = doc.read_text()
        assert stated in text, (doc, stated)
        import re
        assert set(re.findall(r"~?\d+\.\d+M-parameter Llama", text)) == {stated + " Llama"}, doc
