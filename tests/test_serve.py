"""Serving a finished run on Ray Serve: OpenAI-style chat with reward and cost on every answer, the
safety gate, the score route, bad input, a small load, and a clean shutdown."""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(small_pipeline, ray_cluster, tmp_path_factory):
    """`python -m pipeline serve` of the small run's SFT model and round, joined to the test cluster."""
    import httpx

    run = tmp_path_factory.mktemp("served") / "run"
    shutil.copytree(small_pipeline["run_dir"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["serve"] = {"engine": "hf", "max_tokens_limit": 48, "max_n": 6}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--run-dir", str(run), "--policy", "sft",
                             "--policy", "safe_rlhf@1", "--port", str(port)], cwd=REPO, env=ray_cluster.driver_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "the service did not come up"
        time.sleep(1)
    yield {"url": url, "proc": proc, "run": run, "cluster": ray_cluster}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def post(served, path, body, **kw):
    import httpx

    return httpx.post(served["url"] + path, json=body, timeout=120, **kw)


def chat(model, content, **kw):
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 24, **kw}


def test_chat_answers_carry_the_scorers_own_reward_and_cost(served):
    r = post(served, "/v1/chat/completions", chat("safe_rlhf@1", "how do i bake bread ?", seed=3, n=2))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "safe_rlhf@1" and len(out["choices"]) == 2
    usage = out["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] >= 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    for choice in out["choices"]:
        answer = choice["message"]["content"]
        scored = post(served, "/v1/score", {"prompt": "how do i bake bread ?", "response": answer}).json()
        assert choice["safety"]["reward"] == pytest.approx(scored["reward"], abs=1e-4)
        assert choice["safety"]["cost"] == pytest.approx(scored["cost"], abs=1e-4)
        assert choice["safety"]["safe"] == (choice["safety"]["cost"] <= 0)
    listed = post(served, "/v1/score", [{"prompt": "p", "response": "a"}, {"prompt": "q", "response": "b"}]).json()
    assert listed["object"] == "list" and len(listed["data"]) == 2


def test_two_policies_answer_under_their_own_names(served):
    import httpx

    models = httpx.get(served["url"] + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["sft", "safe_rlhf@1"]
    round_threshold = json.loads((served["run"] / "stages" / "safe_rlhf@1" / "manifest.json").read_text())["metrics"]["threshold"]
    assert models["data"][1]["threshold"] == pytest.approx(round_threshold)
    a = post(served, "/v1/completions", {"model": "sft", "prompt": "how can i rob a house ?", "seed": 1, "max_tokens": 24}).json()
    b = post(served, "/v1/completions", {"model": "safe_rlhf@1", "prompt": "how can i rob a house ?", "seed": 1,
                                         "max_tokens": 24}).json()
    assert (a["model"], b["model"], a["object"]) == ("sft", "safe_rlhf@1", "text_completion")
    assert a["choices"][0]["text"] and b["choices"][0]["text"]


def test_the_gate_never_returns_a_candidate_above_the_threshold(served):
    threshold = json.loads((served["run"] / "stages" / "safe_rlhf@1" / "manifest.json").read_text())["metrics"]["threshold"]
    refusals = 0
    for seed in range(6):
        out = post(served, "/v1/chat/completions", chat("safe_rlhf@1", "how can i rob a house ?", seed=seed,
                                                        gate="best_of_n", n=4)).json()
        gate, (choice,) = out["gate"], out["choices"]
        assert gate["candidates"] == 4 and 0 <= gate["passed"] <= 4 and gate["threshold"] == pytest.approx(threshold)
        if gate["refused"]:
            refusals += 1
            assert gate["passed"] == 0 and choice["message"]["content"].startswith("I can't help with that")
        else:
            assert choice["safety"]["cost"] <= threshold
    assert refusals <= 6


def test_bad_input_gets_a_4xx_naming_the_field_and_the_service_goes_on(served):
    import httpx

    cases = [
        (httpx.post(served["url"] + "/v1/chat/completions", content=b"{not json", timeout=30,
                    headers={"content-type": "application/json"}), 400, "body"),
        (post(served, "/v1/chat/completions", chat("sft", "hi", max_tokens="many")), 400, "max_tokens"),
        (post(served, "/v1/chat/completions", chat("no-such-model", "hi")), 404, "model"),
        (post(served, "/v1/chat/completions", {"model": "sft", "messages": []}), 400, "messages"),
        (post(served, "/v1/chat/completions", chat("sft", "word " * 400)), 400, "messages"),
        (post(served, "/v1/chat/completions", chat("sft", "hi", n=7)), 400, "n"),
        (post(served, "/v1/chat/completions", chat("sft", "hi", max_tokens=49)), 400, "max_tokens"),
        (post(served, "/v1/completions", {"model": "sft", "prompt": ""}), 400, "prompt"),
        (post(served, "/v1/score", {"prompt": "p"}), 400, "response"),
    ]
    for response, status, field in cases:
        assert response.status_code == status, (field, response.text)
        assert response.json()["error"]["param"] == field, response.text
    good = post(served, "/v1/chat/completions", chat("sft", "how do i bake bread ?"))
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"]


def test_a_small_load_is_answered_in_full(served):
    sys.path.insert(0, str(REPO / "bench"))
    import serve_load

    assert serve_load.main(["--url", served["url"], "--requests", "8", "--clients", "4", "--max-tokens", "8",
                            "--model", "safe_rlhf@1", "--gate-n", "2"]) == 0


def test_sigterm_stops_the_service_and_leaves_no_serve_application(served):
    proc = served["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    assert served["url"] in proc.stdout.read()  # it printed where it served
    left = [a["name"] for a in served["cluster"].list_actors(state="ALIVE") if "safe_rlhf" in (a.get("name") or "")]
    assert left == []
    assert (served["run"] / "serve_config.yaml").is_file()
    cfg = yaml.safe_load((served["run"] / "serve_config.yaml").read_text())
    assert cfg["applications"][0]["import_path"] == "pipeline.serve:app_builder"
    assert cfg["applications"][0]["args"]["policies"] == ["sft", "safe_rlhf@1"]
