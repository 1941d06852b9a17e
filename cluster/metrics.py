"""Custom metrics through `ray.util.metrics`, exported on each node's metrics endpoint with a `ray_`
prefix (e.g. `ray_safe_rlhf_lambda`), scraped by Prometheus (cluster/prometheus.yml) and drawn by
Grafana (cluster/grafana/safe_rlhf.json). Every metric is tagged `stage` (e.g. `safe_rlhf@2`), and
Ray adds `SessionName` and the node's labels.

Created lazily in the driver process, once; every call is a no-op while Ray is not initialised
(unit tests, plain-Python use of the stages). Stage durations that end before Ray starts (world,
ingest) are held and recorded once it does.
"""
from __future__ import annotations

# name (without the ray_ prefix) -> (kind, unit, description). README's "Metrics" table lists them.
METRICS: dict[str, tuple[str, str, str]] = {
    "safe_rlhf_step": ("gauge", "step", "PPO step within the round"),
    "safe_rlhf_steps_total": ("counter", "steps", "PPO steps done"),
    "safe_rlhf_stage_seconds": ("gauge", "s", "Wall time of the last run of a stage"),
    "safe_rlhf_reward_mean": ("gauge", "reward", "Mean reward-model score of the step's answers"),
    "safe_rlhf_cost_mean": ("gauge", "cost", "Mean cost-model score of the step's answers"),
    "safe_rlhf_episode_cost": ("gauge", "cost", "Mean episode cost over the Lagrange window (J_c)"),
    "safe_rlhf_threshold": ("gauge", "cost", "Cost threshold d of the round"),
    "safe_rlhf_lambda": ("gauge", "", "Lagrange multiplier"),
    "safe_rlhf_unsafe_share": ("gauge", "share", "Share of the step's answers the cost model calls unsafe (cost > 0)"),
    "safe_rlhf_kl": ("gauge", "nats/token", "KL(policy || reference) per token"),
    "safe_rlhf_tokens_per_s": ("gauge", "tokens/s", "Generated tokens per second, from dispatch until gathered"),
    "safe_rlhf_time_generate": ("gauge", "s", "Seconds the step waited on generation (hidden behind learning with overlap_generation)"),
    "safe_rlhf_time_score": ("gauge", "s", "Seconds scoring in the step"),
    "safe_rlhf_time_learn": ("gauge", "s", "Seconds in PPO updates in the step"),
    "safe_rlhf_time_sync": ("gauge", "s", "Seconds pushing weights to the rollout workers in the step"),
    "safe_rlhf_time_step": ("gauge", "s", "Seconds of the whole step"),
    "safe_rlhf_rollout_staleness": ("gauge", "steps", "Policy updates between the weights that sampled the step's rollouts and the ones they train (overlap_generation: 1)"),
    "safe_rlhf_logprob_gap": ("gauge", "nats/token", "Mean |engine logprob - learner logprob| of the sampled tokens"),
}
STEP_KEYS = [n.removeprefix("safe_rlhf_") for n, (kind, _, _) in METRICS.items()
             if kind == "gauge" and n not in ("safe_rlhf_step", "safe_rlhf_stage_seconds")]

_metrics: dict | None = None
_pending_stages: list[tuple[str, float]] = []  # durations recorded before Ray was up


def _get() -> dict | None:
    global _metrics
    try:
        import ray
        from ray.util.metrics import Counter, Gauge
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    if _metrics is None:
        tags = ("stage",)
        _metrics = {name: (Counter if kind == "counter" else Gauge)(name, desc, tag_keys=tags)
                    for name, (kind, _, desc) in METRICS.items()}
        for stage, seconds in _pending_stages:
            _metrics["safe_rlhf_stage_seconds"].set(seconds, tags={"stage": stage})
        _pending_stages.clear()
    return _metrics


def record_step(stage: str, metrics: dict) -> None:
    m = _get()
    if m is None:
        return
    tags = {"stage": stage}
    m["safe_rlhf_step"].set(metrics["step"], tags=tags)
    m["safe_rlhf_steps_total"].inc(1, tags=tags)
    for key in STEP_KEYS:
        if metrics.get(key) is not None:
            m[f"safe_rlhf_{key}"].set(float(metrics[key]), tags=tags)


def record_stage(stage: str, seconds: float) -> None:
    """A stage's wall time; held until Ray is up when it ended before (then recorded at once)."""
    m = _get()
    if m is None:
        _pending_stages.append((stage, seconds))
    else:
        m["safe_rlhf_stage_seconds"].set(seconds, tags={"stage": stage})


def flush_pending() -> None:
    """Record the held stage durations now (call once Ray is up)."""
    _get()
