"""vLLM's sleep mode in a round (safe_rlhf.rollout_sleep): the config it needs, where it places the
rollout, and the order of sleep and wake around a step. vLLM has no sleep mode on CPU, so the
engine here is a recorder standing in for vllm.LLM; the calls it records are vLLM's API
(LLM.sleep(level), LLM.wake_up(tags)). Never run on a GPU (README: what has never run)."""
from types import SimpleNamespace

import pytest

from actors.rollout import HFEngine, RolloutWorker, VLLMEngine
from pipeline.config import ConfigError, parse_config


def _cfg(**rl):
    return parse_config({"name": "s", "safe_rlhf": {"device": "cuda", "precision": "bf16", "rollout_sleep": True, **rl}})


def test_rollout_sleep_names_everything_it_needs():
    with pytest.raises(ConfigError) as err:
        parse_config({"name": "s", "safe_rlhf": {"rollout_sleep": True, "engine": "hf", "overlap_generation": True}})
    for need in ("engine vllm (got hf", "device cuda (got cpu", "overlap_generation false"):
        assert need in str(err.value)
    with pytest.raises(ConfigError, match="rollout_workers == learners_per_role"):
        _cfg(rollout_workers=2)
    assert _cfg().safe_rlhf.rollout_sleep is True


def test_a_sleeping_rollout_shares_the_policy_learners_gpu_and_only_the_rounds_engine_sleeps():
    from stages.common.model_actors import engine_settings
    from stages.safe_rlhf.resources import resource_plan

    cfg = _cfg()
    rp = resource_plan(cfg.safe_rlhf)
    assert rp.spec("rollout-0").gpus == 0.5 and rp.spec("learner-policy-0").gpus == 0.5
    assert rp.spec("learner-policy-0").bundle_with == "rollout-0"
    awake = resource_plan(_cfg(rollout_sleep=False).safe_rlhf)
    assert awake.spec("rollout-0").gpus == 1.0 and awake.spec("learner-policy-0").bundle_with is None
    assert engine_settings(cfg, "vllm", 16, sleep_mode=True)["sleep_mode"] is True
    assert "sleep_mode" not in engine_settings(cfg, "vllm", 16)  # red teaming, evaluation, serving


class RecordingLLM:
    """Stands in for vllm.LLM: records sleep and wake_up."""

    def __init__(self):
        self.calls = []

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))


def _worker():
    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM engine built: the recorder stands in for it
    engine.llm = RecordingLLM()
    engine.generate = lambda prompts, sampling: engine.llm.calls.append(("generate", len(prompts)))
    engine.update_weights = lambda model_dir: engine.llm.calls.append(("load", model_dir))
    engine.transfer_apply = lambda info, version: engine.llm.calls.append(("receive", version)) or 0.0
    worker = RolloutWorker.__new__(RolloutWorker)
    worker.engine, worker.engine_name, worker.prestarted, worker.restarted, worker.asleep = engine, "vllm", False, False, set()
    return worker, engine.llm.calls


def test_the_engine_frees_weights_and_kv_cache_and_takes_back_weights_before_a_push_and_the_cache_before_sampling():
    worker, calls = _worker()
    worker.generate(["p"], None)  # awake: nothing to wake
    worker.sleep()
    worker.sleep()  # already asleep: one sleep
    worker.transfer_apply({}, "v1")  # a push: the weights first
    worker.generate(["p", "q"], None)  # then the KV cache, before it samples
    worker.sleep()
    worker.update_weights("/ckpt")  # a checkpoint push wakes the weights too
    assert calls == [("generate", 1), ("sleep", 2), ("wake_up", ["weights"]), ("receive", "v1"),
                     ("wake_up", ["kv_cache"]), ("generate", 2), ("sleep", 2), ("wake_up", ["weights"]), ("load", "/ckpt")]
    assert worker.asleep == {"kv_cache"}
    worker.sleep()  # half awake: the cache is taken back first, so that vLLM sleeps a whole engine
    assert calls[-2:] == [("wake_up", ["kv_cache"]), ("sleep", 2)] and worker.asleep == {"weights", "kv_cache"}
    worker.generate(["p"], None)
    assert calls[-2:] == [("wake_up", ["weights", "kv_cache"]), ("generate", 1)] and worker.asleep == set()


def test_a_restarted_worker_starts_awake_and_an_hf_engine_cannot_sleep():
    worker, calls = _worker()
    worker.sleep()
    worker.asleep = set()  # as a worker Ray restarted: a new engine, awake
    worker.transfer_apply({}, "v2")
    assert calls == [("sleep", 2), ("receive", "v2")]
    hf = RolloutWorker.__new__(RolloutWorker)
    hf.engine, hf.engine_name, hf.restarted, hf.asleep = HFEngine.__new__(HFEngine), "hf", False, set()
    with pytest.raises(TypeError, match="sleep mode needs the vllm engine"):
        hf.sleep()


class FakeHandle:
    """A rollout worker's Ray handle: `.method.remote(...)` runs the method and records it."""

    def __init__(self, log, gen):
        self.generate = SimpleNamespace(remote=lambda prompts, sampling: log.append("generate") or gen)
        self.sleep = SimpleNamespace(remote=lambda: log.append("sleep"))


@pytest.mark.parametrize("sleep", [True, False])
def test_the_round_puts_its_rollout_to_sleep_once_the_step_has_its_answers(sleep):
    from actors.rollout import Generation, Sampling
    from stages.safe_rlhf.roles import RoundRoles

    log = []
    gen = Generation([[1]], [[2]], ["a"], [[-0.1]], 0, (0,))
    roles = RoundRoles.__new__(RoundRoles)
    roles.rl = _cfg(rollout_sleep=sleep).safe_rlhf
    roles.rollout, roles.rollout_step = [FakeHandle(log, gen)], 0
    roles._get = lambda refs: list(refs)  # the handles answer at once
    out, weights_step = roles.generate(["p"], Sampling(max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0), step=1)
    assert out.texts == ["a"] and weights_step == 0
    assert log == (["generate", "sleep"] if sleep else ["generate"])


def test_the_plan_says_the_sleeping_rollout_and_its_learner_share_a_gpu():
    from pipeline.plan import plan

    p = plan(_cfg(), gpu_memory_gib=80)
    assert any(n.startswith("rollout_sleep:") and "the larger of" in n for n in p["notes"])
    awake = plan(_cfg(rollout_sleep=False), gpu_memory_gib=80)
    ipc = plan(_cfg(rollout_sleep=False, weight_sync="ipc"), gpu_memory_gib=80)
    assert not any(n.startswith("rollout_sleep:") for n in awake["notes"])
    # one GPU holds the engine and the policy learner: one GPU fewer than each on its own
    shared = p["round"]["gpus"][0]
    assert shared["actors"] == ["rollout-0", "learner-policy-0 (sharing its GPU, taking turns)"]
    assert p["round"]["total_gpus"] == ipc["round"]["total_gpus"] == awake["round"]["total_gpus"] - 1
    roles = p["round"]["roles"]
    engine, learner = roles["rollout"]["total_gib"], next(a["gib"] for a in p["round"]["actors"] if a["name"] == "learner-policy-0")
    learning = roles["learner-policy"]["activations_gib"] + roles["learner-policy"]["logits_gib"]
    # taking turns: the engine beside the learner's model state, or the whole learner; ipc: both whole
    assert shared["used_gib"] == pytest.approx(max(engine + learner - learning, learner))
    assert ipc["round"]["gpus"][0]["used_gib"] == pytest.approx(engine + learner)
