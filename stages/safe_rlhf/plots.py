"""The round's training curves: reward and cost against the threshold, lambda, episode cost."""
from __future__ import annotations

from pathlib import Path


def training_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    steps = [h["step"] for h in history]
    axes[0].plot(steps, [h["reward_mean"] for h in history], label="reward")
    if history and "cost_mean" in history[0]:
        axes[0].plot(steps, [h["cost_mean"] for h in history], label="cost")
        axes[0].axhline(history[0].get("threshold", 0), color="k", lw=0.8, ls="--", label="threshold")
    axes[0].legend()
    axes[0].set_xlabel("step")
    if history and "lambda" in history[0]:
        axes[1].plot(steps, [h["lambda"] for h in history], color="tab:purple")
        axes[1].set_title("lambda")
        axes[2].plot(steps, [h["episode_cost"] for h in history], color="tab:red")
        axes[2].set_title("episode cost (window mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
