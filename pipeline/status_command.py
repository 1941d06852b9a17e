"""`python -m pipeline status`: each stage's state, time and key figures as a table (or JSON), and
with --watch the running round's latest step, refreshed until the run ends."""
from __future__ import annotations

import json
import sys
import time


def status_table(status: dict):
    from rich.table import Table

    table = Table(title=f"run {status['run_dir']}")
    for col in ("stage", "state", "time", "key figures"):
        table.add_column(col)
    colours = {"done": "green", "failed": "red", "running": "yellow", "waiting": "magenta", "pending": "dim"}
    for s in status["stages"]:
        figs = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in list(s["metrics"].items())[:5] if not isinstance(v, (dict, list)))
        if s.get("message"):
            figs = s["message"]
        dur = f"{s['duration_s']:.0f}s" if "duration_s" in s else ""
        table.add_row(s["name"], f"[{colours[s['state']]}]{s['state']}[/]", dur, figs)
    return table


def print_status(status: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(status, indent=2, default=str))
        return
    from rich.console import Console

    Console().print(status_table(status))


def round_line(driver, status: dict) -> str | None:
    """The running round's latest step: reward, cost, lambda, unsafe share and an ETA."""
    running = next((s for s in status["stages"] if s["state"] == "running" and "step" in s["metrics"]), None)
    if running is None:
        return None
    m, spec = running["metrics"], driver.by_name[running["name"]]
    rl = driver.cfg.safe_rlhf
    k = dict(spec.params).get("round", 1)
    steps = rl.rounds[k - 1].steps or rl.steps_per_round
    per_step = sum(m.get(t, 0.0) for t in ("time_generate", "time_score", "time_learn", "time_sync"))
    eta = (steps - m["step"]) * per_step
    fig = lambda key, fmt: format(m[key], fmt) if isinstance(m.get(key), (int, float)) else "-"
    return (f"{running['name']}: step {m['step']}/{steps}  reward {fig('reward_mean', '.3f')}  cost {fig('cost_mean', '.3f')}  "
            f"lambda {fig('lambda', '.3f')}  unsafe {fig('unsafe_share', '.3f')}  ETA {eta / 60:.1f} min")


def watch(driver, interval: float) -> int:
    """Refresh the status table every `interval` seconds until the run ends (no driver holds the
    run directory) or Ctrl-C."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    def view():
        status = driver.status()
        line = round_line(driver, status)
        return Group(status_table(status), Text(line or "no round running", style="bold", no_wrap=True, overflow="ignore"))

    from rich.console import Console

    # Not a terminal (a job's log, a pipe): wide enough that the round's line is not cut.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    try:
        with Live(view(), console=console, refresh_per_second=1, transient=False) as live:
            while driver.rd.driver_running():
                time.sleep(interval)
                live.update(view())
            live.update(view())
    except KeyboardInterrupt:
        pass
    return 0
