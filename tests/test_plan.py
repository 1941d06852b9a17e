"""The pre-launch plan (pipeline/plan.py) and the cluster launch files.

Memory accounting under test (documented in pipeline/memory_model.py): bytes per parameter
  bf16/fp16: weights 2, gradients 2, optimizer 12 (fp32 master 4 + two fp32 AdamW moments 8)
  fp32:      weights 4, gradients 4, optimizer 8  (two fp32 moments)
ZeRO stage >= 1 shards the optimizer state, >= 2 the gradients, 3 the weights.
"""
import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config, parse_config
from pipeline.memory_model import GIB, KNOWN_MODELS, llama_params, score_model_params, training_memory
from pipeline.plan import plan
from pipeline.plan_format import format_plan

REPO = Path(__file__).resolve().parents[1]
BEAVER = REPO / "configs" / "beaver-7b.yaml"
TINY = REPO / "configs" / "tiny.yaml"


def _local_llama(tmp_path, **kw):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **kw)
    config.save_pretrained(str(tmp_path))
    assert (tmp_path / "config.json").is_file()
    return config


def _gpu_cfg(**rl):
    return parse_config({"name": "g", "safe_rlhf": {"device": "cuda", "precision": "bf16", **rl}})


@pytest.mark.parametrize("kw", [
    {"tie_word_embeddings": False},
    {"tie_word_embeddings": True},
    {"tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True, "head_dim": 32},
], ids=["untied", "tied", "biases-and-head_dim"])
def test_llama_count_equals_transformers_numel(tmp_path, kw):
    import torch
    from transformers import LlamaForCausalLM, LlamaModel

    from actors.score_model import ScoreModel

    config = _local_llama(tmp_path, **kw)
    p = plan(parse_config({"model": {"path": str(tmp_path)}}))
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config)
    assert p["model"]["causal_lm_params"] == sum(t.numel() for t in lm.parameters())
    score = ScoreModel(LlamaModel(config))
    assert p["model"]["score_model_params"] == sum(t.numel() for t in score.parameters())
    assert p["model"]["source"].endswith("config.json")


def test_a_score_model_on_its_own_bert_backbone_is_counted_and_sized_as_that_model(tmp_path):
    """reward.backbone an encoder (as all-MiniLM-L6-v2 in configs/smollm2.yaml): the reward scorer
    and fit hold that model, counted against transformers' own (AutoModel: BertModel with its pooler,
    + our Linear(hidden, 1)); its critic starts from the policy (another tokenizer: roles.py), as
    the cost model, on no backbone of its own, does. A backbone not there yet is estimated as the policy's."""
    import torch
    from transformers import BertConfig, BertModel

    from actors.score_model import ScoreModel

    (tmp_path / "policy").mkdir(), (tmp_path / "bert").mkdir()
    _local_llama(tmp_path / "policy")
    bert = BertConfig(vocab_size=500, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=64)
    bert.save_pretrained(str(tmp_path / "bert"))
    torch.manual_seed(0)
    n = sum(t.numel() for t in ScoreModel(BertModel(bert)).parameters())
    p = plan(parse_config({"model": {"path": str(tmp_path / "policy")}, "reward": {"backbone": str(tmp_path / "bert")},
                           "safe_rlhf": {"algorithm": "ppo_lag", "layout": "split", "precision": "fp32"}}))
    assert p["model"]["score_models"]["reward"] == {"params": n, "source": str(tmp_path / "bert" / "config.json"),
                                                    "critic_from_it": False}
    assert p["model"]["score_models"]["cost"]["params"] == p["model"]["score_model_params"] != n
    roles = p["round"]["roles"]
    assert roles["scorer-reward"]["weights_gib"] == pytest.approx(4 * n / GIB)
    on_policy = p["model"]["score_model_params"]
    for critic in ("learner-reward_critic", "learner-cost_critic"):  # fp32 AdamW: two moments
        assert roles[critic]["optimizer_gib"] == pytest.approx(8 * on_policy / GIB)
    assert roles["scorer-cost"]["weights_gib"] == pytest.approx(4 * on_policy / GIB)
    fit = {f["stage"]: f for f in p["fits"]}
    assert fit["fit_reward"]["memory_per_worker"]["weights_gib"] == pytest.approx(4 * n / GIB)
    assert "its critic starts from the policy (another tokenizer)" in format_plan(p)
    p = plan(parse_config({"model": {"path": str(tmp_path / "policy")}, "reward": {"backbone": str(tmp_path / "none")}}))
    assert p["model"]["score_models"]["reward"]["params"] == on_policy
    assert "no config.json here yet, estimated as the policy's backbone" in p["model"]["score_models"]["reward"]["source"]


