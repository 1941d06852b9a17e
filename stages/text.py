"""Text conventions shared by every stage: the conversation template and word normalisation."""
from __future__ import annotations

import hashlib
import json
import re

# The paper's template (safe-rlhf): the answer is appended after "ASSISTANT:", then EOS.
PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"

_WORD = re.compile(r"[a-z0-9']+")


def format_prompt(prompt: str, context=()) -> str:
    """The template around a prompt; earlier turns ({"role", "text"}) go before it, as in
    safe-rlhf's multi-turn format: "... USER: u1 ASSISTANT: a1 USER: prompt ASSISTANT:"."""
    if not context:
        return PROMPT_TEMPLATE.format(prompt=prompt)
    turns = " ".join(f"{'USER' if t['role'] == 'user' else 'ASSISTANT'}: {t['text']}" for t in context)
    return PROMPT_TEMPLATE.format(prompt=f"{turns} USER: {prompt}")


def encode_conversation(tokenizer, prompt: str, answer: str, max_prompt_tokens: int,
                        max_answer_tokens: int, context=()) -> tuple[list[int], int]:
    """Token ids of template(prompt) + " " + answer + EOS, and how many of them are the prompt.

    Prompt and answer are tokenised apart (the byte-level pre-tokeniser splits at the space, so
    this equals tokenising the whole), which makes the prompt/answer boundary exact. The prompt
    is truncated from the left (its end, next to the answer, matters most), the answer from the
    right.
    """
    p = tokenizer(format_prompt(prompt, context), add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
    a = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"][:max_answer_tokens]
    return p + a + [tokenizer.eos_token_id], len(p)


def words(text: str) -> list[str]:
    """Lowercase word tokens; punctuation is dropped (the judge matches phrases on these)."""
    return _WORD.findall(text.lower())


def normalize(text: str) -> str:
    """Strip, collapse whitespace, casefold: the form used for de-duplication and splits."""
    return " ".join(text.split()).casefold()


def _context_part(context) -> list:
    return [[t["role"], normalize(t["text"])] for t in context]


def prompt_key(prompt: str, context=()) -> str:
    """Hex hash of a normalised prompt with its earlier turns: the unit of the train/eval split."""
    return hashlib.sha256(json.dumps([_context_part(context), normalize(prompt)], ensure_ascii=False).encode()).hexdigest()


def pair_key(prompt: str, response_0: str, response_1: str, context=()) -> str:
    """Hex hash of a prompt and its (unordered) answer pair: the de-duplication key."""
    answers = sorted([normalize(response_0), normalize(response_1)])  # answer order is irrelevant
    return hashlib.sha256(json.dumps([_context_part(context), normalize(prompt), answers],
                                     ensure_ascii=False).encode()).hexdigest()


def in_eval_split(prompt: str, eval_fraction: float, context=()) -> bool:
    """Deterministic split by prompt hash: no prompt is in both splits, whatever the row order."""
    return int(prompt_key(prompt, context)[:16], 16) / 2**64 < eval_fraction
