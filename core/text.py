"""Text conventions shared by every stage: the conversation template and word normalisation.

Two templates. A tokenizer with a chat template (an instruct model's: SmolLM2's `<|im_start|>`
turns, Llama 3's headers, with the system prompt the template adds) renders every conversation:
rollouts, red teaming, evaluation, serving, and the reward, cost and reference models' inputs,
which share the policy's tokenizer. Its answer follows the generation prompt as it is, then the
tokenizer's EOS, which ends an assistant turn (`<|im_end|>`). A tokenizer without one (the built-in
world's, pku-small's) gets the paper's plain template below: " " + answer, then EOS.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import threading

# The paper's template (safe-rlhf): the answer is appended after "ASSISTANT:", then EOS.
PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"

_WORD = re.compile(r"[a-z0-9']+")


def has_chat_template(tokenizer) -> bool:
    return bool(tokenizer is not None and getattr(tokenizer, "chat_template", None))


def chat_messages(prompt: str, context=()) -> list[dict]:
    """Earlier turns ({"role": "user" | "assistant", "text"}) and the prompt as chat messages."""
    return [{"role": "user" if t["role"] == "user" else "assistant", "content": t["text"]} for t in context] + \
        [{"role": "user", "content": prompt}]


def format_prompt(prompt: str, context=(), tokenizer=None) -> str:
    """The text a model answers: the tokenizer's chat template with its generation prompt when it
    has one, else the paper's template, earlier turns ({"role", "text"}) before the prompt as in
    safe-rlhf's multi-turn format: "... USER: u1 ASSISTANT: a1 USER: prompt ASSISTANT:"."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(chat_messages(prompt, context), tokenize=False, add_generation_prompt=True)
    if not context:
        return PROMPT_TEMPLATE.format(prompt=prompt)
    turns = " ".join(f"{'USER' if t['role'] == 'user' else 'ASSISTANT'}: {t['text']}" for t in context)
    return PROMPT_TEMPLATE.format(prompt=f"{turns} USER: {prompt}")


def format_answer(answer: str, tokenizer=None) -> str:
    """The answer's text after its prompt: as it is after a chat template's generation prompt
    (which ends in a newline), after a space in the plain one."""
    return answer.strip() if has_chat_template(tokenizer) else " " + answer.strip()


def format_conversation(prompt: str, answer: str, context=(), tokenizer=None) -> str:
    """Prompt and answer as one text (without the closing EOS): what a text classifier reads."""
    return format_prompt(prompt, context, tokenizer) + format_answer(answer, tokenizer)


_TOKENIZER_LOCK = threading.Lock()


def _tokenizer(model_dir: str):
    # The driver sets up concurrent stages (a round and its baselines) in threads; transformers'
    # lazy first import of AutoTokenizer from two threads at once raises ImportError.
    with _TOKENIZER_LOCK:
        return _load_tokenizer(model_dir)


@functools.lru_cache(maxsize=16)
def _load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def prompt_tokenizer(model_dir) -> object | None:
    """The tokenizer that renders prompts for the policy in `model_dir` (every policy of a run
    shares its starting model's), or None where the directory has none yet."""
    from pathlib import Path

    if model_dir is None or not (Path(model_dir) / "tokenizer_config.json").exists():
        return None
    return _tokenizer(str(model_dir))


def encode_conversation(tokenizer, prompt: str, answer: str, max_prompt_tokens: int,
                        max_answer_tokens: int, context=()) -> tuple[list[int], int]:
    """Token ids of format_prompt + format_answer + EOS, and how many of them are the prompt.

    Prompt and answer are tokenised apart (the byte-level pre-tokeniser splits at the space or
    the chat template's newline, so this equals tokenising the whole), which makes the
    prompt/answer boundary exact. The prompt is truncated from the left (its end, next to the
    answer, matters most), the answer from the right.
    """
    start, end = sequence_ends(tokenizer)
    p = tokenizer(format_prompt(prompt, context, tokenizer), add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
    a = tokenizer(format_answer(answer, tokenizer), add_special_tokens=False)["input_ids"][:max_answer_tokens]
    return start + p + a + [end], len(start) + len(p)


def sequence_ends(tokenizer) -> tuple[list[int], int]:
    """(the ids before a conversation, the id after it): ([], EOS) for a causal LM; ([CLS], SEP) for
    an encoder whose tokenizer has no EOS (BERT's, all-MiniLM-L6-v2's), as it was pretrained."""
    if tokenizer.eos_token_id is None and tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None:
        return [tokenizer.cls_token_id], tokenizer.sep_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path}: no EOS (nor CLS/SEP) to end a scored conversation")
    return [], tokenizer.eos_token_id


def same_tokenizer(model_dir_a, model_dir_b) -> bool:
    """Whether two model directories tokenise and template alike, so token ids of one are ids of
    the other (a reward model on the SFT model's backbone); else answers are scored as text, each
    model encoding with its own tokenizer. A directory without a tokenizer yet counts as alike."""
    a, b = prompt_tokenizer(model_dir_a), prompt_tokenizer(model_dir_b)
    if a is None or b is None or a is b:
        return True
    return (type(a).__name__ == type(b).__name__ and a.eos_token_id == b.eos_token_id
            and a.chat_template == b.chat_template and a.get_vocab() == b.get_vocab())


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
