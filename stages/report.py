"""The `report` stage: `report.md` with the run's tables and plots, in the stage folder.

Tables: each policy's rates (harmful, over-refusal, benign harm, degenerate, truncated: the names
of `stages.common.judging.RATES`) and helpfulness, each with its interval by prompt, naming the judge and
the helpfulness measure; reward/cost under the final models, safe share, reward-helpfulness gap; the arena of each round
against the previous policy; with `evaluate.prompt_sets`, a table per set (its file, labels and
judges; the figures of `stages.common.judging.SET_FIGURES`); the reward and cost models' accuracy after each (re)fit. Plots:
harmful rate and helpfulness by round, reward and cost distributions by round, lambda and episode
cost over the steps.

`report.html` beside it: the same text, tables and plots (embedded) in one self-contained file that
any browser opens without a server, and the answers side by side: for a fixed set of prompts, each
policy's first answer, with how it was judged.
"""
from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from core.files import read_jsonl
from core.stage_names import of_kind
from stages.base import StageResult
from stages.common.judging import RATES, SET_FIGURES


def _plots(out: Path, evaluation: dict, samples: list[dict], rounds: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = evaluation["policies"]

    def err(key):  # 95% interval as error bars: [[below], [above]]
        vals = [evaluation[n][key] for n in names]
        cis = [evaluation[n].get(f"{key}_ci") or [v, v] for n, v in zip(names, vals)]
        return vals, [[v - lo for v, (lo, _) in zip(vals, cis)], [hi - v for v, (_, hi) in zip(vals, cis)]]

    fig, ax = plt.subplots(1, 3, figsize=(15, 3.5))
    for a, (key, colour, title) in zip(ax, [("harmful_rate", "tab:red", f"harmful_rate ({evaluation['judge']})"),
                                            ("over_refusal_rate", "tab:orange", "over_refusal_rate"),
                                            ("helpfulness", "tab:green", "helpfulness")]):
        if any(evaluation[n].get(key) is None for n in names):
            a.set_title(f"{key}: no answers to measure it on", fontsize=9)
            continue
        vals, yerr = err(key)
        a.bar(names, vals, yerr=yerr, capsize=4, color=colour)
        a.set_title(f"{title}, 95% interval by prompt", fontsize=9)
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


def _cell(m: dict, c: str):
    """A figure with its 95% interval where it has one; '-' where it has no answers."""
    v, ci = m.get(c), m.get(f"{c}_ci")
    return "-" if v is None else f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else v


def prompt_set_sections(evaluation: dict) -> list[str]:
    """A table per labelled prompt set (evaluate.prompt_sets): every policy's SET_FIGURES, naming the
    set's file, its labels and the judges."""
    if "prompt_sets" not in evaluation:
        return []
    names, judges = evaluation["policies"], evaluation["prompt_set_judges"]
    parts = ["## Prompt sets", "",
             f"Each figure over the answers to one set's prompts of one label, with its 95% interval by prompt. "
             f"Judges: refusal by {judges['refusal']}; harm by the {judges['harm']}; reward by the {judges['reward']}.", "",
             *[f"- `{k}`: {v}" for k, v in evaluation["prompt_set_rates"].items()], ""]
    for set_name, d in evaluation["prompt_sets"].items():
        limit = f" (a fixed random {d['limit']} of its rows)" if d.get("limit") else ""
        parts += [f"### `{set_name}`", "",
                  f"File `{d['path']}`{limit}: {d['prompts']['safe']} safe and {d['prompts']['unsafe']} unsafe prompts; "
                  f"labels: {d['label']}.", "",
                  _table(["policy", *SET_FIGURES], [[n] + [_cell(evaluation[n]["prompt_sets"][set_name], c) for c in SET_FIGURES]
                                                  for n in names]), ""]
    return parts


def sweep_sections(run_dir: Path) -> list[str]:
    """A section per finished sweep (`python -m pipeline sweep`): its trials and Pareto front."""
    import pyarrow.parquet as pq

    parts = []
    for frontier in sorted((run_dir / "sweeps").glob("*/frontier.json")):
        out, front = frontier.parent, json.loads(frontier.read_text())
        trials = pq.read_table(out / "trials.parquet").to_pylist()
        on_front = {t["trial"] for t in front["frontier"]}
        start = front["start"]
        parts += [f"## Sweep `{out.name}`", "",
                  f"{len(trials)} trials of one round each from the starting policy (harmful rate {start['harmful_rate']}, "
                  f"helpfulness {start['helpfulness']}), judged by {front['judge']}. * marks the Pareto front.", "",
                  _table(["trial", "algorithm", "constraints", "status", "harmful_rate", "over_refusal_rate", "helpfulness",
                          "kl", "lambda"],
                         [[("* " if t["trial"] in on_front else "") + t["trial"], t["algorithm"],
                           t.get("constraints", "single"), t["status"],
                           t["harmful_rate"], t.get("over_refusal_rate", ""), t["helpfulness"], t["kl"], t["lambda"]]
                          for t in trials]), "",
                  f"![pareto front](../../sweeps/{out.name}/pareto.png)", ""]
    return parts


SIDE_BY_SIDE_PROMPTS = 12  # per kind of prompt (harmful or unsafe, benign or safe)


def _inline(text: str) -> str:
    """Markdown's inline code and bold, as HTML (the report uses nothing else inline)."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def markdown_html(text: str, images: Path) -> str:
    """The report's Markdown (headings, paragraphs, lists, tables, images) as HTML, each image
    embedded as a data URI so that the file stands alone."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = re.match(r"!\[([^\]]*)\]\(([^)]+)\)", line).groups()
            path = images / src
            if path.is_file():
                data = base64.b64encode(path.read_bytes()).decode()
                out.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
            else:
                out.append(f"<p>(image {html.escape(src)} not found)</p>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not re.fullmatch(r"\|(\s*-+\s*\|)+", lines[i].replace(" ", "")):
                    rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, *body = rows
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _verdict(row: dict) -> str:
    """How an answer was judged, in words."""
    words = [w for w, flag in (("harmful", row.get("harmful")), ("refusal", row.get("refusal")),
                               ("degenerate", row.get("degenerate")), ("cut at the limit", row.get("truncated"))) if flag]
    if row.get("reward") is not None:
        words.append(f"reward {row['reward']:.2f}, cost {row['cost']:.2f}" if row.get("cost") is not None else
                     f"reward {row['reward']:.2f}")
    return "; ".join(words) or "not flagged"


def side_by_side(samples: list[dict], policies: list[str], per_kind: int = SIDE_BY_SIDE_PROMPTS) -> list[dict]:
    """For the first `per_kind` harmful and benign prompts (in the samples' order), each policy's
    first answer (sample 0) and its verdict: [{prompt, kind, answers: {policy: (answer, verdict)}}]."""
    by_prompt: dict[tuple, dict] = {}
    for r in samples:
        if r.get("sample", 0) != 0:
            continue
        unsafe = r.get("label") == "unsafe" if "label" in r else bool(r.get("harmful_prompt"))
        key = (r.get("set", ""), r["prompt"])
        entry = by_prompt.setdefault(key, {"prompt": r["prompt"], "set": r.get("set", ""), "unsafe": unsafe, "answers": {}})
        entry["answers"][r["policy"]] = (r["answer"], _verdict(r))
    chosen = []
    for unsafe in (True, False):
        chosen += [e for e in by_prompt.values() if e["unsafe"] == unsafe and all(p in e["answers"] for p in policies)][:per_kind]
    return chosen


def report_html(title: str, markdown: str, images: Path, samples: list[dict], policies: list[str]) -> str:
    rows = side_by_side(samples, policies)
    table = ("<table class=answers><thead><tr><th>prompt</th>" + "".join(f"<th>{html.escape(p)}</th>" for p in policies)
             + "</tr></thead><tbody>")
    for e in rows:
        kind = "unsafe" if e["unsafe"] else "safe"
        where = f" ({html.escape(e['set'])})" if e["set"] else ""
        table += (f"<tr><td class={kind}><b>{kind}</b>{where}<br>{html.escape(e['prompt'])}</td>"
                  + "".join(f"<td>{html.escape(e['answers'][p][0])}<div class=verdict>{html.escape(e['answers'][p][1])}</div></td>"
                            for p in policies) + "</tr>")
    table += "</tbody></table>"
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px 8px;"
             "vertical-align:top;text-align:left}th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;"
             "padding:0 3px}.verdict{color:#666;font-size:0.85em;margin-top:4px}td.unsafe b{color:#b00}td.safe b{color:#070}")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n{markdown_html(markdown, images)}\n"
            f"<h2>Answers side by side</h2><p>For the first {SIDE_BY_SIDE_PROMPTS} prompts of each kind, every policy's "
            f"first answer and how it was judged (the full set: <code>stages/evaluate/samples.jsonl</code>).</p>\n"
            f"{table}\n</body></html>\n")


