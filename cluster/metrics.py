"""Custom metrics through `ray.util.metrics`, exported on the cluster's metrics endpoint with a
`ray_` prefix (e.g. `ray_safe_rlhf_lambda`) and shown in the dashboard's Grafana panels.

Created lazily in the driver process, once; every call is a no-op when Ray is not initialised
(unit tests, plain-Python use of the stages).
"""
from __future__ import annotations

_metrics: dict | None = None

STEP_GAUGES = {
    "reward_mean": "Mean reward-model score of the step's answers",
    "cost_mean": "Mean cost-model score of the step's answers",
    "episode_cost": "Mean episode cost over the Lagrange window",
    "lambda": "Lagrange multiplier",
    "unsafe_share": "Share of the step's answers the cost model calls unsafe (cost > 0)",
    "kl": "KL(policy || reference) per token",
    "tokens_per_s": "Generated tokens per second",
    "time_generate": "Seconds generating",
    "time_score": "Seconds scoring",
    "time_learn": "Seconds in PPO updates",
    "time_sync": "Seconds syncing weights to rollout workers",
}


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
        _metrics = {
            "step": Gauge("safe_rlhf_step", "PPO step within the round", tag_keys=tags),
            "steps_total": Counter("safe_rlhf_steps_total", "PPO steps done", tag_keys=tags),
            "stage_seconds": Gauge("safe_rlhf_stage_seconds", "Wall time of the last run of a stage", tag_keys=tags),
            **{k: Gauge(f"safe_rlhf_{k}", desc, tag_keys=tags) for k, desc in STEP_GAUGES.items()},
        }
    return _metrics


def record_step(stage: str, metrics: dict) -> None:
    m = _get()
    if m is None:
        return
    tags = {"stage": stage}
    m["step"].set(metrics["step"], tags=tags)
    m["steps_total"].inc(1, tags=tags)
    for key in STEP_GAUGES:
        if metrics.get(key) is not None:
            m[key].set(float(metrics[key]), tags=tags)


def record_stage(stage: str, seconds: float) -> None:
    m = _get()
    if m is not None:
        m["stage_seconds"].set(seconds, tags={"stage": stage})
