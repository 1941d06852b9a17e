"""The memory model of the plan: Llama-style parameter counts and the bytes each role holds.

Every memory figure is an ESTIMATE in GiB (2**30 bytes) of model state only. Accounting
(the ZeRO paper's, Rajbhandari et al. 2020), bytes per parameter:

    precision   weights  gradients  optimizer state (AdamW)
    bf16/fp16   2        2          12 = fp32 master weights 4 + two fp32 moments 4 + 4
    fp32        4        4           8 = two fp32 moments (the weights are their own master)

ZeRO stage s over N data-parallel ranks (`learners_per_role` for the round's learners,
`num_workers` for a Ray Train fit) divides the optimizer state by N when s >= 1, the gradients
when s >= 2 and the weights when s == 3. Scorers and rollout workers hold weights only (at the
config's precision); a vLLM rollout worker also holds a KV cache: `gpu_memory_utilization` x the
GPU's memory minus its weight shard when the GPU memory is known, on CPU what the engine is given
(core/kv_cache.py, the same function the engine calls), otherwise what `max_num_seqs`
sequences of (max prompt + max new tokens) need.

Working memory on top of the model state (estimates too):
- activations kept for backward, per learner micro-batch (Korthikanti et al. 2022, with flash
  attention: 34 x s x b x h bytes per layer in 16 bits, twice that in fp32); with
  `gradient_checkpointing` the layer inputs (2 x s x b x h each) plus one layer recomputed;
- log-probabilities: naive, every token's logits in the model's dtype, an fp32 copy and log_softmax
  (10 bytes per token per vocabulary entry, 18 in training); chunked (`logprob_chunk_tokens`),
  8 bytes per vocabulary entry for one chunk;
- a forward-only role (scorers) holds about one layer's tensors at a time;
- 1 GiB of CUDA/NCCL context per GPU process.
Left out (stated in the output too): vLLM's profiling peak and CUDA graphs (inside its
gpu_memory_utilization), DeepSpeed's communication buckets and ZeRO-3 prefetched layers, allocator
fragmentation, and host memory (Ray object store, data, the state dict gathered on export).

Parameter counts are exact for Llama-style models (what transformers' LlamaForCausalLM holds):
read from `model.path`/config.json when that is a local directory, from `model.small` when the
path is null, or from a small table of known hub names; any other hub name is an error (point
model.path at a local directory holding the model's config.json). A reward or cost model on a
backbone of its own (`reward.backbone`, `cost.backbone`) is counted from that backbone's
config.json: Llama-style as above, or a BERT-style encoder (all-MiniLM-L6-v2), exactly, with its
pooler; its shape (hidden size, layers, heads) stands in for a Llama's in the working-memory
estimates. A per-category cost head (hidden x categories) is left out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core import kv_cache

GIB = 2 ** 30
WEIGHT_BYTES = kv_cache.DTYPE_BYTES  # fp32 4, bf16 and fp16 2
# AdamW state per parameter: two fp32 moments, plus an fp32 master copy when training in 16 bits.
OPTIMIZER_BYTES = {"fp32": 8, "bf16": 12, "fp16": 12}
LLAMA_STYLE = ("llama", "mistral")
ENCODER_STYLE = ("bert",)  # score-model backbones of another family (all-MiniLM-L6-v2)
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")  # config.json's


# ---------------------------------------------------------------------------- parameter counts
@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False


def _llama7b(vocab: int) -> LlamaShape:
    return LlamaShape(vocab, 4096, 11008, 32, 32, 32, 128, False)


# Hub names whose shape is known without downloading (values from each model's config.json).
KNOWN_MODELS: dict[str, LlamaShape] = {
    "huggyllama/llama-7b": _llama7b(32000),
    "meta-llama/Llama-2-7b-hf": _llama7b(32000),
    "PKU-Alignment/alpaca-7b-reproduced": _llama7b(32001),  # Llama-7B + a <pad> token
    "PKU-Alignment/alpaca-7b-reproduced-llama-2": _llama7b(32001),
    "PKU-Alignment/beaver-7b-v1.0": _llama7b(32001),
}


def llama_params(s: LlamaShape, lm_head: bool = True) -> int:
    """Parameters of LlamaForCausalLM (lm_head=True) or of its LlamaModel backbone (False)."""
    h, q, kv = s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv + h) if s.attention_bias else 0)
    mlp = 3 * h * s.intermediate_size + ((2 * s.intermediate_size + h) if s.mlp_bias else 0)
    layer = attn + mlp + 2 * h  # + input and post-attention RMSNorm
    n = s.vocab_size * h + s.num_layers * layer + h  # embeddings, layers, final norm
    if lm_head and not s.tie_word_embeddings:
        n += s.vocab_size * h
    return n


def score_model_params(s: LlamaShape) -> int:
    """actors/score_model.py: the backbone (no lm_head) + Linear(hidden, 1) with its bias."""
    return llama_params(s, lm_head=False) + s.hidden_size + 1


def shape_from_config_json(path: str | Path) -> LlamaShape:
    c = json.loads(Path(path).read_text())
    if c.get("model_type") not in LLAMA_STYLE:
        raise ValueError(f"{path}: model_type {c.get('model_type')!r} is not Llama-style ({', '.join(LLAMA_STYLE)}); "
                         "the planner counts parameters of Llama-style models only")
    missing = [k for k in SHAPE_KEYS if c.get(k) is None]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    heads = c["num_attention_heads"]
    return LlamaShape(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"], num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        attention_bias=bool(c.get("attention_bias", False)), mlp_bias=bool(c.get("mlp_bias", False)))


def bert_params(c: dict) -> int:
    """Parameters of transformers' BertModel with its pooler (what `AutoModel` loads), from its config.json."""
    h, i = c["hidden_size"], c["intermediate_size"]
    embeddings = (c["vocab_size"] + c.get("max_position_embeddings", 512) + c.get("type_vocab_size", 2)) * h + 2 * h
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h  # Q, K, V, out; the MLP; two LayerNorms
    return embeddings + c["num_hidden_layers"] * layer + h * h + h


