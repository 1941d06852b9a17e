"""Loading models for the roles, and the forwards the learner and the scorers share.

- `torch_dtype("bf16")` -> torch.bfloat16: the config's precision names.
- `response_logprobs(model, batch, chunk)`: log-probabilities of the response tokens under a causal
  LM (an HF model, or a DeepSpeed engine around one), `chunk` tokens at a time.
- `response_values(score_model, batch)`: a critic's value of the state before each response token.
- `enable_gradient_checkpointing(model)`: recompute activations in backward (HF models, score models).
"""
from __future__ import annotations

import torch

from actors.experience import SequenceBatch, position_ids
from core.objectives import token_logprobs

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def response_logprobs(model, batch: SequenceBatch, chunk: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of the response tokens under a causal LM sampled at `temperature`: [B, T]
    (0 past each response): log_softmax(logits / temperature), the distribution the tokens came from.

    chunk None: the model's logits for every position, log_softmax in fp32 (the reference way).
    chunk n: the model runs without its output layer (`logits_to_keep` empty), and the output layer
    is applied to the real response tokens only, n at a time (objectives.token_logprobs): no
    [B, P+T, V] tensor, in fp32 or otherwise, ever exists."""
    P = batch.prompt_width
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "position_ids": position_ids(batch.attention_mask)}
    if chunk is None:
        logits = model(**inputs).logits  # [B, P+T, V]
        logits = logits[:, P - 1:-1].float() / temperature  # the logits that predict response tokens: [B, T, V]
        targets = batch.input_ids[:, P:]  # [B, T]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return logp * batch.response_mask
    hf = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    captured = {}
    hook = getattr(hf, hf.base_model_prefix).register_forward_hook(
        lambda module, args, out: captured.__setitem__("hidden", out[0] if isinstance(out, tuple) else out.last_hidden_state))
    try:  # through the model's own forward (DeepSpeed's hooks run), with no position's logits kept
        model(**inputs, logits_to_keep=torch.zeros(0, dtype=torch.long, device=batch.input_ids.device), use_cache=False)
    finally:
        hook.remove()
    hidden = captured["hidden"][:, P - 1:-1]  # [B, T, H]: the states that predict response tokens
    mask = batch.response_mask.bool()  # [B, T]
    logp = token_logprobs(hidden[mask], batch.input_ids[:, P:][mask], hf.get_output_embeddings(), chunk, temperature)  # [N]
    return torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device).masked_scatter(mask, logp)


def response_values(score_model, batch: SequenceBatch) -> torch.Tensor:
    """A critic's value of the state before each response token: [B, T] (0 past each response)."""
    P = batch.prompt_width
    values, _ = score_model(batch.input_ids, batch.attention_mask)  # [B, P+T]
    return values[:, P - 1:-1].float() * batch.response_mask


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them:
    identical gradients, activation memory of one layer plus the layer inputs."""
    target = getattr(model, "backbone", model)  # a score model checkpoints its backbone
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(target.config, "use_cache", None):
        target.config.use_cache = False


def import_ahead(*names: str) -> None:
    """Import "module" or "module:attribute" (transformers' lazy names) now: for an actor started
    ahead of its stage (cluster/pool.py `prestart`), whose start on CPU is mostly its imports."""
    import importlib

    for name in names:
        module, _, attribute = name.partition(":")
        loaded = importlib.import_module(module)
        if attribute:
            getattr(loaded, attribute)
