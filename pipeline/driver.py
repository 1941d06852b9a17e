"""The driver: runs the stage graph over a run directory, skipping what is done, resuming the rest.

A stage is done when its manifest exists, its fingerprint matches what the current config and
inputs give, and its outputs are there. `run` executes every stage that is not done, in order.
`resume` does the same with the run directory's saved config; `--from-stage S` forces S and
everything downstream of it to re-run from scratch; `--only-stage S` re-runs S alone, from
scratch if it was done, from its checkpoints if it was interrupted (downstream stages whose
inputs it changes then show as pending until the next run).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, config_hash, config_to_yaml, load_config
from pipeline.graph import StageSpec, build_graph, downstream_of
from pipeline.rundir import RunDir, atomic_write_text, hash_path
from stages.base import StageContext, StageResult, StageWaiting


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _select(cfg_dump: dict, dotted: str) -> Any:
    node: Any = cfg_dump
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    return node


class Driver:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, graph: list[StageSpec] | None = None):
        self.cfg = cfg
        self.rd = RunDir(run_dir)
        self.graph = graph if graph is not None else build_graph(cfg)
        self.by_name = {s.name: s for s in self.graph}
        self._ray_connected = False  # this driver initialised Ray
        self._ray_checked = False
        self._external_hashes: dict[Path, str] = {}

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> "Driver":
        rd = RunDir(run_dir)
        if not rd.config_path.is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml); start one with `python -m pipeline run`")
        return cls(load_config(rd.config_path), run_dir)

    # ------------------------------------------------------------------ fingerprints
    def _external_hash(self, path: Path) -> str:
        if path not in self._external_hashes:
            if not path.exists():
                raise FileNotFoundError(f"input file {path} does not exist")
            self._external_hashes[path] = hash_path(path)
        return self._external_hashes[path]

    def expected_fingerprint(self, spec: StageSpec) -> tuple[str, dict] | None:
        """(fingerprint, inputs) for the stage, or None while an upstream stage is not done."""
        dump = self.cfg.model_dump(mode="json")
        cfg_slice = {k: _select(dump, k) for k in spec.config_keys}
        inputs: dict[str, str] = {}
        for dep in spec.deps:
            if self.status_of(dep) != "done":
                return None
            m = self.rd.manifest(dep)
            inputs[dep] = hashlib.sha256(json.dumps({k: v["sha256"] for k, v in m["outputs"].items()},
                                                    sort_keys=True).encode()).hexdigest()
        for path in spec.external_inputs(self.cfg):
            inputs[f"file:{path}"] = self._external_hash(path)
        chash = config_hash({"stage": spec.base_name, "params": list(spec.params), "config": cfg_slice})
        fp = hashlib.sha256(json.dumps({"config": chash, "inputs": inputs}, sort_keys=True).encode()).hexdigest()[:16]
        return fp, {"config_hash": chash, "inputs": inputs}

    def status_of(self, name: str) -> str:
        spec = self.by_name[name]
        m = self.rd.manifest(name)
        if m is not None:
            exp = self.expected_fingerprint(spec)
            outputs_there = all((self.rd.stage_dir(name) / o["path"]).exists() for o in m["outputs"].values())
            if exp is not None and exp[0] == m["fingerprint"] and outputs_there:
                return "done"
        st = self.rd.state(name)
        if st and st["state"] in ("running", "failed", "waiting"):
            return st["state"]
        return "pending"

    def status(self) -> dict:
        stages = []
        for s in self.graph:
            state = self.status_of(s.name)
            m = self.rd.manifest(s.name) or {}
            st = self.rd.state(s.name) or {}
            entry = {"name": s.name, "state": state, "metrics": m.get("metrics", {}) if state == "done" else st.get("metrics", {})}
            if state in ("failed", "waiting") and st.get("error"):
                entry["message"] = st["error"]
            if m.get("duration_s") is not None and state == "done":
                entry["duration_s"] = m["duration_s"]
            stages.append(entry)
        return {"run_dir": str(self.rd.root), "stages": stages}

    # ------------------------------------------------------------------ running
    def _inputs_for(self, spec: StageSpec) -> dict[str, dict[str, Path]]:
        out = {}
        for dep in spec.deps:
            m = self.rd.manifest(dep)
            out[dep] = {k: self.rd.stage_dir(dep) / v["path"] for k, v in m["outputs"].items()}
        return out

    def _ensure_ray(self) -> None:
        if not self._ray_checked:
            from cluster.ray_session import connect

            self._ray_connected = connect(self.cfg.ray)
            self._ray_checked = True

    def run_stage(self, spec: StageSpec, force: bool = False, fresh: bool | None = None) -> str:
        """Run one stage unless it is done (`force` runs it anyway). `fresh` discards its folder
        (in-stage checkpoints included); by default a forced run starts fresh."""
        exp = self.expected_fingerprint(spec)
        if exp is None:
            raise RuntimeError(f"stage {spec.name}: upstream stages {list(spec.deps)} are not done")
        fp, fp_inputs = exp
        if not force and self.status_of(spec.name) == "done":
            m = self.rd.manifest(spec.name)
            log(f"skip  {spec.name}: done, inputs and config unchanged ({_figures(m.get('metrics', {}))})")
            self.rd.event(stage=spec.name, event="skip")
            return "done"
        out_dir = self.rd.stage_dir(spec.name)
        prev = self.rd.state(spec.name) or {}
        fresh = force if fresh is None else fresh
        if fresh or (out_dir.exists() and prev.get("fingerprint") != fp):
            # Different inputs or config, or a forced re-run: in-stage checkpoints are stale.
            shutil.rmtree(out_dir, ignore_errors=True)
        elif out_dir.exists() and prev:
            log(f"resume {spec.name}: continuing in {out_dir} from its checkpoints, if any")
        self.rd.clear_manifest(spec.name)
        out_dir.mkdir(parents=True, exist_ok=True)
        if spec.needs_ray:
            self._ensure_ray()
        self.rd.set_state(spec.name, "running", fingerprint=fp)
        self.rd.event(stage=spec.name, event="start", fingerprint=fp)
        log(f"start {spec.name}")
        t0 = time.time()
        ctx = StageContext(spec.name, self.cfg, out_dir, self._inputs_for(spec), self.rd.root, log=log,
                           params=dict(spec.params),
                           report=lambda m: self.rd.set_state(spec.name, "running", fingerprint=fp, metrics=m))
        try:
            result: StageResult = spec.load()(ctx)
        except StageWaiting as e:
            self.rd.set_state(spec.name, "waiting", fingerprint=fp, error=str(e))
            self.rd.event(stage=spec.name, event="waiting", message=str(e))
            log(f"wait  {spec.name}: {e}")
            return "waiting"
        except BaseException as e:
            self.rd.set_state(spec.name, "failed", fingerprint=fp, error=f"{type(e).__name__}: {e}",
                              traceback=traceback.format_exc())
            self.rd.event(stage=spec.name, event="fail", error=f"{type(e).__name__}: {e}")
            log(f"FAIL  {spec.name} after {time.time() - t0:.1f}s: {type(e).__name__}: {e}")
            raise
        outputs = {}
        for key, rel in result.outputs.items():
            p = out_dir / rel
            if not p.exists():
                raise RuntimeError(f"stage {spec.name} declared output {key}={rel} but did not write it")
            outputs[key] = {"path": rel, "sha256": hash_path(p)}
        duration = round(time.time() - t0, 2)
        manifest = {"stage": spec.name, "fingerprint": fp, **fp_inputs, "outputs": outputs,
                    "metrics": result.metrics, "finished_at": time.time(), "duration_s": duration}
        self.rd.write_manifest(spec.name, manifest)  # last, atomically: the stage is done
        self.rd.event(stage=spec.name, event="done", duration_s=duration, metrics=result.metrics)
        from cluster.metrics import record_stage

        record_stage(spec.name, duration)  # a no-op unless Ray is up
        log(f"done  {spec.name} in {duration:.1f}s ({_figures(result.metrics)})")
        return "done"

    def run(self, from_stage: str | None = None, only_stage: str | None = None, until: str | None = None) -> str:
        """Run the graph (up to and including `until`, if given); returns the final state
        ("done", or "waiting" when a person must act)."""
        for name in (from_stage, only_stage, until):
            if name is not None and name not in self.by_name:
                raise ValueError(f"unknown stage {name!r}; this run's stages are: {', '.join(self.by_name)}")
        with self.rd.lock():
            atomic_write_text(self.rd.config_path, config_to_yaml(self.cfg))
            forced = set(downstream_of(self.graph, from_stage)) if from_stage else set()
            try:
                if only_stage:
                    # Done: re-run it from scratch. Interrupted: continue from its checkpoints.
                    done = self.status_of(only_stage) == "done"
                    return self.run_stage(self.by_name[only_stage], force=True, fresh=done)
                for spec in self.graph:
                    if self.run_stage(spec, force=spec.name in forced) == "waiting":
                        return "waiting"
                    if spec.name == until:
                        break
                return "done"
            finally:
                if self._ray_connected:
                    from cluster.ray_session import disconnect

                    disconnect()
                    self._ray_connected = self._ray_checked = False


def _figures(metrics: dict) -> str:
    """The first few scalar metrics, for one log line."""
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items[:6])
