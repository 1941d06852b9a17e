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

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
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


def test_a_restarted_rollout_worker_refuses_work_until_reset_and_the_round_names_it(local_ray, small_model_dir):
    """Ray restarts a dead actor with the arguments it was first created with (with kept actors, an
    earlier stage's model): a call that reaches it before the caller reloads it must fail, naming
    the actor, so that the round retries in place after a reload (not sample from the wrong model)."""
    import signal
    import time
    from types import SimpleNamespace

    from actors.rollout import RolloutWorker, Sampling
    from stages.safe_rlhf.roles import ActorDied, RoundRoles

    ray = local_ray
    worker = ray.remote(RolloutWorker).options(num_cpus=0, max_restarts=1).remote("hf", str(small_model_dir))
    sampling = Sampling(8, seed=3)
    first = ray.get(worker.generate.remote(["a prompt"], sampling))
    os.kill(ray.get(worker.__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:  # Ray restarts it; until then calls fail as a dead actor's
        try:
            ray.get(worker.ready.remote(), timeout=60)
            break
        except ray.exceptions.RayActorError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    roles = SimpleNamespace(names={worker._actor_id.hex(): ("rollout-0", "rollout")})
    with pytest.raises(ActorDied) as died:
        RoundRoles._get(roles, [worker.generate.remote(["a prompt"], sampling)])
    assert (died.value.name, died.value.kind) == ("rollout-0", "rollout")
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