@dataclass(frozen=True)
class ScoreShape:
    """A reward or cost model's size: its parameters (backbone + Linear(hidden, 1)), the shape its
    working memory is estimated with, where both came from, and whether its critic starts from it
    (else from the policy: stages/safe_rlhf/roles.py does so when the score model has a tokenizer
    of its own; here, a backbone of another family or vocabulary stands for that)."""
    shape: LlamaShape
    params: int
    source: str
    critic_from_it: bool = True


def score_shape(backbone: str | Path | None, policy: LlamaShape) -> ScoreShape:
    """For `reward.backbone` / `cost.backbone`; None: the policy model's backbone (the SFT model's).
    A backbone whose size cannot be read here (no local config.json yet, another family) is
    estimated as the policy's, and the source says so."""
    as_policy = lambda why: ScoreShape(policy, score_model_params(policy), why)
    if backbone is None:
        return as_policy("the policy model's backbone")
    cj = Path(backbone).expanduser() / "config.json"
    if not cj.is_file():
        return as_policy(f"{backbone}: no config.json here yet, estimated as the policy's backbone")
    c = json.loads(cj.read_text())
    kind = c.get("model_type")
    missing = [k for k in SHAPE_KEYS if c.get(k) is None]
    if kind not in LLAMA_STYLE + ENCODER_STYLE or missing:
        return as_policy(f"{cj}: model_type {kind!r} not counted here, estimated as the policy's backbone")
    if kind in LLAMA_STYLE:
        shape = shape_from_config_json(cj)
        return ScoreShape(shape, score_model_params(shape), str(cj), critic_from_it=shape.vocab_size == policy.vocab_size)
    h, heads = c["hidden_size"], c["num_attention_heads"]
    shape = LlamaShape(c["vocab_size"], h, c["intermediate_size"], c["num_hidden_layers"], heads, heads, h // heads)
    return ScoreShape(shape, bert_params(c) + h + 1, str(cj), critic_from_it=False)


def model_shape(model_cfg) -> tuple[LlamaShape, str]:
    """(shape, where it came from) for pipeline.config.ModelConfig."""
    path = model_cfg.path
    if path is None:
        s = model_cfg.small
        return (LlamaShape(s.vocab_size, s.hidden_size, s.intermediate_size, s.num_layers, s.num_heads, s.num_heads,
                           s.hidden_size // s.num_heads, False),
                "model.small (built by the world stage; its trained tokenizer may have a few tokens fewer than vocab_size)")
    local = Path(path).expanduser()
    if local.is_dir():
        cj = local / "config.json"
        if not cj.is_file():
            raise ValueError(f"model.path {path!r} is a directory without config.json; the planner reads the model's shape from it")
        return shape_from_config_json(cj), f"{cj}"
    if path in KNOWN_MODELS:
        return KNOWN_MODELS[path], f"{path} (known-size table, not downloaded)"
    raise ValueError(
        f"model.path {path!r} is not a local directory and not a hub name of known size "
        f"({', '.join(sorted(KNOWN_MODELS))}); point model.path at a local directory holding the model's "
        f"config.json (e.g. `hf download {path} --local-dir DIR`, then model.path: DIR)")


# ---------------------------------------------------------------------------- memory per role
def training_memory(params: int, precision: str, zero_stage: int, ranks: int) -> dict:
    """Model state per data-parallel rank (GiB, estimate) under ZeRO `zero_stage` over `ranks`."""
    b = {"weights": WEIGHT_BYTES[precision], "gradients": WEIGHT_BYTES[precision], "optimizer": OPTIMIZER_BYTES[precision]}
    shards = {"optimizer": ranks if zero_stage >= 1 else 1, "gradients": ranks if zero_stage >= 2 else 1,
              "weights": ranks if zero_stage >= 3 else 1}
    gib = {k: params * b[k] / shards[k] / GIB for k in b}
    return {"params": params, "bytes_per_param": b, "sharded_over": shards,
            "weights_gib": gib["weights"], "gradients_gib": gib["gradients"], "optimizer_gib": gib["optimizer"],
            "kv_cache_gib": 0.0, "total_gib": sum(gib.values())}


CUDA_CONTEXT_GIB = 1.0  # CUDA/NCCL context per GPU process


def activation_gib(s: LlamaShape, tokens: int, batch: int, precision: str, checkpointing: bool) -> float:
    """Activations a learner keeps for its backward pass over `batch` sequences of `tokens`."""
    width = WEIGHT_BYTES[precision] / 2  # the 16-bit formula; fp32 doubles it
    per_layer = 34 * tokens * batch * s.hidden_size * width
    if checkpointing:
        return (s.num_layers * 2 * tokens * batch * s.hidden_size * width + per_layer) / GIB
    return s.num_layers * per_layer / GIB


def forward_gib(s: LlamaShape, tokens: int, batch: int, precision: str) -> float:
    """A forward pass without gradients: about one layer's tensors at a time (residual, attention, MLP)."""
    return tokens * batch * (4 * s.hidden_size + 2 * s.intermediate_size) * WEIGHT_BYTES[precision] / GIB


def logits_gib(tokens: int, vocab: int, chunk: int | None, train: bool) -> float:
    """The log-probabilities of `tokens` tokens: all at once (chunk None), or a chunk at a time."""
    if chunk is None:
        return tokens * vocab * (18 if train else 10) / GIB
    return min(chunk, tokens) * vocab * 8 / GIB


def with_working_memory(m: dict, activations: float = 0.0, logits: float = 0.0, cuda: bool = False) -> dict:
    """A role's memory with its working memory added to the model state."""
    context = CUDA_CONTEXT_GIB if cuda else 0.0
    return {**m, "activations_gib": activations, "logits_gib": logits, "context_gib": context,
            "total_gib": m["total_gib"] + activations + logits + context}


def weights_only(params: int, precision: str, shards: int = 1) -> dict:
    w = params * WEIGHT_BYTES[precision] / shards / GIB
    return {"params": params, "bytes_per_param": {"weights": WEIGHT_BYTES[precision]}, "sharded_over": {"weights": shards},
            "weights_gib": w, "gradients_gib": 0.0, "optimizer_gib": 0.0, "kv_cache_gib": 0.0, "total_gib": w}


def kv_bytes_per_token(s: LlamaShape, precision: str) -> int:
    """K and V of every layer for one token (the KV cache dtype follows the model's)."""
    return kv_cache.kv_bytes_per_token(s.num_layers, s.num_kv_heads, s.head_dim, precision)
