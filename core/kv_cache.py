"""vLLM's KV cache on CPU, sized to the engine (`safe_rlhf.cpu_kv_cache_gib` null): the one sizing
that the engine (actors/rollout.py) reserves and the plan (pipeline/plan.py) shows.

vLLM zeroes its whole CPU cache at start-up, so a cache bigger than the engine can use costs
start-up time and resident memory and gains nothing; one too small makes vLLM queue sequences.
"""
from __future__ import annotations

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CPU_KV_BLOCK_TOKENS = 128  # vLLM's KV cache block on CPU (its CPU platform's block_size)
CPU_KV_CACHE_CAP = 2**30  # the fixed size every CPU engine reserved before (VLLM_CPU_KVCACHE_SPACE=1)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, precision: str) -> int:
    """K and V of every layer for one token (the KV cache dtype follows the model's)."""
    return 2 * num_layers * num_kv_heads * head_dim * DTYPE_BYTES[precision]


def kv_bytes_per_token_of(config: dict, precision: str) -> int | None:
    """kv_bytes_per_token from a model's config.json; None where it lacks the fields."""
    layers, heads, hidden = (config.get(k) for k in ("num_hidden_layers", "num_attention_heads", "hidden_size"))
    if not (layers and heads and hidden):
        return None
    return kv_bytes_per_token(layers, config.get("num_key_value_heads") or heads,
                              config.get("head_dim") or hidden // heads, precision)


def cpu_kv_cache_bytes(per_token: int | None, max_num_seqs: int, max_model_len: int, gib: float | None = None) -> int:
    """The KV cache of an engine on CPU, for the engine and the plan alike: `gib`
    (safe_rlhf.cpu_kv_cache_gib) when set; else room for `max_num_seqs` sequences at full length in
    whole blocks, plus the block vLLM keeps aside, so it never queues a sequence for cache; at most
    CPU_KV_CACHE_CAP (then vLLM queues the rest), at least one full-length sequence. per_token None
    (a model config without the layer and head counts): CPU_KV_CACHE_CAP."""
    if gib is not None:
        return int(gib * 2**30)
    if per_token is None:
        return CPU_KV_CACHE_CAP
    block = CPU_KV_BLOCK_TOKENS * per_token
    per_sequence = -(-max_model_len // CPU_KV_BLOCK_TOKENS)
    blocks = min(max_num_seqs * per_sequence + 1, max(CPU_KV_CACHE_CAP // block, per_sequence + 1))
    return blocks * block
