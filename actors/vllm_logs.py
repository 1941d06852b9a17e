"""Readable job logs: vLLM's repeated warnings once each (a vLLM general plugin).

vLLM reloads the policy's weights after every PPO step, and each reload logs the same warnings
(e.g. "RotaryEmbedding: Failed to load weights": a buffer that is not in the checkpoint). Those
lines come from vLLM's own processes (the engine core, its workers), so the filter is installed
there, through the `vllm.general_plugins` entry point (pyproject.toml), and only where the round's
actors ask for it (SAFE_RLHF_VLLM_WARNINGS_ONCE=1 in their environment). Each distinct warning
still appears once; errors are never filtered. The checkpoint-loading progress bars are off by
vLLM's own setting (`use_tqdm_on_load=False`, actors/rollout.py).
"""
from __future__ import annotations

import logging
import os

ENV = "SAFE_RLHF_VLLM_WARNINGS_ONCE"


class OncePerMessage(logging.Filter):
    """Lets a WARNING through the first time its (logger, message) is seen; other levels always."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def install() -> None:
    """Add the filter to vLLM's loggers in this process (idempotent)."""
    if os.environ.get(ENV) != "1":
        return
    logger = logging.getLogger("vllm")
    if not any(isinstance(f, OncePerMessage) for f in logger.filters):
        once = OncePerMessage()
        logger.addFilter(once)
        for handler in logger.handlers:  # records of child loggers reach these handlers, not the logger's filters
            handler.addFilter(once)
