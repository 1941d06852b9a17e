"""A round's checkpoints: ckpt/<role>/step_N (DeepSpeed: weights and optimizer state of the policy
and both critics) and ckpt/state_step_N.json (the step, the Lagrange multiplier with its window and,
with overlap_generation, step N+1's rollouts, generated during step N from step N-1's weights),
then ckpt/latest naming N, written last. Two are kept.

Nothing else is needed to continue the same trajectory: each step's prompts, sampling seeds and
minibatch order are functions of the step.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from core.files import atomic_write_text


class RoundCheckpoints:
    def __init__(self, root: Path):
        self.root = root

    def latest(self) -> dict | None:
        f = self.root / "latest"
        if not f.exists():
            return None
        return json.loads((self.root / f"state_step_{int(f.read_text())}.json").read_text())

    def save(self, roles, state: dict) -> None:
        """roles: the round's RoundRoles; state: {"step", "lagrange", "next_rollout"}."""
        step = state["step"]
        roles.save_checkpoint(self.root, f"step_{step}")
        (self.root / f"state_step_{step}.json").write_text(json.dumps(state))
        atomic_write_text(self.root / "latest", str(step))
        for old in sorted(self.root.glob("state_step_*.json"), key=lambda p: int(p.stem.split("_")[-1]))[:-2]:
            n = old.stem.split("_")[-1]
            old.unlink()
            for role_dir in self.root.iterdir():
                if role_dir.is_dir():
                    shutil.rmtree(role_dir / f"step_{n}", ignore_errors=True)

    def load(self, roles, state: dict) -> None:
        roles.load_checkpoint(self.root, f"step_{state['step']}")
