"""Score model: any `AutoModel` backbone plus `Linear(hidden, 1)`.

Used for the reward model, the cost model and the two critics. The score of a sequence is the
head's output at its last non-padding token (`pooling="last"`, the paper's choice for a causal LM),
or its mean over the sequence's tokens (`pooling="mean"`: the head on the mean-pooled hidden state,
an encoder's usual sentence summary, e.g. all-MiniLM-L6-v2's); per-token outputs are the critics'
values. A cost
model may also have one head per harm category (`categories`, `category_scores`; saved as
`category_head.safetensors`, the names in `score_config.json`); without categories nothing of
that exists, and the model and its files are as before.
Saved as a Hugging Face directory: the backbone (config + safetensors), the tokenizer, and
`score_head.safetensors` + `score_config.json` beside them, so transformers loads the backbone
and `ScoreModel.from_pretrained` restores the whole model exactly.

Positions are computed from the attention mask (cumsum - 1), so a left-padded sequence gets the
same positions, and therefore the same score, as a right-padded one (DESIGN.md: a padding-side
bug in scoring looked exactly like reward hacking).
"""
from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import torch
from torch import nn

from actors.experience import pad, position_ids
from core.objectives import last_token_index

log = logging.getLogger(__name__)

SCORE_CONFIG = "score_config.json"
POOLINGS = ("last", "mean")
SCORE_HEAD = "score_head.safetensors"
CATEGORY_HEAD = "category_head.safetensors"


def load_backbone(path: str | Path, dtype=None) -> nn.Module:
    """The base model of a checkpoint (`AutoModel`). The checkpoint's own head (a causal LM's
    lm_head) is left out by design, so transformers' load report, which lists it as UNEXPECTED in
    every fit's log, is not printed; backbone weights the checkpoint lacks (they would start random)
    or whose shapes differ are still reported, by name."""
    from transformers import AutoModel

    report = logging.getLogger("transformers.modeling_utils")  # where transformers logs its load report
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        backbone, info = AutoModel.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    finally:
        report.setLevel(level)
    missing, mismatched = sorted(info.get("missing_keys") or []), info.get("mismatched_keys") or []
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights not in the checkpoint start random: {', '.join(missing[:8])}")
    if mismatched:
        problems.append(f"{len(mismatched)} weights of another shape: {mismatched[:8]}")
    if problems:
        log.warning("backbone %s: %s", path, "; ".join(problems))
    return backbone