def test_a_linear_probe_fit_holds_its_frozen_backbone_and_no_training_state(tmp_path):
    """cost.train_backbone false (configs/smollm2.yaml's cost model): no gradients or AdamW state,
    where a trained fit of the same model holds both."""
    _local_llama(tmp_path)
    p = plan(parse_config({"model": {"path": str(tmp_path)}, "cost": {"train_backbone": False}}))
    fit = {f["stage"]: f for f in p["fits"]}
    probe, trained = fit["fit_cost"], fit["fit_reward"]
    assert probe["model"] == "score model (linear probe)" and trained["model"] == "score model"
    m = probe["memory_per_worker"]
    assert m["weights_gib"] == pytest.approx(4 * p["model"]["score_model_params"] / GIB)  # fp32, the default
    assert (m["gradients_gib"], m["optimizer_gib"]) == (0, 0) and trained["memory_per_worker"]["optimizer_gib"] > 0


def test_tied_embeddings_count_the_matrix_once(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _local_llama(tmp_path / "a", tie_word_embeddings=False)
    _local_llama(tmp_path / "b", tie_word_embeddings=True)
    untied = plan(parse_config({"model": {"path": str(tmp_path / "a")}}))["model"]["causal_lm_params"]
    tied = plan(parse_config({"model": {"path": str(tmp_path / "b")}}))["model"]["causal_lm_params"]
    assert untied - tied == 1000 * 64


def test_llama_7b_is_6_74_billion():
    n = llama_params(KNOWN_MODELS["huggyllama/llama-7b"])
    assert n == 6_738_415_616  # the published LLaMA-7B count
    assert abs(n - 6.74e9) / 6.74e9 < 0.01
    p = plan(parse_config({"model": {"path": "PKU-Alignment/alpaca-7b-reproduced"}}))
    assert abs(p["model"]["causal_lm_params"] - 6.74e9) / 6.74e9 < 0.01
    # the score model drops lm_head (vocab x hidden) and adds Linear(hidden, 1)
    s = KNOWN_MODELS["PKU-Alignment/alpaca-7b-reproduced"]
    assert score_model_params(s) == llama_params(s) - s.vocab_size * 4096 + 4096 + 1


def test_unknown_hub_name_is_a_clear_error():
    cfg = parse_config({"model": {"path": "someone/unknown-13b"}})
    with pytest.raises(ValueError, match="not a local directory.*point model.path at a local directory"):
        plan(cfg)


def test_directory_without_config_json_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="without config.json"):
        plan(parse_config({"model": {"path": str(tmp_path)}}))


def test_null_path_uses_model_small():
    cfg = parse_config({"model": {"small": {"vocab_size": 600, "hidden_size": 64, "num_heads": 2,
                                            "num_layers": 1, "intermediate_size": 96}}})
    p = plan(cfg)
    # 600*64 embed + (4*64*64 attn + 3*64*96 mlp + 2*64 norms) + 64 final norm + 600*64 lm_head
    assert p["model"]["causal_lm_params"] == 600 * 64 + (4 * 64 * 64 + 3 * 64 * 96 + 128) + 64 + 600 * 64
    assert "model.small" in p["model"]["source"]


def test_bytes_per_param_bf16_vs_fp32():
    n = 1_000_000
    bf16 = training_memory(n, "bf16", 0, 1)
    fp32 = training_memory(n, "fp32", 0, 1)
    assert bf16["bytes_per_param"] == {"weights": 2, "gradients": 2, "optimizer": 12}
    assert fp32["bytes_per_param"] == {"weights": 4, "gradients": 4, "optimizer": 8}
    assert bf16["optimizer_gib"] == pytest.approx(n * 12 / GIB)
    assert fp32["optimizer_gib"] == pytest.approx(n * 8 / GIB)
    assert bf16["total_gib"] == pytest.approx(n * 16 / GIB) == fp32["total_gib"]
    # the same accounting reaches the round's learners
    p = plan(_gpu_cfg())
    lm = p["model"]["causal_lm_params"]
    assert p["round"]["roles"]["learner-policy"]["optimizer_gib"] == pytest.approx(lm * 12 / GIB)


