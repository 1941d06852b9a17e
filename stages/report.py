"""The `report` stage: `report.md` with the run's tables and plots, in the stage folder.

Tables: each policy's oracle harmful rate and helpfulness, reward/cost under the final models,
safe share, reward-helpfulness gap; the arena of each round against the previous policy; the
reward and cost models' accuracy after each (re)fit. Plots: harmful rate and helpfulness by
round, reward and cost distributions by round, lambda and episode cost over the steps.
"""
from __future__ import annotations

import json
from pathlib import Path

from stages.base import StageResult


def _plots(out: Path, evaluation: dict, samples: list[dict], rounds: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in evaluation if n != "arena"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
    ax[0].bar(names, [evaluation[n]["harmful_rate"] for n in names], color="tab:red")
    ax[0].set_title("oracle harmful rate (harmful prompts)")
    ax[1].bar(names, [evaluation[n]["helpfulness"] for n in names], color="tab:green")
    ax[1].set_title("oracle helpfulness (benign prompts)")
    for a in ax:
        a.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "harm_helpfulness.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
    for n in names:
        rows = [s for s in samples if s["policy"] == n]
        ax[0].hist([r["reward"] for r in rows], bins=30, histtype="step", label=n)
        ax[1].hist([r["cost"] for r in rows], bins=30, histtype="step", label=n)
    ax[0].set_title("reward (final reward model)")
    ax[1].set_title("cost (final cost model)")
    ax[1].axvline(0, color="k", lw=0.8)
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "score_distributions.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
    offset = 0
    for name, steps in rounds.items():
        xs = [offset + m["step"] for m in steps]
        if steps and "lambda" in steps[0]:
            ax[0].plot(xs, [m["lambda"] for m in steps], label=name)
            ax[1].plot(xs, [m["episode_cost"] for m in steps], label=name)
            ax[1].plot(xs, [m["threshold"] for m in steps], color="k", lw=0.7, ls="--")
        offset += len(steps)
    ax[0].set_title("lambda")
    ax[1].set_title("episode cost (window mean) and threshold")
    ax[0].legend(fontsize=7)
    for a in ax:
        a.set_xlabel("PPO step (rounds back to back)")
    fig.tight_layout()
    fig.savefig(out / "lambda_episode_cost.png", dpi=90)
    plt.close(fig)


def _table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def run(ctx) -> StageResult:
    from stages.oracle_eval import read_jsonl

    evaluation = json.loads(ctx.input("evaluate", "evaluation").read_text())
    samples = read_jsonl(ctx.input("evaluate", "samples"))
    rounds = {n: read_jsonl(ctx.input(n, "metrics")) for n in sorted(ctx.inputs) if n.startswith("safe_rlhf@")}
    _plots(ctx.out_dir, evaluation, samples, rounds)
    names = [n for n in evaluation if n != "arena"]
    cols = ["harmful_rate", "helpfulness", "reward_mean", "cost_mean", "safe_share", "reward_helpfulness_gap"]
    parts = [f"# Safe RLHF run `{ctx.cfg.name}`", "",
             "Oracle figures come from the built-in world's judge, independent of the learned models; reward and cost "
             "are under the final reward and cost models.", "", "## Policies", "",
             _table(["policy"] + cols, [[n] + [evaluation[n][c] for c in cols] for n in names]), "",
             "![harm and helpfulness](harm_helpfulness.png)", "", "## Arena (newer policy vs older, same prompts)", "",
             _table(["match", "win", "tie", "loss", "safe/safe", "safe/unsafe", "unsafe/safe", "unsafe/unsafe"],
                    [[m, a["win_rate"], a["tie_rate"], a["loss_rate"], *a["safety_table"].values()]
                     for m, a in evaluation["arena"].items()]),
             "", "Safety table: (newer, older) answer safe or unsafe by the oracle.", "", "## Reward and cost models", ""]
    fit_rows = []
    for n in sorted(n for n in ctx.inputs if n.split("@")[0] in ("fit_reward", "fit_cost")):
        m = json.loads((ctx.run_dir / "stages" / n / "manifest.json").read_text())["metrics"]
        fit_rows.append([n, m.get("eval_accuracy"), m.get("policy_accuracy"), m.get("eval_sign_accuracy", "")])
    parts += [_table(["model", "eval_accuracy", "policy_accuracy", "eval_sign_accuracy"], fit_rows), "",
              "![score distributions](score_distributions.png)", "", "## Rounds", ""]
    round_rows = []
    for n, steps in rounds.items():
        last = steps[-1]
        round_rows.append([n, len(steps), last.get("threshold", ""), steps[0].get("lambda", ""), last.get("lambda", ""),
                           last["reward_mean"], last.get("cost_mean", ""), last["kl"]])
    parts += [_table(["round", "steps", "threshold", "lambda (first)", "lambda (last)", "reward", "cost", "kl"], round_rows),
              "", "![lambda and episode cost](lambda_episode_cost.png)", ""]
    text = "\n".join(parts)
    (ctx.out_dir / "report.md").write_text(text)
    # A copy at the top of the run directory, its images pointing into this stage's folder.
    rel = ctx.out_dir.relative_to(ctx.run_dir)
    (ctx.run_dir / "report.md").write_text(text.replace("](", f"]({rel}/"))
    ctx.log(f"  report: {ctx.out_dir / 'report.md'}")
    return StageResult({"report": "report.md", "harm_plot": "harm_helpfulness.png",
                        "score_plot": "score_distributions.png", "lambda_plot": "lambda_episode_cost.png"},
                       {"policies": len(names)})
