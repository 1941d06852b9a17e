"""Small stages for testing the driver's manifest, skip and resume logic in isolation."""
import json
import os

from stages.base import StageResult

CALLS = []  # (stage name, checkpoint found) per invocation


def produce(ctx):
    """Writes a value derived from config; optionally crashes after a checkpoint."""
    ckpt = ctx.out_dir / "checkpoint.json"
    CALLS.append((ctx.name, ckpt.exists()))
    start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    ckpt.write_text(json.dumps({"step": start + 1}))
    if os.environ.get("FAKE_CRASH") == ctx.name:
        raise RuntimeError("injected crash")
    if os.environ.get("FAKE_INTERRUPT") == ctx.name:  # Ctrl-C now: SIGINT reaches the driver's (main) thread
        import signal
        import time

        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1.0)
        raise SystemExit(0)  # as Ray's calls in a stage end once the driver has shut Ray down
    (ctx.out_dir / "value.txt").write_text(f"{ctx.cfg.world.n_pairs}")
    return StageResult({"value": "value.txt"}, {"resumed_from_step": start})


def consume(ctx):
    CALLS.append((ctx.name, False))
    value = ctx.input("a", "value").read_text()
    (ctx.out_dir / "double.txt").write_text(value * 2)
    return StageResult({"double": "double.txt"}, {"length": len(value)})


run = produce