@pytest.mark.parametrize("stage,divided", [
    (0, set()), (1, {"optimizer"}), (2, {"optimizer", "gradients"}), (3, {"optimizer", "gradients", "weights"}),
])
def test_zero_stage_shards_over_learners(stage, divided):
    one = plan(_gpu_cfg(learners_per_role=1, zero_stage=stage))["round"]["roles"]
    eight = plan(_gpu_cfg(learners_per_role=8, zero_stage=stage))["round"]["roles"]
    for role in ("learner-policy", "learner-reward_critic", "learner-cost_critic"):
        for part in ("weights", "gradients", "optimizer"):
            ratio = one[role][f"{part}_gib"] / eight[role][f"{part}_gib"]
            assert ratio == pytest.approx(8.0 if part in divided else 1.0), (role, part)
    # scorers and rollout workers are never sharded by ZeRO
    assert one["scorer-reference"]["weights_gib"] == eight["scorer-reference"]["weights_gib"]


def test_zero_stage_shards_fit_workers():
    cfg = parse_config({"sft": {"num_workers": 8, "zero_stage": 3, "device": "cuda", "precision": "bf16"},
                        "reward": {"num_workers": 8, "zero_stage": 0, "device": "cuda", "precision": "bf16"}})
    fits = {f["stage"]: f for f in plan(cfg)["fits"]}
    full = training_memory(fits["sft"]["memory_per_worker"]["params"], "bf16", 0, 1)
    state = lambda m: m["weights_gib"] + m["gradients_gib"] + m["optimizer_gib"]
    assert state(fits["sft"]["memory_per_worker"]) == pytest.approx(full["total_gib"] / 8)
    assert fits["fit_reward"]["memory_per_worker"]["weights_gib"] == pytest.approx(
        training_memory(fits["fit_reward"]["memory_per_worker"]["params"], "bf16", 0, 1)["weights_gib"])
    assert fits["sft"]["gpus"] == 8 and fits["sft"]["workers"] == 8


def test_beaver_7b_at_80_gib():
    cfg = load_config(BEAVER)
    rl = cfg.safe_rlhf
    p = plan(cfg, gpu_memory_gib=80)
    rnd = p["round"]
    n = rl.learners_per_role
    names = [a["name"] for a in rnd["actors"]]
    assert names[:rl.rollout_workers] == [f"rollout-{i}" for i in range(rl.rollout_workers)]
    assert {"scorer-reward-0", "scorer-reference-0", "scorer-cost-0", "learner-policy-0",
            "learner-reward_critic-0", "learner-cost_critic-0"} <= set(names)
    # rollout workers take tensor_parallel_size GPUs, learners one each, scorers share learner GPUs
    assert rnd["total_gpus"] == rl.rollout_workers * rl.tensor_parallel_size + 3 * n
    assert len(rnd["gpus"]) == rnd["total_gpus"]
    lm = p["model"]["causal_lm_params"]
    shard = {z: (n if rl.zero_stage >= z else 1) for z in (1, 2, 3)}
    state = lm * (2 / shard[3] + 2 / shard[2] + 12 / shard[1]) / GIB  # bf16
    s = KNOWN_MODELS["PKU-Alignment/alpaca-7b-reproduced"]
    tokens, micro = 512 + 512, rl.micro_batch_size
    # checkpointing: the inputs of 32 layers (2 bytes x tokens x batch x hidden each) plus one layer (34 x ...)
    act = (32 * 2 + 34) * tokens * micro * 4096 / GIB
    # one chunk (at most the micro-batch's response tokens) in fp32, with its logsumexp
    logits = min(rl.logprob_chunk_tokens, micro * 512) * s.vocab_size * 8 / GIB
    policy = rnd["roles"]["learner-policy"]
    assert (policy["activations_gib"], policy["logits_gib"], policy["context_gib"]) == pytest.approx((act, logits, 1.0))
    assert policy["total_gib"] == pytest.approx(state + act + logits + 1.0)
    ro = rnd["roles"]["rollout"]
    assert ro["weights_gib"] == pytest.approx(lm * 2 / rl.tensor_parallel_size / GIB)
    assert ro["kv_cache_gib"] == pytest.approx(rl.gpu_memory_utilization * 80 - ro["weights_gib"])
    for role in rnd["roles"].values():
        assert role["total_gib"] > 0
    assert rnd["fits"] is True and all(f["fits"] for f in p["fits"])
    assert p["verdict"].startswith("fits on 80 GiB")  # the verdict the shipped preset gets
    text = format_plan(p)
    for needle in ("verdict: ", "GiB", "ESTIMATE", "estimated on top of model state: activations", "learner-policy-0",
                   "scorer-reference-0", "ZeRO", "KV cache", f"{lm:,}", "per GPU (80 GiB each"):
        assert needle in text, needle


