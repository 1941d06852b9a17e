"""The run directory: saved config, one folder per stage, manifests written atomically and last.

Layout:
    RUN/config.yaml                 the validated config the run uses
    RUN/events.jsonl                stage start/end/skip/fail events (one JSON object a line)
    RUN/stages/NAME/                a stage's outputs (NAME may be "fit_reward@2")
    RUN/stages/NAME/state.json      running | failed | waiting, while the stage is not done
    RUN/stages/NAME/manifest.json   written last: fingerprint, config hash, input hashes,
                                    outputs with their hashes, metrics. Its presence = done.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from core.files import atomic_write_json, read_json

_EVENTS_LOCK = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    def __init__(self, root: str | Path):
        # Absolute: stage paths travel to Ray actors and Ray Train workers, whose working
        # directory is not the driver's (a relative runs/tiny would not resolve there).
        self.root = Path(root).resolve()

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    def stage_dir(self, name: str) -> Path:
        return self.root / "stages" / name

    def manifest(self, name: str) -> dict | None:
        return read_json(self.stage_dir(name) / "manifest.json")

    def finished_stages(self) -> list[str]:
        """The stages with a manifest (written last: the stage is done)."""
        stages = self.root / "stages"
        return [p.name for p in stages.iterdir() if (p / "manifest.json").is_file()] if stages.is_dir() else []

    def write_manifest(self, name: str, manifest: dict) -> None:
        atomic_write_json(self.stage_dir(name) / "manifest.json", manifest)
        (self.stage_dir(name) / "state.json").unlink(missing_ok=True)

    def clear_manifest(self, name: str) -> None:
        (self.stage_dir(name) / "manifest.json").unlink(missing_ok=True)

    def state(self, name: str) -> dict | None:
        st = read_json(self.stage_dir(name) / "state.json")
        if st and st.get("state") == "running":
            # A driver that died (kill -9, lost node) leaves "running" behind: report it as failed.
            if st.get("host") == socket.gethostname() and not _pid_alive(int(st.get("pid", 0))):
                st = {**st, "state": "failed", "error": "interrupted (the driver process is gone)"}
        return st

    def set_state(self, name: str, state: str, **fields: Any) -> None:
        atomic_write_json(self.stage_dir(name) / "state.json",
                          {"state": state, "pid": os.getpid(), "host": socket.gethostname(),
                           "time": time.time(), **fields})

    def event(self, **fields: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": time.time(), **fields}, default=str) + "\n"
        with _EVENTS_LOCK, open(self.root / "events.jsonl", "a") as f:  # stages run in threads: one line at a time
            f.write(line)

    def driver_running(self) -> bool:
        """Whether a driver holds this run directory's lock now (a run in progress)."""
        path = self.root / ".lock"
        if not path.exists():
            return False
        with open(path, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False

    def lock(self):
        """Hold an exclusive lock on the run directory (two drivers on one run would corrupt it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fh = open(self.root / ".lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise RuntimeError(f"another driver is running on {self.root} (lock {self.root / '.lock'})") from None
        return fh