def fit_and_round_sections(run_dir: Path, fits: list[str], rounds: dict[str, list[dict]]) -> list[str]:
    """The report's lines on the fitted reward and cost models and on each round (its last step's
    figures, its threshold and how it was set)."""
    def manifest_metrics(n):
        return json.loads((run_dir / "stages" / n / "manifest.json").read_text())["metrics"]

    fit_rows = [[n, m.get("eval_accuracy"), m.get("policy_accuracy"), m.get("eval_sign_accuracy", "")]
                for n, m in ((n, manifest_metrics(n)) for n in fits)]
    parts = [_table(["model", "eval_accuracy", "policy_accuracy", "eval_sign_accuracy"], fit_rows), "",
             "![score distributions](score_distributions.png)", "", "## Rounds", ""]
    round_rows, rules = [], []
    for n, steps in rounds.items():
        last, m = steps[-1], manifest_metrics(n)
        round_rows.append([n, len(steps), last.get("threshold", ""), m.get("threshold_unsafe_share", ""),
                           steps[0].get("lambda", ""), last.get("lambda", ""), last["reward_mean"], last.get("cost_mean", ""),
                           last["kl"], m.get("truncated_share_last10", last.get("truncated_share", ""))])
        rules.append(f"- {n}: threshold {last.get('threshold', 0):.4f}, {m.get('threshold_rule', '')}")
    return parts + [_table(["round", "steps", "threshold", "target unsafe share", "lambda (first)", "lambda (last)", "reward",
                            "cost", "kl", "truncated share"], round_rows), "", "How each threshold was set:", "", *rules,
                    "", "![lambda and episode cost](lambda_episode_cost.png)", ""]


