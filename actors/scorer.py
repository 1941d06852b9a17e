"""The scorer role: batched forward only, no gradients.

- `reward`, `cost`: a score model's end score per sequence, [B] (`score`), or per (prompt, answer)
  text pair (`score_texts`: evaluation, judge annotation, a sweep trial's judge).
- `reference`: per-token logprobs of the response under the reference policy, [B, T].
- `safety`: an evaluation judge: a score-model directory (unsafe when its score > 0, like the cost
  model) or a Hugging Face sequence-classification safety classifier (`score_texts` gives the
  log-odds of its unsafe label, so > 0 again means unsafe). The unsafe label is `unsafe_label` (a
  name or an index, evaluate.unsafe_label), else the one label named with a word of
  UNSAFE_LABEL_WORDS, whole-word and not negated (`non-toxic`, `not_harmful` and `harmless` are safe
  labels); a classifier with no such label, or several, is refused with its labels named.
"""
from __future__ import annotations

import torch

from actors.experience import SequenceBatch
from actors.models import import_ahead, response_logprobs, torch_dtype
from actors.score_model import batch_end_scores, end_scores
from cluster.pool import restarted_by_ray
from cluster.restarts import refuse_if_restarted
from core.text import encode_conversation, format_prompt

ROLES = ("reward", "cost", "reference", "safety")
UNSAFE_LABEL_WORDS = ("unsafe", "toxic", "harmful", "harm")
NEGATIONS = ("non", "not", "no")


def unsafe_label_index(id2label: dict, unsafe_label: str | int | None = None) -> int:
    """The index of a classifier's unsafe label: `unsafe_label` given as an index or a label name
    (exact, case aside), else the one label whose words hold an unsafe word with no negation before
    it. Ambiguity or no match is an error naming the labels, never a guess."""
    import re

    labels = {int(i): str(n) for i, n in id2label.items()}
    shown = ", ".join(f"{i}: {n!r}" for i, n in sorted(labels.items()))
    if isinstance(unsafe_label, int) or (isinstance(unsafe_label, str) and unsafe_label.isdigit()):
        if int(unsafe_label) not in labels:
            raise ValueError(f"evaluate.unsafe_label {unsafe_label}: the classifier has no label of that index ({shown})")
        return int(unsafe_label)
    if unsafe_label is not None:
        found = [i for i, n in labels.items() if n.lower() == unsafe_label.lower()]
        if not found:
            raise ValueError(f"evaluate.unsafe_label {unsafe_label!r}: no label of that name ({shown})")
        return found[0]

    def unsafe(name: str) -> bool:
        words = re.findall(r"[a-z]+", name.lower())
        return any(w in UNSAFE_LABEL_WORDS and (k == 0 or words[k - 1] not in NEGATIONS) for k, w in enumerate(words))

    found = [i for i, n in labels.items() if unsafe(n)]
    if len(found) != 1:
        raise ValueError(f"cannot tell which label of the safety classifier means unsafe ({shown}): "
                         f"{'several' if found else 'none'} named {'/'.join(UNSAFE_LABEL_WORDS)}; "
                         "set evaluate.unsafe_label to its name or index")
    return found[0]


