"""Connect the driver to Ray: join a cluster (`ray.address`) or start a local one, and stop
only what we started."""
from __future__ import annotations

import os

_started_local = False


def connect(ray_cfg) -> None:
    """ray_cfg: pipeline.config.RayConfig. Inside `ray job submit` RAY_ADDRESS is set and wins."""
    global _started_local
    import ray

    if ray.is_initialized():
        return
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=ray_cfg.num_cpus, include_dashboard=ray_cfg.include_dashboard,
                 log_to_driver=True, configure_logging=False)
        _started_local = True


def disconnect() -> None:
    """Shut down our connection; a local cluster we started goes with it."""
    global _started_local
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _started_local = False