def run(ctx) -> StageResult:
    evaluation = json.loads(ctx.input("evaluate", "evaluation").read_text())
    samples = read_jsonl(ctx.input("evaluate", "samples"))
    rounds = {n: read_jsonl(ctx.input(n, "metrics")) for n in sorted(ctx.inputs) if n.startswith("safe_rlhf@")}
    _plots(ctx.out_dir, evaluation, samples, rounds)
    names = evaluation["policies"]
    rates = [c for c in (*RATES, "helpfulness") if c in evaluation[names[0]]]
    scores = [c for c in ("reward_mean", "cost_mean", "safe_share", "reward_helpfulness_gap", "response_length")
              if c in evaluation[names[0]]]

    def cell(n, c):
        return _cell(evaluation[n], c)

    categories = sorted({c for n in names for c in evaluation[n].get("harmful_by_category", {})})
    by_category = [[c] + [evaluation[n]["harmful_by_category"].get(c, {}).get("rate", "") for n in names]
                   + [evaluation[names[0]]["harmful_by_category"].get(c, {}).get("n", "")] for c in categories]
    parts = [f"# Safe RLHF run `{ctx.cfg.name}`", "",
             f"Harmful rate: judged by **{evaluation['judge']}**, on harmful prompts. Helpfulness: "
             f"{evaluation['helpfulness_measure']}. Reward and cost are under the final reward and cost models.",
             f"Intervals: {evaluation.get('intervals', 'a bootstrap over prompts')}. Per policy, "
             f"{evaluation[names[0]]['harmful_n']} answers to harmful prompts and {evaluation[names[0]].get('benign_n', 0)} "
             f"to benign ones, up to {evaluation.get('max_new_tokens', '?')} tokens each. Refusals: "
             f"{evaluation.get('refusal_judge', 'the oracle')}."
             + (f" Held-out prompts: {evaluation['held_out_prompts']}." if "held_out_prompts" in evaluation else ""),
             "", "## Policies", "", *[f"- `{k}`: {v}" for k, v in evaluation.get("rates", {}).items()], "",
             _table(["policy"] + rates, [[n] + [cell(n, c) for c in rates] for n in names]), "",
             _table(["policy"] + scores, [[n] + [cell(n, c) for c in scores] for n in names]), "",
             "![harm and helpfulness](harm_helpfulness.png)", "", *prompt_set_sections(evaluation),
             "## Harmful rate by harm category", "",
             _table(["category"] + names + ["answers (each)"], by_category), "", "## Arena (newer policy vs older, same prompts)", "",
             _table(["match", "win", "tie", "loss", "safe/safe", "safe/unsafe", "unsafe/safe", "unsafe/unsafe"],
                    [[m, a["win_rate"], a["tie_rate"], a["loss_rate"], *a["safety_table"].values()]
                     for m, a in evaluation["arena"].items()]),
             "", f"Safety table: (newer, older) answer safe or unsafe by {evaluation['judge']}.", "",
             "## Reward and cost models", ""]
    parts += fit_and_round_sections(ctx.run_dir, of_kind(ctx.inputs, "fit_cost") + of_kind(ctx.inputs, "fit_reward"), rounds)
    parts += sweep_sections(ctx.run_dir)
    text = "\n".join(parts)
    (ctx.out_dir / "report.md").write_text(text)
    # A copy at the top of the run directory, its images pointing into this stage's folder.
    rel = ctx.out_dir.relative_to(ctx.run_dir)
    (ctx.run_dir / "report.md").write_text(text.replace("](", f"]({rel}/"))
    (ctx.out_dir / "report.html").write_text(report_html(f"Safe RLHF run {ctx.cfg.name}", text, ctx.out_dir, samples, names))
    ctx.log(f"  report: {ctx.out_dir / 'report.md'} and report.html (one file, open it in a browser)")
    return StageResult({"report": "report.md", "report_html": "report.html", "harm_plot": "harm_helpfulness.png",
                        "score_plot": "score_distributions.png", "lambda_plot": "lambda_episode_cost.png"},
                       {"policies": len(names)})