def test_beaver_7b_with_one_learner_per_role_does_not_fit_80_gib():
    cfg = load_config(BEAVER)
    cfg.safe_rlhf.learners_per_role = 1
    p = plan(cfg, gpu_memory_gib=80)
    # a 7B policy's unsharded model state (16 bytes/param, ~100 GiB) cannot fit one 80 GiB GPU
    policy = p["round"]["roles"]["learner-policy"]
    assert policy["weights_gib"] + policy["gradients_gib"] + policy["optimizer_gib"] == pytest.approx(
        p["model"]["causal_lm_params"] * 16 / GIB)
    assert p["verdict"].startswith("does NOT fit on 80 GiB GPUs")
    assert any(not g["fits"] for g in p["round"]["gpus"])
    assert "learners_per_role >= 2" in p["round"]["hint"]
    assert "verdict: does NOT fit" in format_plan(p)


def test_beaver_7b_fits_with_sharded_learners():
    cfg = load_config(BEAVER)
    cfg.safe_rlhf.learners_per_role = 8
    p = plan(cfg, gpu_memory_gib=80)
    assert p["round"]["fits"] is True, p["verdict"]
    assert p["verdict"].startswith("fits on 80 GiB GPUs")
    assert p["round"]["total_gpus"] == 4 + 3 * 8


def test_beaver_7b_does_not_fit_without_gradient_checkpointing_and_micro_batches():
    cfg = load_config(BEAVER)
    cfg.safe_rlhf.gradient_checkpointing, cfg.safe_rlhf.micro_batch_size = False, None
    p = plan(cfg, gpu_memory_gib=80)
    policy = p["round"]["roles"]["learner-policy"]
    # 16 sequences x 1,024 tokens through 32 layers: 34 x 1024 x 16 x 4096 bytes a layer
    assert policy["activations_gib"] == pytest.approx(32 * 34 * 1024 * 16 * 4096 / GIB)
    assert p["round"]["fits"] is False and p["verdict"].startswith("does NOT fit on 80 GiB")


def test_a_tensor_parallel_rollout_worker_leaves_its_gpus_to_vllms_own_workers():
    from stages.safe_rlhf.resources import resource_plan

    rl = _gpu_cfg(tensor_parallel_size=2, rollout_workers=2).safe_rlhf
    rp = resource_plan(rl)
    bundles = rp.bundles()
    for i in range(2):
        spec = rp.spec(f"rollout-{i}")
        assert spec.gpus == 0 and spec.worker_gpus == 2 and spec.total_gpus == 2
        own = rp.worker_bundles(f"rollout-{i}")
        assert len(own) == 2 and all(bundles[b] == {"GPU": 1.0} for b in own)
        assert "GPU" not in bundles[rp.bundle(f"rollout-{i}")]  # the actor itself holds no GPU
        assert rp.worker_env(f"rollout-{i}") == {"VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, own)),
                                                 "VLLM_RAY_PER_WORKER_GPUS": "1"}
    assert set(rp.worker_bundles("rollout-0")).isdisjoint(rp.worker_bundles("rollout-1"))
    assert sum(b.get("GPU", 0) for b in bundles) == pytest.approx(sum(a.total_gpus for a in rp.actors))
    one = resource_plan(_gpu_cfg().safe_rlhf)  # TP 1: the actor holds its GPU, no worker bundles
    assert one.spec("rollout-0").gpus == 1.0 and one.worker_env("rollout-0") == {}


def test_scorers_take_their_own_gpus_when_not_colocated():
    p = plan(_gpu_cfg(colocate_scorers=False), gpu_memory_gib=80)
    gpus = p["round"]["gpus"]
    assert len(gpus) == p["round"]["total_gpus"] == 1 + 3 + 3
    assert all(len(g["actors"]) == 1 for g in gpus)


