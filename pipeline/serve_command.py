"""`python -m pipeline serve`: start Ray Serve on a finished run, wait, and stop within a bound.

The application itself (deployments, routes, limits) is pipeline/serve.py."""
from __future__ import annotations

import os
import sys


def serve_run(driver, args) -> int:
    """Serve a finished run's policies until Ctrl-C or SIGTERM; 2 when refused before starting."""
    import signal
    import threading

    import yaml

    from pipeline.driver import log

    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    cfg = driver.cfg.model_copy(update={"serve": driver.cfg.serve.model_copy(update=updates)})
    from pipeline.serve import APP_NAME, build_app, serve_config, served_policies

    try:  # refused before anything starts: an unknown policy, a model whose context leaves no room for an answer
        policies = list(served_policies(driver.rd.root, cfg, args.policy))
        app = build_app(driver.rd.root, cfg, policies, log=lambda m: log(f"  {m}"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from cluster.ray_session import connect

    owns_ray = connect(cfg.ray)  # inside a job or with ray.address: joins that cluster, as `run` does
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        (driver.rd.root / "serve_config.yaml").write_text(yaml.safe_dump(serve_config(driver.rd.root, cfg, policies),
                                                                          sort_keys=False))
        url = f"http://{cfg.serve.host}:{cfg.serve.port}"
        log(f"serving {', '.join(policies)} at {url}: POST /v1/chat/completions, /v1/completions, /v1/score; "
            f"GET /v1/models, /healthz (Ctrl-C stops; `serve deploy {driver.rd.root / 'serve_config.yaml'}` on a cluster)")
        print(url, flush=True)
        stop.wait()
    finally:
        _stop_serving(APP_NAME, owns_ray, log)
    return 0


SERVE_STOP_S = 20  # a Ctrl-C reaches the whole process group: a local cluster we started dies with us


def _stop_serving(app_name: str, owns_ray: bool, log) -> None:
    """Delete the Serve application (and Serve and the cluster, where we started them), within
    SERVE_STOP_S: Ray's calls wait without end on a cluster that is gone, as it is when a terminal's
    Ctrl-C or a supervisor's SIGTERM went to the whole process group; then the process ends anyway."""
    import threading

    from ray import serve

    from cluster.ray_session import disconnect

    def stop() -> None:
        try:
            serve.delete(app_name)
            if owns_ray:
                serve.shutdown()
        except Exception as e:  # noqa: BLE001 - the cluster may be gone; say so and go on
            log(f"  could not delete the Serve application: {type(e).__name__}: {e}")
        finally:
            if owns_ray:
                disconnect()

    log("stopping: deleting the Serve application")
    worker = threading.Thread(target=stop, daemon=True)
    worker.start()
    worker.join(SERVE_STOP_S)
    if worker.is_alive():
        log(f"  the cluster did not answer in {SERVE_STOP_S} s (stopped with this process?); exiting without it")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
