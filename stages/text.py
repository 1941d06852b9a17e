"""Text conventions shared by every stage: the conversation template and word normalisation."""
from __future__ import annotations

import hashlib
import json
import re

# The paper's template (safe-rlhf): the answer is appended after "ASSISTANT:", then EOS.
PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"

_WORD = re.compile(r"[a-z0-9']+")


def format_prompt(prompt: str) -> str:
    return PROMPT_TEMPLATE.format(prompt=prompt)


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