def test_beaver_7b_comment_states_the_plans_gpu_count():
    p = plan(load_config(BEAVER), gpu_memory_gib=80)
    first = BEAVER.read_text().splitlines()[1]
    assert f"{p['round']['total_gpus']} x 80 GB GPUs" in first, first


def test_tiny_plans_on_cpu_with_no_gpus():
    p = plan(load_config(TINY))
    rnd = p["round"]
    assert rnd["device"] == "cpu" and rnd["total_gpus"] == 0
    assert all(a["gpus"] == 0 for a in rnd["actors"])
    assert all(f["gpus"] == 0 and f["device"] == "cpu" for f in p["fits"])
    assert rnd["gpus"] is None
    assert p["verdict"].startswith("CPU run")
    text = format_plan(p)
    assert "Plan for tiny" in text and "verdict: CPU run" in text
    # the fits reserve 1 CPU each: round 1's actors start ahead from 3 CPUs (not on 2 cores)
    assert rnd["start_ahead_from_cpus"] == 3 and "start ahead, beside the fits, on a cluster of 3 CPUs or more (the fits reserve 2)" in text
    assert plan(load_config(TINY), gpu_memory_gib=80)["verdict"].startswith("CPU run")


def test_the_round_header_names_what_it_optimises_off_the_defaults():
    from pipeline.config import parse_config

    def header(**rl):
        text = format_plan(plan(parse_config({"name": "h", "cost": {"per_category": True}, "safe_rlhf": rl})))
        return next(line for line in text.splitlines() if line.startswith("Safe RLHF round ("))

    assert header().startswith("Safe RLHF round (ppo_lag, layout split,")  # the defaults add nothing
    assert header(constraints="per_category").startswith("Safe RLHF round (ppo_lag, constraints per_category, layout")
    assert header(algorithm="grpo_lag", group_scale="batch").startswith("Safe RLHF round (grpo_lag, group_scale batch, layout")
    assert "group_scale" not in header(algorithm="grpo_lag")


def test_kv_cache_without_gpu_memory_is_what_max_num_seqs_need():
    cfg = _gpu_cfg(max_num_seqs=16, max_new_tokens=32, tensor_parallel_size=2)
    p = plan(cfg)
    s = p["model"]["shape"]
    tokens = cfg.model.max_prompt_tokens + 32
    expect = 16 * tokens * 2 * s["num_layers"] * s["num_kv_heads"] * s["head_dim"] * 2 / 2 / GIB
    assert p["round"]["roles"]["rollout"]["kv_cache_gib"] == pytest.approx(expect)


def test_cpu_kv_cache_holds_max_num_seqs_full_sequences_up_to_a_gib():
    from core.kv_cache import cpu_kv_cache_bytes
    from pipeline.memory_model import LlamaShape, kv_bytes_per_token

    smollm2 = LlamaShape(49152, 576, 1536, 30, 9, 3, 64, True)
    assert kv_bytes_per_token(smollm2, "fp32") == 46080  # 2 x 30 layers x 3 KV heads x 64 x 4 bytes
    assert kv_bytes_per_token(smollm2, "bf16") == 23040
    block = 128 * 46080
    assert cpu_kv_cache_bytes(46080, 64, 152) == (64 * 2 + 1) * block  # 0.709 GiB
    assert cpu_kv_cache_bytes(46080, 256, 152) == (2**30 // block) * block  # capped: 182 blocks
    assert cpu_kv_cache_bytes(46080, 4, 200 * 128) == 201 * block  # one sequence beyond the cap still fits
    tiny = plan(load_config(TINY))["round"]["roles"]["rollout"]
    # the tiny world: 2 layers x 4 KV heads x 32 x 4 bytes = 1,024 x 2 a token; 256 sequences of one block
    assert tiny["kv_cache_gib"] == pytest.approx((256 + 1) * 128 * 2048 / GIB)
    cfg = parse_config({"safe_rlhf": {"cpu_kv_cache_gib": 0.25}})
    assert plan(cfg)["round"]["roles"]["rollout"]["kv_cache_gib"] == 0.25


def test_a_cpu_engine_sizes_its_kv_cache_from_the_models_config(tmp_path):
    from actors.rollout import VLLMEngine

    config = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    size = lambda gib=None, dtype="fp32": VLLMEngine.cpu_kv_cache_bytes(str(tmp_path), dtype, 8, 200, gib)
    per_token = 2 * 3 * 2 * 16 * 4  # K and V x 3 layers x 2 KV heads x head_dim 64/4 x fp32
    assert size() == (8 * 2 + 1) * 128 * per_token
    assert size(dtype="bf16") == size() // 2
    assert size(gib=0.5) == 2**29  # safe_rlhf.cpu_kv_cache_gib wins
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    assert size() == (8 * 2 + 1) * 128 * per_token  # any decoder whose config.json has the layer and head counts
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 3}))
    assert size() == 2**30  # one without them: the 1 GiB every engine had before


