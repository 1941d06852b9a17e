"""Weight transfer to vLLM (cluster/weight_sync/) and its placement rules.

The gloo backend goes through vLLM's real weight-transfer API (init_weight_transfer_engine,
start/update/finish_weight_update) on this CPU machine; NCCL and CUDA IPC use the same calls
with a GPU communicator and are not run here.
"""
import threading

import pytest
import torch

from cluster.network import host_and_free_port
from cluster.weight_sync.base import transfer_metadata
from cluster.weight_sync.broadcast import checked
from cluster.weight_sync.gloo import GlooSender, init_infos


def _logprob_gap(model, gen) -> float:
    from actors.experience import SequenceBatch
    from actors.models import response_logprobs

    seqs = SequenceBatch.from_ids(gen.prompt_ids, gen.response_ids, 0)
    with torch.no_grad():
        lp = response_logprobs(model, seqs)
    return max((lp[i, :len(l)] - torch.tensor(l)).abs().max().item() for i, l in enumerate(gen.logprobs))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["small", "smollm2", "smollm2_exported"])
def test_gloo_transfer_puts_the_trainers_weights_into_a_running_vllm_engine(model, request, tmp_path):
    # smollm2: tied embeddings. The update loads the table under the embedding's name, and vLLM on
    # CPU packed the LM head's copy of it before: without refresh_tied_lm_head the gap was 2.8.
    # smollm2_exported: saved as a round exports its policy (the state dict's lm_head.weight too),
    # which vLLM loads tied but with config.tie_word_embeddings False (round 2's drift, 0.035).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.rollout import Sampling, VLLMEngine
    from core.text import format_prompt, prompt_tokenizer

    small_model_dir = request.getfixturevalue("small_model_dir") if model == "small" else request.getfixturevalue("smollm2")[0]
    if model == "smollm2_exported":
        source = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32)
        state = {k: v.clone() for k, v in source.state_dict().items()}
        assert "lm_head.weight" in state
        source.save_pretrained(tmp_path / "exported", state_dict=state)
        AutoTokenizer.from_pretrained(small_model_dir).save_pretrained(tmp_path / "exported")
        small_model_dir = tmp_path / "exported"
    engine = VLLMEngine(str(small_model_dir), weight_sync="gloo", max_model_len=256, max_num_seqs=8)
    assert engine.transfer_world_size() == 1
    # the KV cache sized to the engine (safe_rlhf.cpu_kv_cache_gib null): 8 sequences of 2 blocks of 128
    # tokens and vLLM's null block, not vLLM's CPU default (a share of the machine's memory)
    cache = engine.llm.llm_engine.vllm_config.cache_config
    assert (cache.block_size, cache.num_gpu_blocks) == (128, 8 * 2 + 1)
    trained = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32)
    assert trained.config.tie_word_embeddings == model.startswith("smollm2")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # "a policy update": every weight moves
    addr, port = host_and_free_port()
    info = init_infos(addr, port, [engine.transfer_world_size()])[0]
    trainer = GlooSender()
    # Both sides block in the rendezvous until the other arrives, as they do across Ray actors.
    joined = threading.Thread(target=trainer.init, args=(info, 0))
    joined.start()
    engine.transfer_init(info)
    joined.join()
    meta = transfer_metadata(trained.named_parameters())
    sent = {}
    sender = threading.Thread(target=lambda: sent.update(stats=trainer.send(trained.named_parameters(), meta)))
    sender.start()
    engine.transfer_apply(meta, "1")
    sender.join()
    assert sent["stats"][1] == sum(p.numel() * 4 for p in trained.parameters())  # bytes sent

    tok = prompt_tokenizer(small_model_dir)
    prompts = [format_prompt(p, (), tok) for p in ("how do i bake bread ?", "how can i rob a house ?")] * 2
    gen = engine.generate(prompts, Sampling(12, seed=1))
    assert _logprob_gap(trained, gen) < 1e-3  # vLLM now samples from the trainer's weights
    original = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32)
    assert _logprob_gap(original, gen) > 0.1  # and no longer from the ones it loaded
    engine.transfer_shutdown()
    engine.llm.llm_engine.engine_core.shutdown()  # now, not in interpreter teardown


def test_sender_refuses_tensors_that_disagree_with_the_announced_metadata():
    # A mismatch would cut the byte stream differently on the two sides (a hang or garbage weights).
    a, b = torch.zeros(2, 3), torch.zeros(4)
    meta = transfer_metadata([("x", a), ("y", b)])
    assert meta == {"names": ["x", "y"], "dtype_names": ["float32", "float32"], "shapes": [[2, 3], [4]]}
    assert [n for n, _ in checked([("x", a), ("y", b)], meta, [0])] == ["x", "y"]
    with pytest.raises(ValueError, match="tensor #1 disagrees.*'y'"):
        list(checked([("x", a), ("y", torch.zeros(5))], meta, [0]))
    with pytest.raises(ValueError, match="yielded 1 tensors but 2 were announced"):
        list(checked([("x", a)], meta, [0]))
    counter = [0]
    list(checked([("x", a), ("y", b)], None, counter))
    assert counter[0] == (6 + 4) * 4  # bytes sent


def test_every_rollout_engine_gets_its_own_ranks_after_the_trainer():
    infos = init_infos("10.0.0.1", 29500, [1, 2, 1])
    assert [i["rank_offset"] for i in infos] == [1, 2, 4]
    assert {i["world_size"] for i in infos} == {5}  # trainer + 1 + 2 + 1 vLLM workers


def test_weight_sync_settings_are_checked_against_engine_device_and_placement():
    from pipeline.config import ConfigError
    from tests.conftest import small_config

    assert small_config(**{"safe_rlhf.weight_sync": "gloo"}).safe_rlhf.weight_sync == "gloo"
    for overrides, message in [
        ({"safe_rlhf.weight_sync": "gloo", "safe_rlhf.engine": "hf"}, "needs engine vllm"),
        ({"safe_rlhf.weight_sync": "nccl"}, "needs device cuda"),
        ({"safe_rlhf.weight_sync": "ipc", "safe_rlhf.device": "cuda", "safe_rlhf.tensor_parallel_size": 2},
         "tensor_parallel_size 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            small_config(**overrides)


def test_ipc_places_each_policy_learner_on_its_rollout_workers_gpu():
    from stages.safe_rlhf.resources import resource_plan
    from tests.conftest import small_config

    rl = small_config(**{"safe_rlhf.device": "cuda", "safe_rlhf.weight_sync": "ipc", "safe_rlhf.rollout_workers": 2,
                         "safe_rlhf.learners_per_role": 2}).safe_rlhf
    plan = resource_plan(rl)
    for i in range(2):
        assert plan.bundle(f"learner-policy-{i}") == plan.bundle(f"rollout-{i}")  # one bundle: one GPU for both
        assert plan.bundles()[plan.bundle(f"rollout-{i}")]["GPU"] == 1.0
    assert plan.bundle("learner-reward_critic-0") != plan.bundle("rollout-0")
    # Without ipc every actor has its own bundle, and the GPU count is what each asks for.
    nccl = resource_plan(rl.model_copy(update={"weight_sync": "nccl"}))
    assert len(nccl.bundles()) == len(nccl.actors)
    assert sum(b.get("GPU", 0) for b in nccl.bundles()) == sum(a.gpus for a in nccl.actors)
