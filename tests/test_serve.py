"""Serving a finished run on Ray Serve, with the default engine (vLLM): OpenAI-style chat with
reward and cost on every answer, the safety gate, the score route, input limits, a small load, and
a clean shutdown (by SIGTERM to the process; by Ctrl-C to the whole process group)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO, free_port, session_left

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(small_pipeline, ray_cluster, tmp_path_factory):
    """`python -m pipeline serve` of the small run's SFT model and round, joined to the test cluster,
    on the serve defaults (the run's engine: vLLM; serve.max_tokens_limit 256, above what the small
    model's 256 positions leave after a 64-token prompt) but for max_n."""
    run = tmp_path_factory.mktemp("served") / "run"
    shutil.copytree(small_pipeline["run_dir"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["safe_rlhf"]["engine"] == "vllm" and cfg["serve"]["engine"] is None  # the default: the run's engine
    cfg["serve"] = {"max_n": 6}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--run-dir", str(run), "--policy", "sft",
                             "--policy", "safe_rlhf@1", "--port", str(port)], cwd=REPO, env=ray_cluster.driver_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, url)
    yield {"url": url, "proc": proc, "run": run, "cluster": ray_cluster}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def wait_until_up(proc, url: str, timeout: float = 420) -> None:
    import httpx

    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "the service did not come up"
        time.sleep(1)


def post(served, path, body, **kw):
    import httpx

    return httpx.post(served["url"] + path, json=body, timeout=120, **kw)


def chat(model, content, **kw):
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 24, **kw}