class ScoreModel(nn.Module):
    def __init__(self, backbone: nn.Module, score_type: str = "reward", categories: tuple[str, ...] = (),
                 pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        self.backbone = backbone
        self.pooling = pooling
        self.config = backbone.config
        hidden = getattr(backbone.config, "hidden_size", None) or backbone.config.n_embd
        self.score_head = nn.Linear(hidden, 1)
        self.score_type = score_type  # "reward" | "cost" | "reward_critic" | "cost_critic"
        self.categories = tuple(categories)  # harm categories, one head each (a per-category cost model)
        if self.categories:
            self.category_head = nn.Linear(hidden, len(self.categories))
        self._takes_positions = "position_ids" in inspect.signature(backbone.forward).parameters

    @classmethod
    def from_backbone(cls, path: str | Path, score_type: str = "reward", dtype=None, seed: int = 0,
                      categories: tuple[str, ...] = (), pooling: str = "last") -> "ScoreModel":
        """A new score model on a pretrained backbone (e.g. the SFT model); the heads start near 0."""
        backbone = load_backbone(path, dtype)
        model = cls(backbone, score_type, categories, pooling)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for head in [model.score_head] + ([model.category_head] if model.categories else []):
                head.weight.normal_(0.0, 1.0 / (head.in_features ** 0.5 * 10), generator=g)
                head.bias.zero_()
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=None) -> "ScoreModel":
        from safetensors.torch import load_file
        from transformers import AutoModel

        path = Path(path)
        meta = json.loads((path / SCORE_CONFIG).read_text())
        model = cls(AutoModel.from_pretrained(str(path), dtype=dtype), meta["score_type"], meta.get("categories", ()),
                    meta.get("pooling", "last"))  # directories written before pooling existed are "last"
        model.score_head.load_state_dict(load_file(str(path / SCORE_HEAD)))
        if model.categories:
            model.category_head.load_state_dict(load_file(str(path / CATEGORY_HEAD)))
        return model.to(dtype) if dtype is not None else model

    def save_pretrained(self, path: str | Path, tokenizer=None, state_dict: dict | None = None, **meta) -> None:
        """Write the HF directory. `state_dict` (full, unsharded) may come from a ZeRO-3 gather."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()
        backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        head_sd = {k[len("score_head."):]: v.contiguous() for k, v in sd.items() if k.startswith("score_head.")}
        self.backbone.save_pretrained(str(path), state_dict=backbone_sd, safe_serialization=True)
        save_file(head_sd, str(path / SCORE_HEAD))
        if self.categories:
            prefix = "category_head."
            save_file({k[len(prefix):]: v.contiguous() for k, v in sd.items() if k.startswith(prefix)},
                      str(path / CATEGORY_HEAD))
            meta = {"categories": list(self.categories), **meta}
        (path / SCORE_CONFIG).write_text(json.dumps({"score_type": self.score_type, "pooling": self.pooling, **meta}, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"position_ids": position_ids(attention_mask)} if self._takes_positions else {}
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state  # [B, L, H]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_categories: bool = False):
        """-> (values [B, L] per token, end scores [B] at each row's last real token); with_categories:
        also the per-category end scores [B, K], from the same backbone pass."""
        hidden = self._hidden(input_ids, attention_mask)  # [B, L, H]
        values = self.score_head(hidden).squeeze(-1)  # [B, L]
        if self.pooling == "mean":  # the head is linear: the mean of its per-token outputs is its output on the mean
            end = (values * attention_mask).sum(1) / attention_mask.sum(1)  # [B]
        else:
            end = values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)  # [B]
        if not with_categories:
            return values, end
        if not self.categories:
            raise ValueError("this score model has no per-category heads (categories=())")
        return values, end, self.category_head(self.pool(hidden, attention_mask))  # [B, K]

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L, H] -> [B, H]: the hidden state the end score reads (last real token, or the masked mean)."""
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]

    @torch.no_grad()
    def pooled_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, H]: what the heads see of each sequence; a frozen backbone's are fixed, so a linear
        probe computes them once (stages/common/linear_probe.py)."""
        return self.pool(self._hidden(input_ids, attention_mask), attention_mask)

    def category_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """-> (shared end scores [B], per-category end scores [B, K])."""
        return self(input_ids, attention_mask, with_categories=True)[1:]


def is_score_model_dir(path: str | Path) -> bool:
    return (Path(path) / SCORE_CONFIG).is_file()


def score_model_categories(path: str | Path) -> tuple[str, ...]:
    """The harm categories a score-model directory has heads for, in head order; () for none."""
    return tuple(json.loads((Path(path) / SCORE_CONFIG).read_text()).get("categories", ()))


@torch.no_grad()
def end_scores(model, token_lists: list[list[int]], pad_id: int, device, batch: int = 64,
               categories: bool = False) -> list:
    """The end score of each token sequence (prompt + answer + EOS), in batches: the one scoring
    loop of the project (the scorer actors, and the fits' held-out evaluation on their engine).
    categories: each sequence's [shared score, one per category head] instead (a cost model's
    per-category constraints)."""
    out: list = []
    for s in range(0, len(token_lists), batch):
        ids, mask = pad(token_lists[s:s + batch], pad_id)
        out += batch_end_scores(model, ids.to(device), mask.to(device), categories).float().cpu().tolist()
    return out


def batch_end_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, categories: bool = False) -> torch.Tensor:
    """[B] end scores of one padded batch; categories: [B, 1 + K], the shared end score, then the K
    per-category end scores, from one backbone pass."""
    if not categories:
        return model(input_ids, attention_mask)[1]
    _, shared, per_category = model(input_ids, attention_mask, with_categories=True)
    return torch.cat([shared.unsqueeze(1), per_category], 1)
