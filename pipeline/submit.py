"""`python -m pipeline submit [--address URL] [--no-wait] -- ARGS...`: the pipeline as a Ray job.

Submits `python -m pipeline ARGS...` to a running cluster, with this repository as the job's
working directory (`.venv`, `runs` and `.git` left out), and prints the job id and its dashboard
page. Without `--no-wait` it follows the job's log and exits with the pipeline's own exit code
(0 done, 1 a stage failed, 2 bad input, 3 waiting for a person).

Token authentication: a cluster started on a machine that has a Ray token (`~/.ray/auth_token`,
which the first local `ray.init()` creates) runs in token mode, and Ray's clients send the token
only when RAY_AUTH_MODE=token. This command sets RAY_AUTH_MODE=token itself when it is unset and
a token is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), so it works with
no environment set by hand; RAY_AUTH_MODE=disabled opts out.
"""
from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".venv", "runs", ".git", "__pycache__", "*.egg-info", ".pytest_cache"]


def token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()


def use_token_auth_if_available() -> bool:
    """Set RAY_AUTH_MODE=token when it is unset and a token is at hand; -> whether token mode is on.
    Must run before Ray's client code reads its config (before the first request)."""
    if "RAY_AUTH_MODE" not in os.environ and token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def submit(address: str, args: list[str], wait: bool = True) -> int:
    token = use_token_auth_if_available()
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    entrypoint = "python -m pipeline " + shlex.join(args)
    for attempt in range(30):  # a cluster just started answers before its job agent is up
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES})
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or attempt == 29:
                raise
            time.sleep(2)
    try:  # from here on Ctrl-C stops the following, not the job (as `ray job submit` does)
        print(f"job {job_id} submitted to {address} (token auth {'on' if token else 'off'}): {entrypoint}", flush=True)
        print(f"dashboard: {address.rstrip('/')}/#/jobs/{job_id}", flush=True)
        if not wait:
            return 0
        import asyncio

        async def follow():
            async for lines in client.tail_job_logs(job_id):
                print(lines, end="", flush=True)

        asyncio.run(follow())
    except KeyboardInterrupt:
        ray_cli = ("RAY_AUTH_MODE=token " if token else "") + "ray job"
        print(f"\nstopped following job {job_id}; it runs on. Its log: `{ray_cli} logs --follow --address {address} "
              f"{job_id}`; to stop it: `{ray_cli} stop --address {address} {job_id}`", file=sys.stderr, flush=True)
        return 130
    for _ in range(60):  # the log ends a moment before the status is final
        info = client.get_job_info(job_id)
        if info.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    code = getattr(info, "driver_exit_code", None)
    code = code if code is not None else (0 if info.status == JobStatus.SUCCEEDED else 1)
    print(f"job {job_id}: {info.status} (exit code {code})", file=sys.stderr, flush=True)
    return int(code)


def cmd_submit(args) -> int:
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    if not rest:
        print("error: nothing to submit: give the pipeline's arguments after --, e.g. -- run --config configs/tiny.yaml",
              file=sys.stderr)
        return 2
    address = args.address or (os.environ.get("RAY_ADDRESS") if os.environ.get("RAY_ADDRESS", "").startswith("http")
                               else DEFAULT_ADDRESS)
    return submit(address, rest, wait=not args.no_wait)
