"""Small model and tokenizer factory: a BPE tokenizer trained on the world's text and a small
Llama-style causal LM, both saved as Hugging Face directories that transformers, vLLM and
DeepSpeed load. Real runs point `model.path` at any model directory instead.
"""
from __future__ import annotations

from pathlib import Path

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path):
    """Byte-level BPE (lossless decode, so vLLM's detokeniser returns the text we trained on)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 model_max_length=4096)
    hf.save_pretrained(str(out_dir))
    return hf


def build_small_llama(cfg, tokenizer, out_dir: str | Path, seed: int = 0):
    """A randomly initialised Llama of shape `cfg` (pipeline.config.SmallModelConfig)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return model


def texts_of(paths: list[str | Path]) -> list[str]:
    """Conversations in the template the model will see, from data files: HH-RLHF rows (`chosen`,
    `rejected`), PKU-SafeRLHF rows (`prompt` with `response_0`, `response_1`) and prompt rows
    (`prompt`). Rows that are none of these are skipped: this is text for a tokenizer and a warm-up."""
    from core.text import format_prompt
    from stages.common.annotation_files import parse_conversation
    from stages.common.datafiles import detect_container, iter_rows

    texts = []
    for path in map(Path, paths):
        container, gz = detect_container(path)
        for item in iter_rows(path, container, gz, max_row_bytes=1_000_000):
            row = item.value if isinstance(item.value, dict) else {}
            for key in ("chosen", "rejected"):
                try:
                    turns = parse_conversation(row[key])
                except Exception:  # noqa: BLE001 - missing or malformed: not text we can use
                    continue
                context = [{"role": r, "text": t} for r, t in turns[:-2]]
                texts.append(f"{format_prompt(turns[-2][1], context)} {turns[-1][1]}")
            if isinstance(row.get("prompt"), str):
                answers = [row[k] for k in ("response_0", "response_1") if isinstance(row.get(k), str)]
                texts += [f"{format_prompt(row['prompt'])} {a}" for a in answers] or [format_prompt(row["prompt"])]
    return texts


def make_small_model(texts: list[str], out_dir: str | Path, shape, warmup_epochs: int = 1, seq_len: int = 128,
                     seed: int = 0, log=print) -> int:
    """A tokenizer trained on `texts`, a small Llama of `shape` (pipeline.config.SmallModelConfig) and a
    short causal-LM warm-up on the same texts, saved as one Hugging Face directory: a stand-in for a
    user's own checkpoint. Returns the parameter count."""
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from actors.experience import pad

    out_dir = Path(out_dir)
    tok = train_tokenizer(texts, shape.vocab_size, out_dir)
    build_small_llama(shape, tok, out_dir, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    ids = [tok(t, add_special_tokens=False)["input_ids"][:seq_len - 1] + [tok.eos_token_id] for t in texts]
    torch.manual_seed(seed)
    t0, seen = time.time(), 0
    for epoch in range(warmup_epochs):
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for s in range(0, len(order), 32):
            batch, mask = pad([ids[i] for i in order[s:s + 32]], tok.pad_token_id)
            loss = model(input_ids=batch, attention_mask=mask, labels=batch.masked_fill(mask == 0, -100)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            seen += int(mask.sum())
        log(f"  warm-up epoch {epoch + 1}/{warmup_epochs}: loss {loss.item():.3f}, {seen / (time.time() - t0):.0f} tokens/s")
    model.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())
