"""Operating a run as Ray users do: job submission under token auth, the metrics people chart
(Grafana dashboard, Prometheus scrape config, docs/operations.md's metrics table) and `status --watch`."""
import json
import os
import re
import subprocess
import sys
import time

import yaml

from cluster.metrics import METRICS
from tests.conftest import REPO, RayTestCluster

GRAFANA = REPO / "cluster" / "grafana" / "safe_rlhf.json"


# ---------------------------------------------------------------------- metrics people can chart
def test_grafana_dashboard_draws_only_metrics_the_code_exports():
    dash = json.loads(GRAFANA.read_text())
    exported = {f"ray_{name}" for name in METRICS}
    queried = set()
    for panel in dash["panels"]:
        assert panel["datasource"] == "${datasource}" and panel["targets"], panel["title"]
        for t in panel["targets"]:
            names = set(re.findall(r"\bray_[a-z_]+", t["expr"]))
            assert names and names <= exported, (panel["title"], t["expr"])
            queried |= names
    # Ray's conventions: a Prometheus datasource variable, and the SessionName label to pick a run.
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus" and "SessionName" in variables
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for needle in ("threshold", "lambda", "unsafe", "kl", "tokens/s", "phase", "stage durations"):
        assert needle in titles, needle
    assert {"ray_safe_rlhf_threshold", "ray_safe_rlhf_episode_cost", "ray_safe_rlhf_time_sync",
            "ray_safe_rlhf_stage_seconds"} <= queried


def test_every_metric_is_documented_under_its_exported_name():
    readme = (REPO / "docs" / "operations.md").read_text()
    for name, (kind, unit, _) in METRICS.items():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `ray_{name}`")), None)
        assert row is not None, name
        assert kind in row and "`stage`" in row, row


def test_prometheus_config_scrapes_rays_service_discovery_file():
    cfg = yaml.safe_load((REPO / "cluster" / "prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_stages_that_end_before_ray_starts_are_recorded_once_it_does():
    import cluster.metrics as M

    M._pending_stages.clear()
    M._metrics = None
    M.record_stage("world", 3.5)  # Ray is not initialised in this process
    assert M._pending_stages == [("world", 3.5)]
    # (recorded on the first _get() with Ray up; no test scrapes stage_seconds from Prometheus yet:
    # tests/test_round.py's Prometheus test queries the round's lambda and step)


# ---------------------------------------------------------------------- status --watch
def test_status_watch_shows_the_rounds_latest_step_and_exits_when_the_run_ends(tmp_path):
    from pipeline.config import config_to_yaml, parse_config
    from pipeline.rundir import RunDir

    cfg = parse_config({"name": "w", "safe_rlhf": {"rounds": [{"steps": 10}]}})
    rd = RunDir(tmp_path)
    (tmp_path / "config.yaml").write_text(config_to_yaml(cfg))
    lock = rd.lock()  # a driver holds the run
    rd.stage_dir("safe_rlhf@1").mkdir(parents=True)
    rd.set_state("safe_rlhf@1", "running", fingerprint="x",
                 metrics={"step": 4, "reward_mean": 1.25, "cost_mean": -3.5, "lambda": 0.75, "unsafe_share": 0.125,
                          "time_generate": 2.0, "time_score": 1.0, "time_learn": 2.5, "time_sync": 0.5})
    watcher = subprocess.Popen([sys.executable, "-m", "pipeline", "status", "--run-dir", str(tmp_path), "--watch",
                                "--interval", "0.3"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    assert watcher.poll() is None  # still watching while the driver holds the run
    lock.close()  # the run ends
    out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    # 6 steps left x 6 s a step = 0.6 min
    assert "safe_rlhf@1: step 4/10  reward 1.250  cost -3.500  lambda 0.750  unsafe 0.125  ETA 0.6 min" in out


# ---------------------------------------------------------------------- job submission with Ray's defaults
def test_readme_cluster_commands_work_where_a_ray_token_exists(tmp_path):
    """As a user who ran the pipeline locally first (which leaves ~/.ray/auth_token): `ray start
    --head` runs in token mode by itself, and `bash scripts/submit.sh` submits, follows the log
    and exits with the pipeline's exit code, with no environment set by hand."""
    import secrets

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    user_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    user_env["HOME"] = str(home)
    cluster = RayTestCluster(tmp_path / "cluster", env=user_env)  # `ray start --head ...`, as the README says
    try:
        probe = subprocess.run([cluster.bin, "job", "list", "--address", cluster.dashboard], env=user_env,
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode != 0  # token mode: a client without RAY_AUTH_MODE=token is refused
        cfg = tmp_path / "job.yaml"
        cfg.write_text(yaml.safe_dump({"name": "job", "world": {"n_pairs": 200, "n_sft": 100},
                                       "model": {"small": {"vocab_size": 600}}}))
        job = subprocess.run(["bash", "scripts/submit.sh", "--address", cluster.dashboard, "--", "run", "--config", str(cfg),
                              "--run-dir", str(tmp_path / "job_run"), "--until", "ingest"],
                             cwd=REPO, env=user_env, capture_output=True, text=True, timeout=600)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert re.search(r"job \w+ submitted to .* \(token auth on\)", job.stdout)
        assert f"dashboard: {cluster.dashboard}/#/jobs/" in job.stdout
        assert "done  world" in job.stdout and "done  ingest" in job.stdout  # the followed log
        # A job that fails on bad input exits with the pipeline's own code (2), not just "failed".
        bad = subprocess.run(["bash", "scripts/submit.sh", "--address", cluster.dashboard, "--", "validate",
                              "configs/does-not-exist.yaml"], cwd=REPO, env=user_env, capture_output=True, text=True,
                             timeout=600)
        assert bad.returncode == 2, bad.stdout[-2000:] + bad.stderr[-2000:]
    finally:
        cluster.stop()
