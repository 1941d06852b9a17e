"""Connect the driver to Ray: join a cluster (`ray.address`, or RAY_ADDRESS as `ray job submit`
sets it) or start a local one. Only what we started is shut down."""
from __future__ import annotations

import os


def cluster_address(ray_cfg) -> str | None:
    """The cluster to join (`ray.address`, else RAY_ADDRESS), or None: `connect` starts a local one."""
    return ray_cfg.address or os.environ.get("RAY_ADDRESS") or None


def connect(ray_cfg, keep_sigterm: bool = False) -> bool:
    """ray_cfg: pipeline.config.RayConfig. Returns True when this call initialised Ray (and so
    owns the connection, and the local cluster if it started one). keep_sigterm: keep the process's
    own SIGTERM handler (see below) instead of the one Ray installs."""
    import signal
    import threading

    import ray

    if ray.is_initialized():
        return False  # someone else (a test fixture, a notebook) owns it
    # ray.init in the main thread installs a SIGTERM handler that turns `ray job stop` into a
    # SystemExit in whatever the main thread is doing: the pipeline's driver would wait there for
    # its running stages, so it keeps the handler it had (a stop ends it at once, as a crash
    # would; resume continues). The sweep keeps Ray's, so that Tune shuts down in order.
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main and keep_sigterm else None
    address = cluster_address(ray_cfg)
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=ray_cfg.num_cpus, include_dashboard=ray_cfg.include_dashboard, log_to_driver=True)
    if sigterm is not None:
        signal.signal(signal.SIGTERM, sigterm)
    return True


def disconnect(final: bool = False) -> None:
    """ray.shutdown(): the connection, and the local cluster if this process started it. final: while
    other threads still call Ray (the driver's stages, after Ctrl-C): their calls end with SystemExit,
    and Ray's automatic `ray.init` on the next call (their clean-up's) is turned off for this process,
    which would start a new local cluster under them."""
    import ray

    if final:
        from ray._private import auto_init_hook

        auto_init_hook.enable_auto_connect = False
    if ray.is_initialized():
        ray.shutdown()


def allow_auto_connect() -> None:
    """Undo disconnect(final=True)'s hold on Ray's automatic `ray.init`, once the threads it guarded
    have ended (Ray's own rule: on unless RAY_ENABLE_AUTO_CONNECT=0)."""
    from ray._private import auto_init_hook

    auto_init_hook.enable_auto_connect = os.environ.get("RAY_ENABLE_AUTO_CONNECT", "") != "0"
