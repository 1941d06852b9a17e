"""cluster/pool.py against a real local Ray: what a stage gets back from the actor pool, by name and
reuse key, and what it kills. (The pipeline's own use, rounds and red teaming borrowing one
another's actors, with actors SIGKILLed while parked, is tests/test_operations.py's.)"""
import os

import pytest

from cluster.pool import ActorPool


class Tagged:
    """A role class as the pool sees one: `reuse_key` says which processes fit, `reset` reloads."""

    def __init__(self, tag: str, group: int = 1):
        self.tag, self.resets = tag, 0

    @staticmethod
    def reuse_key(tag: str, group: int = 1) -> tuple:
        return ("Tagged", group)

    def reset(self, tag: str, group: int = 1) -> None:
        self.tag, self.resets = tag, self.resets + 1

    def state(self) -> tuple:
        return self.tag, self.resets, os.getpid()


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()  # the local cluster this test started


def dies(ray, handle, timeout_s=30.0) -> bool:
    """Whether the actor is dead within the timeout (ray.kill returns before it is: a call made
    right after it may still be served)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.state.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.1)
    return False


def lend(pool, ray, name, tag, group=1):
    """What Launcher.start does with a pool: borrow or create, then reset a borrowed one."""
    create = lambda: ray.remote(Tagged).options(name=name, num_cpus=0).remote(tag, group)
    handle, reused = pool.lend(name, Tagged.reuse_key(tag, group), create)
    if reused:
        handle.reset.remote(tag, group)
    return handle, reused


def test_a_parked_actor_is_lent_again_with_the_borrowers_arguments(local_ray):
    ray, pool = local_ray, ActorPool()
    a, reused = lend(pool, ray, "p-rollout", "round 1")
    tag, resets, pid = ray.get(a.state.remote())
    assert (reused, tag, resets) == (False, "round 1", 0)
    pool.give_back("p-rollout")
    assert pool.parked() == ["p-rollout"]
    b, reused = lend(pool, ray, "p-rollout", "red team 1")
    assert reused and ray.get(b.state.remote()) == ("red team 1", 1, pid)  # the same process, the new model
    with pytest.raises(RuntimeError, match="lent to another stage"):
        lend(pool, ray, "p-rollout", "a stage beside it")
    pool.give_back("p-rollout")
    # another reuse key: the parked one is killed and a new actor takes its name
    c, reused = lend(pool, ray, "p-rollout", "evaluate", group=2)
    assert not reused and ray.get(c.state.remote())[2] != pid
    assert dies(ray, b)
    assert (pool.created, pool.reused) == (2, 1)
    pool.close()


def test_what_a_failed_stage_gives_back_is_killed_not_parked(local_ray):
    ray, pool = local_ray, ActorPool()
    a, _ = lend(pool, ray, "p-scorer", "round 1")
    pid = ray.get(a.state.remote())[2]
    pool.give_back("p-scorer", keep=False)
    assert pool.parked() == [] and dies(ray, a)
    b, reused = lend(pool, ray, "p-scorer", "round 2")
    assert not reused and ray.get(b.state.remote())[2] != pid
    pool.close()
    assert dies(ray, b)


def test_a_group_is_reused_whole_or_not_at_all(local_ray):
    """The ranks of a learner group share a process group: one dead rank means new ranks for all."""
    ray, pool = local_ray, ActorPool()

    def lend_group(tag):
        items = [(f"p-learner-{i}", Tagged.reuse_key(tag, 2),
                  lambda i=i: ray.remote(Tagged).options(name=f"p-learner-{i}", num_cpus=0).remote(tag, 2)) for i in range(2)]
        return pool.lend_group(items)

    first = lend_group("round 1")
    pids = [ray.get(h.state.remote())[2] for h, _ in first]
    for i in range(2):
        pool.give_back(f"p-learner-{i}")
    again = lend_group("round 2")
    assert [r for _, r in again] == [True, True] and [ray.get(h.state.remote())[2] for h, _ in again] == pids
    for i in range(2):
        pool.give_back(f"p-learner-{i}")
    ray.kill(again[1][0])  # rank 1 dies while parked
    fresh = lend_group("round 3")
    assert [r for _, r in fresh] == [False, False]
    assert not set(ray.get([h.state.remote() for h, _ in fresh])[i][2] for i in range(2)) & set(pids)
    pool.close()


def kill_and_expect_a_restart_the_round_names(ray, worker, sampling) -> None:
    """SIGKILL rollout worker `worker`, wait until Ray has restarted it, then check that its next
    `generate` reaches the round as the death of `rollout-0`, kind rollout (retry in place)."""
    import signal
    import time

    from cluster.launch import ActorDied, Launcher

    os.kill(ray.get(worker.__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:  # Ray restarts it; until then calls fail as a dead actor's
        try:
            ray.get(worker.ready.remote(), timeout=60)
            break
        except ray.exceptions.RayActorError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    launcher = object.__new__(Launcher)  # the round's launcher, as far as naming its actors goes
    launcher.names = {worker._actor_id.hex(): "rollout-0"}
    with pytest.raises(ActorDied) as died:
        launcher.get([worker.generate.remote(["a prompt"], sampling)])
    assert (died.value.name, died.value.kind) == ("rollout-0", "rollout")


def test_a_restarted_rollout_worker_refuses_work_until_reset_and_the_round_names_it(local_ray, small_model_dir):
    """Ray restarts a dead actor with the arguments it was first created with (with kept actors, an
    earlier stage's model): a call that reaches it before the caller reloads it must fail, naming
    the actor, so that the round retries in place after a reload (not sample from the wrong model)."""
    from actors.rollout import RolloutWorker, Sampling

    ray = local_ray
    worker = ray.remote(RolloutWorker).options(num_cpus=0, max_restarts=1).remote("hf", str(small_model_dir))
    sampling = Sampling(8, seed=3)
    first = ray.get(worker.generate.remote(["a prompt"], sampling))
    kill_and_expect_a_restart_the_round_names(ray, worker, sampling)
    ray.get(worker.reset.remote("hf", str(small_model_dir)))
    again = ray.get(worker.generate.remote(["a prompt"], sampling))
    assert again.response_ids == first.response_ids
    ray.kill(worker)


def test_an_actor_restarted_by_ray_while_parked_is_not_lent_again(local_ray):
    """Ray counts restarts over an actor's life: one that used some while parked would come to the
    next stage with less than its max_restarts."""
    import signal
    import time

    ray, pool = local_ray, ActorPool()
    create = lambda: ray.remote(Tagged).options(name="p-restarted", num_cpus=0, max_restarts=2).remote("round 1")
    a, _ = pool.lend("p-restarted", ("Tagged", 1), create)
    pid = ray.get(a.state.remote())[2]
    pool.give_back("p-restarted")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # until Ray has restarted it
        try:
            assert ray.get(a.state.remote(), timeout=30)[2] != pid
            break
        except ray.exceptions.RayActorError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    b, reused = pool.lend("p-restarted", ("Tagged", 1), create)
    assert not reused and dies(ray, a)
    assert ray.get(b.state.remote()) == ("round 1", 0, ray.get(b.state.remote())[2])
    pool.close()


class SlowStart(Tagged):
    """A role class whose constructor takes a while, as a CPU actor's imports do."""

    def __init__(self, tag, group: int = 1):
        import time

        time.sleep(4)
        super().__init__(tag, group)


def test_an_actor_started_ahead_is_waited_for_while_a_parked_one_that_does_not_answer_is_replaced(local_ray, monkeypatch):
    """A prestarted actor may still be importing when its stage borrows it: it is waited for, not
    taken for a hung parked actor (those get PARKED_ANSWER_S)."""
    import cluster.pool

    ray, pool = local_ray, ActorPool()
    monkeypatch.setattr(cluster.pool, "PARKED_ANSWER_S", 1.0)  # shorter than SlowStart's constructor
    assert pool.prestart(SlowStart, [("p-ahead", (None,), {})], 1, 0, {}) == ["p-ahead"]
    assert pool.prestart(SlowStart, [("p-ahead", (None,), {})], 1, 0, {}) == []  # once
    (handle, reset), = pool.borrow(SlowStart, [("p-ahead", ("round 1",), {})], 1, 0, {})
    assert reset is not None  # borrowed, not replaced
    ray.get(reset)
    pid = ray.get(handle.state.remote())[2]
    assert ray.get(handle.state.remote()) == ("round 1", 1, pid)
    pool.give_back("p-ahead")
    # a parked actor that is not answering within PARKED_ANSWER_S (here: busy in a 4 s call) is replaced
    handle.__ray_call__.remote(lambda self: __import__("time").sleep(4))
    (again, reset), = pool.borrow(SlowStart, [("p-ahead", ("round 2",), {})], 1, 0, {})
    assert reset is None and dies(ray, handle)
    assert ray.get(again.state.remote())[:2] == ("round 2", 0)
    assert (pool.prestarted, pool.reused, pool.created) == (1, 1, 1)
    pool.close()


def test_round_actors_started_ahead_refuse_work_until_the_round_loads_its_models(local_ray, small_model_dir):
    """`prestart` makes a round's actors with no models, as the round's Launcher would borrow them;
    the round then borrows every one and its reset loads the round's models: a rollout worker
    started ahead samples what a fresh one does, and before its reset it refuses to sample. Killed
    and restarted by Ray (with no model again), it counts as restarted, as any round actor does."""
    from actors.rollout import RolloutWorker, Sampling
    from cluster.launch import Launcher
    from stages.common.model_actors import actor_env
    from stages.safe_rlhf.resources import resource_plan
    from stages.safe_rlhf.roles import actor_arguments, prestart
    from tests.conftest import small_config

    ray, pool = local_ray, ActorPool()
    said = []
    # the fits reserve both of the cluster's CPUs (the default here): nothing is started ahead
    assert prestart(small_config(**{"safe_rlhf.engine": "hf"}), {"round": 1}, pool, said.append) == []
    assert pool.parked() == [] and "leaves no whole CPU" in said[0]
    cfg = small_config(**{"safe_rlhf.engine": "hf", "reward.cpus_per_worker": 0.5, "cost.cpus_per_worker": 0.5})
    rl = cfg.safe_rlhf
    started = prestart(cfg, {"round": 1}, pool, said.append)
    assert sorted(started) == sorted(pool.parked()) == sorted(
        ["rollout-0", "scorer-reward-0", "scorer-reference-0", "scorer-cost-0",
         "learner-policy-0", "learner-reward_critic-0", "learner-cost_critic-0"])
    early = ray.get_actor("rollout-0")
    with pytest.raises(ray.exceptions.RayTaskError, match="started ahead of its stage"):
        ray.get(early.generate.remote(["a prompt"], Sampling(8, seed=3)))
    # the round's own launcher borrows them (borrowed actors live outside its placement group)
    launcher = Launcher(resource_plan(rl), actor_env(rl), name="p-round", pool=pool, placement=(None, 0))
    models = {"policy": small_model_dir, "reward_model": small_model_dir, "cost_model": small_model_dir}
    rollout, _, _ = actor_arguments(cfg, rl, models)
    (name, (args, kwargs)), = rollout.items()
    worker = launcher.start(RolloutWorker, name, *args, max_restarts=rl.max_actor_restarts, **kwargs)
    assert launcher.reused == launcher.ahead == ["rollout-0"] and worker._actor_id == early._actor_id
    ray.get(list(launcher.take_resets().values()))
    fresh = ray.remote(RolloutWorker).options(num_cpus=0).remote(*args, **kwargs)
    sampling = Sampling(8, seed=3)
    first = ray.get(worker.generate.remote(["a prompt"], sampling)).response_ids
    assert first == ray.get(fresh.generate.remote(["a prompt"], sampling)).response_ids
    ray.kill(fresh)
    # Killed from outside mid-round, Ray restarts it with the arguments it was made with: no model.
    # The round must see a restart (ActorDied, kind rollout: reload and retry in place), not a misuse.
    kill_and_expect_a_restart_the_round_names(ray, worker, sampling)
    ray.get(launcher.reload("rollout-0"))
    assert ray.get(worker.generate.remote(["a prompt"], sampling)).response_ids == first
    launcher.shutdown(keep=False)
    pool.close()


class Threads:
    def count(self) -> int:
        import torch

        return torch.get_num_threads()


def test_threads_per_actor_sets_a_model_actors_torch_threads_kept_or_not(local_ray):
    """safe_rlhf.threads_per_actor reaches torch in the actor, whether it is started for the pool
    (cluster/pool.py sets threads from its CPUs first) or with its CPUs reserved (the Launcher's
    runtime_env); left null, a quarter-CPU actor has Ray's one thread."""
    from cluster.pool import _creator
    from pipeline.config import parse_config
    from stages.common.model_actors import actor_env

    ray = local_ray
    for threads, want in ((2, 2), (None, 1)):
        env = actor_env(parse_config({"safe_rlhf": {"threads_per_actor": threads}}).safe_rlhf)
        kept = _creator(Threads, f"threads-kept-{want}", (), {}, 0.25, 0, env)()
        reserved = ray.remote(Threads).options(num_cpus=0.25, runtime_env={"env_vars": env}).remote()
        try:
            assert ray.get([kept.count.remote(), reserved.count.remote()]) == [want, want]
        finally:
            ray.kill(kept)
            ray.kill(reserved)
