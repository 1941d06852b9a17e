"""Ray restarts a dead actor (max_restarts) by running its constructor again with the arguments it
was first created with. Those may not be what the actor held when it died: a rollout worker had
newer weights pushed to it, and an actor kept between stages (cluster/pool.py) had a later stage's
model loaded with `reset`. So a restarted rollout worker or scorer answers no work until its caller
has given it the current model again (`reset`); its calls raise `ActorRestarted` until then, which
the round treats as the actor's death (recover, reload, retry in place). Whether Ray restarted
this process is `cluster.pool.restarted_by_ray`.

An actor started ahead of its stage (`ActorPool.prestart`: model_dir None) has its libraries
imported and no model; it refuses work the same way until its stage resets it with one."""
from __future__ import annotations


class ActorRestarted(RuntimeError):
    def __init__(self, message: str, actor_id: str = ""):
        super().__init__(message)
        self.actor_id = actor_id  # hex: which of the caller's actors (Ray's error does not say)


def refuse_if_restarted(obj) -> None:
    # restarted first: one started ahead that Ray restarts comes back with no model, and its caller
    # must see a restart (recover, reload, retry), not a misuse
    if getattr(obj, "restarted", False):
        import ray

        raise ActorRestarted(f"{type(obj).__name__} was restarted by Ray with the arguments it was created with; "
                             "it answers again once its caller has reset it with the current model",
                             ray.get_runtime_context().get_actor_id() or "")
    if getattr(obj, "prestarted", False):
        raise RuntimeError(f"{type(obj).__name__} was started ahead of its stage with no model; reset it with one first")


def awaits_reset(obj) -> bool:
    """For `handle.__ray_call__`: whether the actor was restarted and not yet reset."""
    return bool(getattr(obj, "restarted", False))


def restarted_actor_id(err: ActorRestarted) -> str:
    """The restarted actor's id (hex) from the error a caller's ray.get raised."""
    return getattr(getattr(err, "cause", None), "actor_id", "") or getattr(err, "actor_id", "") or ""
