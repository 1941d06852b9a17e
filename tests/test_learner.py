"""Memory-lean learners and scorers, on CPU with a small Llama: chunked log-probabilities, gradient
checkpointing, micro-batches with gradient accumulation, ZeRO-3 models built partitioned, and
exports gathered one parameter at a time in the training dtype."""
import os

import pytest
import torch

from actors.experience import CriticMinibatch, PolicyMinibatch, SequenceBatch
from actors.models import enable_gradient_checkpointing, response_logprobs, response_values

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def batch(n=8, prompt=6, response=5, vocab=1536, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = [response - (i % 3) for i in range(n)]  # ragged responses: padding matters
    prompts = [torch.randint(3, vocab, (prompt - (i % 2),), generator=g).tolist() for i in range(n)]
    responses = [torch.randint(3, vocab, (L,), generator=g).tolist() for L in lens]
    return SequenceBatch.from_ids(prompts, responses, pad_id=0)


def test_chunked_logprobs_equal_the_full_vocabulary_computation(small_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(small_model_dir)
    seqs = batch()
    naive = response_logprobs(model, seqs)
    for chunk in (1, 7, 4096):
        chunked = response_logprobs(model, seqs, chunk=chunk)
        torch.testing.assert_close(chunked, naive, atol=1e-5, rtol=0)
    # and the gradients through them
    g_naive = torch.autograd.grad(response_logprobs(model, seqs).sum(), list(model.parameters()))
    g_chunk = torch.autograd.grad(response_logprobs(model, seqs, chunk=7).sum(), list(model.parameters()))
    for a, b in zip(g_naive, g_chunk):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_losses_and_gradients(small_model_dir):
    from transformers import AutoModelForCausalLM

    from actors.score_model import ScoreModel

    seqs = batch()
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_pretrained(small_model_dir).train()
        critic = ScoreModel.from_backbone(small_model_dir, seed=0).train()
        if checkpointing:
            enable_gradient_checkpointing(lm)
            enable_gradient_checkpointing(critic)
            assert lm.is_gradient_checkpointing and critic.backbone.is_gradient_checkpointing
        loss = response_logprobs(lm, seqs, chunk=16).sum() + response_values(critic, seqs).pow(2).sum()
        params = list(lm.parameters()) + list(critic.parameters())
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, atol=1e-6, rtol=0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def process_group():
    """One single-rank process group for the in-process DeepSpeed learners of this module."""
    import deepspeed
    import deepspeed.comm as dist

    from cluster.network import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    yield
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    dist.cdb = None


def learner(role, model_dir, **settings):
    from actors.learner import Learner

    base = {"device": "cpu", "precision": "fp32", "zero_stage": 0, "seed": 0, "lr": 1e-3, "clip_ratio": 0.2,
            "clip_value": 5.0, "shard": 8, "micro_batch": 8, "gradient_checkpointing": False, "logprob_chunk": None,
            "temperature": 1.0}
    lr = Learner(role, str(model_dir), {**base, **settings})
    lr.setup(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    return lr


def policy_minibatch(seqs):
    g = torch.Generator().manual_seed(1)
    T = seqs.response_mask.shape[1]
    return PolicyMinibatch(seqs, torch.full((len(seqs), T), -7.0), torch.randn(len(seqs), T, generator=g),
                           torch.randn(len(seqs), T, generator=g), 0.5)


def test_micro_batches_accumulate_the_whole_shards_gradient(small_model_dir, process_group, tmp_path):
    """Four micro-batches of 2 give the gradient of one pass over the 8 sequences, and one optimizer step."""
    seqs = batch()
    mb = policy_minibatch(seqs)
    grads = []
    for micro in (8, 2):
        lr = learner("policy", small_model_dir, micro_batch=micro, logprob_chunk=16)
        lr.engine.step = lambda: None  # keep the gradients to compare them
        lr.train_step(mb)
        grads.append([p.grad.clone() for p in lr.engine.module.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # the same holds for the critics' value loss
    from transformers import AutoTokenizer

    from actors.score_model import ScoreModel

    ScoreModel.from_backbone(small_model_dir, seed=0).save_pretrained(
        tmp_path / "critic", tokenizer=AutoTokenizer.from_pretrained(small_model_dir))
    values = []
    for micro in (8, 4):
        lr = learner("reward_critic", tmp_path / "critic", micro_batch=micro)
        T = seqs.response_mask.shape[1]
        lr.engine.step = lambda: None
        lr.train_step(CriticMinibatch(seqs, torch.zeros(len(seqs), T), torch.ones(len(seqs), T)))
        values.append([p.grad.clone() for p in lr.engine.module.parameters() if p.grad is not None])
    for a, b in zip(*values):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_the_policy_learner_takes_logprobs_at_the_rollouts_temperature(small_model_dir, process_group):
    """The round's temperature reaches the policy learner (roles.actor_arguments' settings), whose
    log-probabilities, old and under training, are then those of softmax(logits / temperature)."""
    from actors.models import response_logprobs
    from pipeline.config import parse_config
    from stages.safe_rlhf.roles import actor_arguments

    cfg = parse_config({"safe_rlhf": {"temperature": 0.4, "algorithm": "grpo_lag"}})
    _, scorers, learners = actor_arguments(cfg, cfg.safe_rlhf, {"policy": small_model_dir, "reward_model": small_model_dir,
                                                                  "cost_model": small_model_dir})
    (_, (_, _, settings, _, _), _), = learners["policy"]
    assert settings.temperature == 0.4 and scorers["reference"][2]["temperature"] == 0.4
    seqs = batch()
    lr = learner("policy", small_model_dir, temperature=0.4, logprob_chunk=16)
    with torch.no_grad():
        want = response_logprobs(lr.engine.module, seqs, temperature=0.4)
        untempered = response_logprobs(lr.engine.module, seqs)
    torch.testing.assert_close(lr.forward(seqs), want, atol=1e-5, rtol=1e-5)
    assert (want - untempered).abs().max() > 0.1


def test_one_optimizer_step_per_shard_whatever_the_micro_batch(small_model_dir, process_group):
    seqs = batch()
    mb = policy_minibatch(seqs)
    after = []
    for micro in (8, 2):
        lr = learner("policy", small_model_dir, micro_batch=micro)
        before = [p.detach().clone() for p in lr.engine.module.parameters()]
        lr.train_step(mb)
        assert lr.engine.global_steps == 1  # four micro-batches, one step
        after.append([p.detach().clone() for p in lr.engine.module.parameters()])
        assert any(not torch.equal(a, b) for a, b in zip(before, after[-1]))
    for a, b in zip(*after):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_zero3_builds_the_model_partitioned_and_exports_it_whole_in_the_training_dtype(small_model_dir, process_group,
                                                                                       tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    built = {}
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        built["partitioned"] = all(hasattr(p, "ds_id") for p in model.parameters())  # deepspeed.zero.Init ran
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    lr = learner("policy", small_model_dir, zero_stage=3, precision="bf16")
    assert built["partitioned"]  # no rank ever held the whole model
    assert all(p.numel() == 0 for p in lr.engine.module.parameters())  # each rank keeps its shard only
    lr.export(str(tmp_path / "out"))
    monkeypatch.undo()
    import json

    from safetensors.torch import load_file

    # Read the files themselves: while this learner's ZeRO-3 config lives, transformers would build any
    # model it loads partitioned, every parameter empty (an earlier version of this test compared
    # empty tensors, and so checked nothing).
    exported, reference = load_file(tmp_path / "out" / "model.safetensors"), load_file(small_model_dir / "model.safetensors")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert set(exported) == set(reference) and all(t.numel() > 0 for t in reference.values())
    for name, a in exported.items():
        assert a.dtype == torch.bfloat16, name  # the training dtype: half the bytes of an fp32 export
        torch.testing.assert_close(a.float(), reference[name].to(torch.bfloat16).float(), atol=0, rtol=0)
    # the weight push's view (gloo, ipc): every parameter whole, still valid after its gather ended
    pushed = dict(lr._named_weights(copy=True))
    assert set(pushed) <= set(reference) and len(pushed) == len(list(lr.engine.module.parameters()))
    for name, w in pushed.items():
        assert w.shape == reference[name].shape, name
        torch.testing.assert_close(w.float(), reference[name].to(torch.bfloat16).float(), atol=0, rtol=0)


def test_the_gpu_check_script_runs_the_learner_scorer_and_engine_path_on_cpu(tmp_path):
    """bench/gpu_check.py, at its smallest size on CPU: the same code the GPU check times."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--size", "tiny", "--device", "cpu", "--batch", "2",
                           "--prompt", "8", "--response", "8", "--repeats", "1", "--out", str(tmp_path / "gpu.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "gpu.json").read_text())
    rows = {k: v for k, v in got.items() if isinstance(v, dict)}
    assert len(rows) == 5, rows  # ZeRO-0 twice, ZeRO-3, reference forward, generation
    for name, row in rows.items():
        assert "error" not in row and row["tokens_per_s"] > 0, (name, row)  # a failed check is reported, not hidden
    assert rows["learner train step (+ export)"]["export_s"] > 0
    assert rows["learner train step, ZeRO-3 + ckpt"]["export_s"] > 0


ENGINE_START = """
import sys
import deepspeed
from cluster.deepspeed_setup import without_inference_shm_op
if sys.argv[1] == "ours":
    without_inference_shm_op()
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
print("started", flush=True)
"""


def test_an_engine_starts_past_the_extension_lock_a_killed_process_left_behind(tmp_path):
    """DeepSpeed's comm backend takes a lock file under the torch extensions directory at every
    start; a process killed while holding it (as a learner killed from outside can be) used to hang
    every later start on the host. Ours skips the op behind that lock; DeepSpeed's default waits."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "lock").touch()  # as a killed process leaves it
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), MASTER_ADDR="127.0.0.1", RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    procs = {}
    for which, port in (("ours", 29611), ("default", 29612)):
        procs[which] = subprocess.Popen([sys.executable, "-c", ENGINE_START, which], env=dict(env, MASTER_PORT=str(port)),
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        out, _ = procs["ours"].communicate(timeout=180)
        assert procs["ours"].returncode == 0 and "started" in out
        time.sleep(5)  # the default start has had as long, and more: it is still waiting on the lock
        assert procs["default"].poll() is None
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    assert (tmp_path / "deepspeed_shm_comm" / "lock").exists()  # nobody stole a live builder's lock


def test_a_colocated_round_builds_its_scorers_inside_the_learners_and_they_score_as_scorer_actors_do(
        small_model_dir, process_group, tmp_path):
    """layout colocated: no scorer actors; rank 0 of the policy learner hosts the reference, the
    critics host the reward and cost scorers (grpo_lag, no critics: the policy learner hosts all
    three), and a hosted scorer's answers are a Scorer's, to the bit."""
    from transformers import AutoTokenizer

    from actors.score_model import ScoreModel
    from actors.scorer import Scorer
    from pipeline.config import parse_config
    from stages.safe_rlhf.roles import actor_arguments

    score_dir = tmp_path / "score"
    ScoreModel.from_backbone(small_model_dir, seed=0).save_pretrained(
        score_dir, tokenizer=AutoTokenizer.from_pretrained(small_model_dir))
    models = {"policy": small_model_dir, "reward_model": score_dir, "cost_model": score_dir}
    split = parse_config({"safe_rlhf": {"learners_per_role": 2}})
    colocated = parse_config({"safe_rlhf": {"learners_per_role": 2, "layout": "colocated"}})
    _, split_scorers, _ = actor_arguments(split, split.safe_rlhf, models)
    _, scorers, learners = actor_arguments(colocated, colocated.safe_rlhf, models)
    assert scorers == {} and set(split_scorers) == {"reward", "reference", "cost"}
    hosted = {r: [sorted(kw.get("hosted", {})) for _, _, kw in ranks] for r, ranks in learners.items()}
    assert hosted == {"policy": [["reference"], []], "reward_critic": [["reward"], []], "cost_critic": [["cost"], []]}
    # each guest is built from the arguments its actor would have had
    assert learners["policy"][0][2]["hosted"]["reference"] == split_scorers["reference"][1:]
    grpo = parse_config({"safe_rlhf": {"algorithm": "grpo_lag", "layout": "colocated"}})
    _, _, grpo_learners = actor_arguments(grpo, grpo.safe_rlhf, models)
    assert list(grpo_learners) == ["policy"] and sorted(grpo_learners["policy"][0][2]["hosted"]) == ["cost", "reference", "reward"]
    _, _, prestarted = actor_arguments(colocated, colocated.safe_rlhf, {})
    assert all(kw == {} for ranks in prestarted.values() for _, _, kw in ranks)  # no models yet: nothing to host

    (_, (role, model_dir, settings, rank, size), kw), _ = learners["policy"]
    from actors.learner import Learner

    host = Learner(role, model_dir, settings, rank, size, hosted=kw["hosted"])
    alone = Scorer(*split_scorers["reference"][1], **split_scorers["reference"][2])
    seqs = batch()
    assert torch.equal(host.score_with("reference", "logprobs", seqs), alone.logprobs(seqs))
    with pytest.raises(KeyError, match="hosts no cost scorer"):
        host.score_with("cost", "score", seqs)


def test_learner_settings_come_from_the_rounds_config_by_name():
    # Each LearnerSettings field is read from the SafeRLHFConfig field of the same name (or its
    # CONFIG_NAMES name, e.g. shard: the derived learner_shard, 16 // 2); what the config has not (lr
    # per role, the run's seed) must be given.
    from actors.learner import LearnerSettings
    from stages.safe_rlhf.settings import SafeRLHFConfig

    rl = SafeRLHFConfig(clip_ratio=0.15, clip_value=3.0, prompts_per_step=16, minibatches=2, micro_batch_size=4,
                        logprob_chunk_tokens=64, temperature=0.3, gradient_checkpointing=True, algorithm="grpo_lag")
    s = LearnerSettings.from_config(rl, lr=1e-5, seed=3)
    assert (s.clip_ratio, s.clip_value, s.shard, s.micro_batch, s.logprob_chunk, s.temperature, s.gradient_checkpointing,
            s.algorithm, s.lr, s.seed) == (0.15, 3.0, 8, 4, 64, 0.3, True, "grpo_lag", 1e-5, 3)
    with pytest.raises(TypeError, match=r"\['lr'\]"):
        LearnerSettings.from_config(rl, seed=3)


def test_a_rounds_max_grad_norm_reaches_the_learners_deepspeed_engine(small_model_dir, process_group):
    # The path of a learner setting, config to engine: SafeRLHFConfig -> LearnerSettings.from_config -> DeepSpeed.
    from actors.learner import Learner, LearnerSettings
    from stages.safe_rlhf.settings import SafeRLHFConfig

    settings = LearnerSettings.from_config(SafeRLHFConfig(max_grad_norm=0.25), lr=1e-3, seed=0)
    lr = Learner("policy", str(small_model_dir), settings)
    lr.setup(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    assert lr.engine.gradient_clipping() == 0.25