# ---------------------------------------------------------------------------- launch files
def test_ray_cluster_yaml_is_a_gpu_launcher_config():
    c = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    assert c["provider"]["type"] == "aws"
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert not head["resources"].get("GPU")
    workers = [t for name, t in types.items() if name != c["head_node_type"]]
    assert any(t["resources"].get("GPU") == 8 and t["min_workers"] <= t["max_workers"] for t in workers)
    setup = c["setup_commands"]
    torch_at = next(i for i, cmd in enumerate(setup) if "torch==2.13.0" in cmd)
    project_at = next(i for i, cmd in enumerate(setup) if '-e ".[gpu]"' in cmd)
    assert torch_at < project_at
    assert "venv" in " ".join(setup)
    head_start = " ".join(c["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in " ".join(c["worker_start_ray_commands"])
    assert "0.0.0.0" not in head_start
    assert "ray start --address" in " ".join(c["worker_start_ray_commands"])


def test_kuberay_rayjob_manifest():
    j = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert j["apiVersion"] == "ray.io/v1" and j["kind"] == "RayJob"
    spec = j["spec"]
    assert "python -m pipeline run" in spec["entrypoint"] and "beaver-7b.yaml" in spec["entrypoint"]
    assert "&&" not in spec["entrypoint"]  # KubeRay pastes it unquoted into a shell command
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    (worker,) = cluster["workerGroupSpecs"]
    w = worker["template"]["spec"]
    assert w["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    run_dir = spec["entrypoint"].split("--run-dir ")[1].split()[0]
    for pod in (head, w):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert any(run_dir.startswith(mounts[name]) for name in claims), "the run directory must be on the PVC"


def test_a_colocated_round_is_fewer_processes_with_the_same_cpus_and_memory():
    from stages.safe_rlhf.resources import resource_plan

    for algorithm, split_n, colocated_n in (("ppo_lag", 7, 4), ("grpo_lag", 5, 2)):
        split = parse_config({"safe_rlhf": {"algorithm": algorithm}})
        colocated = parse_config({"safe_rlhf": {"algorithm": algorithm, "layout": "colocated"}})
        a, b = resource_plan(split.safe_rlhf).actors, resource_plan(colocated.safe_rlhf).actors
        assert (len(a), len(b)) == (split_n, colocated_n)
        assert not [x for x in b if x.name.startswith("scorer-")]
        assert sum(x.cpus for x in a) == sum(x.cpus for x in b)  # the host keeps its guests' CPUs
        assert sorted(h for x in b for h in x.hosts) == ["cost", "reference", "reward"]
        p = plan(colocated)["round"]
        assert p["layouts"]["split"]["processes"] == split_n and p["layouts"]["colocated"]["processes"] == colocated_n
        # on CPU the model state is the same, only held by fewer processes
        assert p["layouts"]["split"]["gib"] == pytest.approx(p["layouts"]["colocated"]["gib"])
        assert "scorer-reference" in p["roles"] and "hosts" in format_plan(plan(colocated))
    # on GPU a host holds its guests on its own GPU: one CUDA context, not two
    g = plan(_gpu_cfg(layout="colocated"), gpu_memory_gib=80)["round"]
    host = next(x for x in g["actors"] if x["name"] == "learner-policy-0")
    roles = g["roles"]
    assert host["hosts"] == ["reference"] and host["gpus"] == 1.0
    assert host["gib"] == pytest.approx(roles["learner-policy"]["total_gib"] + roles["scorer-reference"]["total_gib"]
                                        - roles["scorer-reference"]["context_gib"])
    assert any("hosting reference scorer" in a for gpu in g["gpus"] for a in gpu["actors"])
