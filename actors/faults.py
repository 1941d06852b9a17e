"""Fault injection for tests: make a named actor's process die for real, once.

SAFE_RLHF_KILL="<actor name>:<method>:<call number>" (e.g. "rollout-0:generate:3") hard-exits the
actor's process on that call; SAFE_RLHF_KILL_MARKER names a file created first, so the restarted
actor (whose call count starts again) does not die a second time. Unset: does nothing.
"""
from __future__ import annotations

import os
from collections import Counter

_calls: Counter = Counter()


def maybe_die(method: str) -> None:
    spec = os.environ.get("SAFE_RLHF_KILL")
    if not spec:
        return
    import ray

    name = ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None
    _calls[method] += 1
    marker = os.environ.get("SAFE_RLHF_KILL_MARKER", "/tmp/safe-rlhf-killed")
    if spec == f"{name}:{method}:{_calls[method]}" and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(spec)
        os._exit(1)  # no cleanup, no exception: as a killed process
