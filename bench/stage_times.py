"""Per-stage wall time and training throughput of a run directory.

    .venv/bin/python -m pipeline run --run-dir runs/bench      # the default config, from scratch
    .venv/bin/python bench/stage_times.py runs/bench
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run_dir: str) -> None:
    root = Path(run_dir) / "stages"
    total = 0.0
    rows = []
    for manifest in sorted(root.glob("*/manifest.json"), key=lambda p: json.loads(p.read_text())["finished_at"]):
        m = json.loads(manifest.read_text())
        total += m["duration_s"]
        log = manifest.parent / "train_log.jsonl"
        tps = ""
        if log.exists():
            steps = [json.loads(l) for l in log.read_text().splitlines() if '"step"' in l]
            if steps:
                tps = f"{steps[-1]['tokens_per_s']:.0f}"
        key = {k: v for k, v in m["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        rows.append((m["stage"], m["duration_s"], tps, ", ".join(f"{k}={v:.3g}" for k, v in list(key.items())[:4])))
    print(f"{'stage':<14}{'seconds':>9}{'train tok/s':>13}  key figures")
    for name, secs, tps, figs in rows:
        print(f"{name:<14}{secs:>9.1f}{tps:>13}  {figs}")
    print(f"{'total':<14}{total:>9.1f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny")