class Scorer:
    def __init__(self, role: str, model_dir: str | None, device: str = "cpu", dtype: str = "fp32", batch_size: int = 128,
                 logprob_chunk: int | None = None, temperature: float = 1.0, unsafe_label: str | int | None = None):
        if role not in ROLES:
            raise ValueError(f"unknown scorer role {role!r}; choose one of {ROLES}")
        from actors.score_model import ScoreModel, is_score_model_dir

        self.role, self.model_dir, self.device, self.batch_size = role, model_dir, device, batch_size
        self.restarted = restarted_by_ray()  # then it scores nothing until reset (cluster/restarts.py)
        # model_dir None: started ahead of its stage (cluster/pool.py `prestart`), libraries imported;
        # `reset` loads the stage's model.
        self.prestarted = model_dir is None
        if self.prestarted:
            import_ahead("transformers:AutoModelForCausalLM", "transformers:AutoModelForSequenceClassification")
            return
        self.logprob_chunk = logprob_chunk  # reference: tokens whose logprobs are computed at once
        self.temperature = temperature  # reference: the rollouts' sampling temperature (its KL is at the policy's)
        self.classifier = role == "safety" and not is_score_model_dir(model_dir)
        if role == "reference":
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype))
        elif self.classifier:
            from transformers import AutoModelForSequenceClassification

            self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch_dtype(dtype))
            self.unsafe_label = unsafe_label_index(self.model.config.id2label, unsafe_label)
        else:
            self.model = ScoreModel.from_pretrained(model_dir, dtype=torch_dtype(dtype))
        self.model.to(device).eval()
        self._tokenizer = None

    # Kept between stages (cluster/pool.py): any role and model, loaded in the same process.
    @staticmethod
    def reuse_key(*args, **kwargs) -> tuple:
        return ("Scorer",)

    def reset(self, *args, **kwargs) -> None:
        self.__init__(*args, **kwargs)
        self.restarted = False

    @torch.no_grad()
    def score(self, batch: SequenceBatch, categories: bool = False) -> torch.Tensor:
        """reward/cost: [B] end scores (at each sequence's last real token). categories (a cost model
        with per-category heads): [B, 1 + K], the shared score then one per category."""
        refuse_if_restarted(self)
        if self.role == "reference":
            raise TypeError("the reference scorer gives logprobs, not scores")
        out = []
        for s in range(0, len(batch), self.batch_size):
            chunk = batch.select(slice(s, s + self.batch_size)).to(self.device)
            out.append(batch_end_scores(self.model, chunk.input_ids, chunk.attention_mask, categories).float().cpu())
        return torch.cat(out)

    def score_texts(self, prompts: list[str], answers: list[str], max_prompt_tokens: int, max_answer_tokens: int,
                    contexts: list | None = None, categories: bool = False) -> list:
        """reward/cost: the end score of each answer to its prompt, encoded as in training
        (template, answer, EOS; prompt truncated from the left, answer from the right).
        categories: [shared score, one per category head] for each answer."""
        refuse_if_restarted(self)
        if self.role == "reference":
            raise TypeError("the reference scorer gives logprobs, not scores")
        if categories and self.classifier:
            raise TypeError("a safety classifier has no per-category heads")
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        tok, contexts = self._tokenizer, contexts or [()] * len(prompts)
        if self.classifier:
            return self._unsafe_log_odds([f"{format_prompt(p, c)} {a}" for p, a, c in zip(prompts, answers, contexts)])
        ids = [encode_conversation(tok, p, a, max_prompt_tokens, max_answer_tokens, c)[0]
               for p, a, c in zip(prompts, answers, contexts)]
        return end_scores(self.model, ids, tok.pad_token_id, self.device, self.batch_size, categories)

    def score_conversations(self, prompts: list[str], answers: list[str], max_prompt_tokens: int,
                            max_answer_tokens: int, contexts: list | None = None, categories: bool = False) -> torch.Tensor:
        """reward/cost: score_texts as a [B] (categories: [B, 1 + K]) tensor, what `score` gives: the
        round's scoring where the model has its own tokenizer (another backbone than the policy's),
        so the policy's token ids mean nothing to it and the answers go as text."""
        return torch.tensor(self.score_texts(prompts, answers, max_prompt_tokens, max_answer_tokens, contexts, categories))

    @torch.no_grad()
    def _unsafe_log_odds(self, texts: list[str]) -> list[float]:
        """log P(unsafe) - log P(not unsafe) under the classifier, per text."""
        out: list[float] = []
        for s in range(0, len(texts), self.batch_size):
            enc = self._tokenizer(texts[s:s + self.batch_size], padding=True, truncation=True, return_tensors="pt").to(self.device)
            logp = torch.log_softmax(self.model(**enc).logits.float(), dim=-1)  # [b, labels]
            unsafe = logp[:, self.unsafe_label]
            rest = torch.logsumexp(torch.cat([logp[:, :self.unsafe_label], logp[:, self.unsafe_label + 1:]], 1), dim=1)
            out += (unsafe - rest).cpu().tolist()
        return out

    @torch.no_grad()
    def logprobs(self, batch: SequenceBatch) -> torch.Tensor:
        """reference: [B, T] per-token logprobs of the response."""
        refuse_if_restarted(self)
        if self.role != "reference":
            raise TypeError(f"the {self.role} scorer gives end scores, not logprobs")
        out = []
        for s in range(0, len(batch), self.batch_size):
            chunk = batch.select(slice(s, s + self.batch_size)).to(self.device)
            out.append(response_logprobs(self.model, chunk, self.logprob_chunk, self.temperature).cpu())
        return torch.cat(out)

    def ready(self) -> str:
        return self.role
