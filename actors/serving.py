"""What a served run's deployments hold, as plain classes (pipeline/serve.py makes them Ray Serve
deployments): a policy that answers, and a scorer that gives reward and cost.

- `PolicyServer`: one policy's engine (vLLM or transformers), `n` answers to one prompt (with its
  earlier turns) in the policy's own template (its chat template when its tokenizer has one),
  with token counts and why each answer ended.
- `ScoreServer`: one fitted score model (reward or cost) scoring (prompt, answer) pairs as it was
  trained (template, answer, EOS), in batches.
"""
from __future__ import annotations

import threading

from actors.rollout import Sampling, make_engine
from actors.scorer import Scorer
from core.text import format_prompt


class PolicyServer:
    def __init__(self, model_dir: str, engine: str, engine_settings: dict, context_tokens: int):
        self.engine = make_engine(engine, model_dir, **engine_settings)
        self.tokenizer = self.engine.tokenizer
        self.context_tokens = context_tokens  # prompt + answer tokens the engine holds
        # Serve runs a replica's calls side by side in threads; an engine runs one generate at a time
        # (vLLM's in-process engine is not thread-safe: two at once corrupted it and killed the
        # replica; transformers' sampling seeds the process-wide generator).
        self._generating = threading.Lock()

    def prompt_tokens(self, prompt: str, context: list) -> int:
        """Tokens of the templated prompt (to refuse one the context cannot hold, rather than cut it)."""
        return len(self.tokenizer(format_prompt(prompt, context, self.tokenizer), add_special_tokens=False)["input_ids"])

    def generate(self, prompt: str, context: list, n: int, max_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list[dict]:
        """n answers to one prompt: [{"text", "tokens", "finish_reason"}] ("stop": EOS, "length": cut)."""
        text = format_prompt(prompt, context, self.tokenizer)
        with self._generating:
            gen = self.engine.generate([text] * n, Sampling(max_tokens, temperature, top_p, seed))
        return [{"text": text, "tokens": len(ids), "finish_reason": "stop" if gen.ended(ids) else "length"}
                for text, ids in zip(gen.texts, gen.response_ids)]


class ScoreServer:
    def __init__(self, role: str, model_dir: str, device: str, dtype: str, max_prompt_tokens: int, max_answer_tokens: int):
        self.scorer = Scorer(role, model_dir, device, dtype)
        self.max_prompt_tokens, self.max_answer_tokens = max_prompt_tokens, max_answer_tokens

    def score(self, items: list[tuple[str, str, list]]) -> list[float]:
        """End scores of (prompt, answer, earlier turns) items, one batch."""
        return self.scorer.score_texts([p for p, _, _ in items], [a for _, a, _ in items], self.max_prompt_tokens,
                                       self.max_answer_tokens, [c for _, _, c in items])