def test_chat_answers_carry_the_run_s_last_reward_and_cost_models_scores(served):
    from actors.scorer import Scorer

    r = post(served, "/v1/chat/completions", chat("safe_rlhf@1", "how do i bake bread ?", seed=3, n=2))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "safe_rlhf@1" and len(out["choices"]) == 2
    usage = out["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] >= 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # Scored again here, in this process, by the fitted models themselves (no Serve, no batching).
    stages = served["run"] / "stages"
    answers = [c["message"]["content"] for c in out["choices"]]
    for role in ("reward", "cost"):
        own = Scorer(role, str(stages / "fit_reward" / "model" if role == "reward" else stages / "fit_cost" / "model"))
        expected = own.score_texts(["how do i bake bread ?"] * 2, answers, 64, 192)
        assert [c["safety"][role] for c in out["choices"]] == pytest.approx(expected, abs=1e-4), role
    for choice in out["choices"]:
        assert choice["safety"]["safe"] == (choice["safety"]["cost"] <= 0)
    listed = post(served, "/v1/score", [{"prompt": "p", "response": "a"}, {"prompt": "q", "response": "b"}]).json()
    assert listed["object"] == "list" and len(listed["data"]) == 2


def test_models_state_their_context_gate_line_and_evaluation(served):
    import httpx

    models = httpx.get(served["url"] + "/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == ["sft", "safe_rlhf@1"]
    positions = json.loads((served["run"] / "stages" / "sft" / "model" / "config.json").read_text())["max_position_embeddings"]
    evaluation = json.loads((served["run"] / "stages" / "evaluate" / "evaluation.json").read_text())
    for m in models:
        assert (m["context"], m["max_prompt_tokens"], m["max_tokens_limit"]) == (positions, 64, positions - 64)
        # one line for every policy, under the run's last cost model: its sign line
        assert m["gate"] == {"threshold": 0.0, "line": "cost <= 0: the cost model's safe/unsafe sign line",
                             "cost_model": "fit_cost"}
        for name in ("harmful_rate", "over_refusal_rate", "benign_harm_rate", "degenerate_rate", "truncated_rate"):
            assert m["evaluation"][name] == evaluation[m["id"]][name], name
    a = post(served, "/v1/completions", {"model": "sft", "prompt": "how can i rob a house ?", "seed": 1, "max_tokens": 24}).json()
    b = post(served, "/v1/completions", {"model": "safe_rlhf@1", "prompt": "how can i rob a house ?", "seed": 1,
                                         "max_tokens": 24}).json()
    assert (a["model"], b["model"], a["object"]) == ("sft", "safe_rlhf@1", "text_completion")
    assert a["choices"][0]["text"] and b["choices"][0]["text"]


def test_the_gate_returns_the_highest_reward_candidate_that_passes(served):
    answered = 0
    for prompt in ("how can i rob a house ?", "how do i bake bread ?"):
        for seed in range(3):
            out = post(served, "/v1/chat/completions", chat("safe_rlhf@1", prompt, seed=seed, gate="best_of_n", n=4)).json()
            gate, (choice,) = out["gate"], out["choices"]
            scores = gate["scores"]
            passing = [i for i, s in enumerate(scores) if s["cost"] <= 0.0]
            assert gate["candidates"] == len(scores) == 4 and gate["passed"] == len(passing) and gate["threshold"] == 0.0
            if passing:
                best = max(passing, key=lambda i: scores[i]["reward"])
                assert gate["chosen"] == best and not gate["refused"]
                assert choice["safety"]["reward"] == scores[best]["reward"] and choice["safety"]["cost"] <= 0.0
                answered += 1
            else:
                assert gate["refused"] and gate["chosen"] is None
                assert choice["message"]["content"].startswith("I can't help with that")
    assert answered >= 1  # the benign prompt's answers pass: the pass branch ran


@pytest.mark.parametrize("safety, threshold, chosen, passed", [
    ([{"reward": 5.0, "cost": 0.5}, {"reward": 1.0, "cost": -1.0}, {"reward": 2.0, "cost": 0.0}], 0.0, 2, 2),  # 0 passes
    ([{"reward": 5.0, "cost": 0.5}, {"reward": 1.0, "cost": -1.0}], 1.0, 0, 2),  # a looser line
    ([{"reward": 5.0, "cost": 0.5}, {"reward": 9.0, "cost": 0.1}], 0.0, None, 0),  # none passes: refuse
    ([{"reward": 3.0, "cost": -1.0}, {"reward": 3.0, "cost": -2.0}], 0.0, 0, 2),  # a tie: the first
])
def test_gate_pick_with_chosen_scores(safety, threshold, chosen, passed):
    from pipeline.serve import gate_pick

    assert gate_pick(safety, threshold) == (chosen, passed)


def test_bad_input_gets_a_4xx_naming_the_field_and_the_service_goes_on(served):
    import httpx

    many = [{"role": "user", "content": "hi"}] * 33
    cases = [
        (httpx.post(served["url"] + "/v1/chat/completions", content=b"{not json", timeout=30,
                    headers={"content-type": "application/json"}), 400, "body"),
        (post(served, "/v1/chat/completions", chat("sft", "hi", max_tokens="many")), 400, "max_tokens"),
        (post(served, "/v1/chat/completions", chat("no-such-model", "hi")), 404, "model"),
        (post(served, "/v1/chat/completions", {"model": "sft", "messages": []}), 400, "messages"),
        (post(served, "/v1/chat/completions", chat("sft", "word " * 400)), 400, "messages"),
        # over model.max_prompt_tokens (64) yet well within the context: refused, not cut from the left
        (post(served, "/v1/chat/completions", chat("sft", "word " * 80)), 400, "messages"),
        (post(served, "/v1/completions", {"model": "sft", "prompt": "word " * 80}), 400, "prompt"),
        (post(served, "/v1/chat/completions", {"model": "sft", "messages": many}), 400, "messages"),
        (post(served, "/v1/chat/completions", chat("sft", "a" * 8001)), 400, "messages.0.content"),
        (post(served, "/v1/chat/completions", chat("sft", "hi", n=7)), 400, "n"),
        (post(served, "/v1/chat/completions", chat("sft", "hi", max_tokens=193)), 400, "max_tokens"),
        (post(served, "/v1/completions", {"model": "sft", "prompt": ""}), 400, "prompt"),
        (post(served, "/v1/score", {"prompt": "p"}), 400, "response"),
        (post(served, "/v1/score", {"prompt": "p", "response": "r" * 8001}), 400, "response"),
        (post(served, "/v1/score", [{"prompt": "p", "response": "r"}] * 65), 400, "body"),
        (post(served, "/v1/score", [{"prompt": "p" * 100_000, "response": "r"}] * 3), 413, "body"),
        (httpx.get(served["url"] + "/docs", timeout=30), 404, None),
        (httpx.get(served["url"] + "/openapi.json", timeout=30), 404, None),
    ]
    for response, status, field in cases:
        assert response.status_code == status, (field, response.text)
        assert response.json()["error"]["param"] == field, response.text
    good = post(served, "/v1/chat/completions", chat("sft", "how do i bake bread ?", max_tokens=192))
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"]


def test_a_small_load_is_answered_in_full(served):
    sys.path.insert(0, str(REPO / "bench"))
    import serve_load

    assert serve_load.main(["--url", served["url"], "--requests", "8", "--clients", "4", "--max-tokens", "8",
                            "--model", "safe_rlhf@1", "--gate-n", "2"]) == 0


def test_sigterm_stops_the_service_and_leaves_no_serve_application(served):
    proc = served["proc"]
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    assert proc.wait(timeout=60) == 0
    assert time.time() - t0 < 30
    assert served["url"] in proc.stdout.read()  # it printed where it served
    left = [a["name"] for a in served["cluster"].list_actors(state="ALIVE") if "safe_rlhf" in (a.get("name") or "")]
    assert left == []
    assert (served["run"] / "serve_config.yaml").is_file()
    cfg = yaml.safe_load((served["run"] / "serve_config.yaml").read_text())
    assert cfg["applications"][0]["import_path"] == "pipeline.serve:app_builder"
    assert cfg["applications"][0]["args"]["policies"] == ["sft", "safe_rlhf@1"]


def test_ctrl_c_to_the_process_group_stops_a_service_with_its_own_cluster_within_30_s(small_pipeline, tmp_path):
    """As a terminal's Ctrl-C: SIGINT to the whole group, the local Ray cluster the service started
    included (it used to wait on a GCS that was already gone). Nothing of the group is left."""

    run = tmp_path / "run"
    shutil.copytree(small_pipeline["run_dir"], run)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--run-dir", str(run), "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}")
        r = post({"url": f"http://127.0.0.1:{port}"}, "/v1/chat/completions", chat("safe_rlhf@1", "how do i bake bread ?"))
        assert r.status_code == 200, r.text  # the default policy (the last round), on vLLM
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.time()
        proc.wait(timeout=60)
        assert time.time() - t0 < 30
        left = session_left(proc.pid)  # the cluster's own processes end on their own signal: a moment
        assert left == [], left
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
