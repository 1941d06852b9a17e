"""The Lagrange multiplier: lambda as exp(log_lambda), moved by the windowed episode cost (paper Eq. 31-32).

Shapes as in core/objectives/__init__.py."""
import math
from collections import deque
from typing import Dict, Iterable, Optional, Union

import torch

Tensor = torch.Tensor


# ---------------------------------------------------------------- Lagrange multiplier


class LagrangeMultiplier:
    """lambda = exp(log_lambda), updated by SGD on -(J_c - threshold) * lambda.

    J_c is the mean of the last `window` observed episode costs. The gradient with
    respect to log_lambda is -(J_c - threshold) * lambda, so each step does
    log_lambda += lr * lambda * (J_c - threshold): lambda rises while the cost
    constraint J_c <= threshold is violated and falls otherwise.
    """

    def __init__(
        self,
        init: float,
        lr: float,
        threshold: float,
        max_value: Optional[float] = None,
        window: int = 128,
        delay_steps: int = 0,
    ):
        if init <= 0:
            raise ValueError(f"init must be > 0 (lambda = exp(log_lambda)), got {init}")
        self.lr = float(lr)
        self.threshold = float(threshold)
        self.max_value = None if max_value is None else float(max_value)
        self.window_size = int(window)
        self.delay_steps = int(delay_steps)
        self.log_lambda = math.log(init)
        self.window: deque = deque(maxlen=self.window_size)
        self.steps = 0
        self._clamp()

    @property
    def value(self) -> float:
        return math.exp(self.log_lambda)

    def _clamp(self) -> None:
        if self.max_value is not None:
            self.log_lambda = min(self.log_lambda, math.log(self.max_value))  # lambda <= max_value

    def observe(self, episode_costs: Union[Tensor, Iterable[float], float]) -> None:
        """Append end-of-sequence costs to the window."""
        if isinstance(episode_costs, Tensor):
            episode_costs = episode_costs.detach().flatten().tolist()
        elif isinstance(episode_costs, (int, float)):
            episode_costs = [episode_costs]
        self.window.extend(float(c) for c in episode_costs)

    def window_mean(self) -> float:
        """J_c: the mean of the window of episode costs."""
        return sum(self.window) / len(self.window)

    def step(self) -> float:
        """One update (skipped for the first `delay_steps` calls or with an empty window)."""
        self.steps += 1
        if self.steps > self.delay_steps and self.window:
            mean_cost = self.window_mean()  # J_c
            self.log_lambda += self.lr * self.value * (mean_cost - self.threshold)  # log_lambda += lr lambda (J_c - d)
            self._clamp()
        return self.value

    def state_dict(self) -> Dict:
        return {
            "log_lambda": self.log_lambda,
            "window": list(self.window),
            "steps": self.steps,
            "lr": self.lr,
            "threshold": self.threshold,
            "max_value": self.max_value,
            "window_size": self.window_size,
            "delay_steps": self.delay_steps,
        }

    def load_state_dict(self, state: Dict) -> None:
        self.lr = float(state["lr"])
        self.threshold = float(state["threshold"])
        self.max_value = state["max_value"]
        self.window_size = int(state["window_size"])
        self.delay_steps = int(state["delay_steps"])
        self.log_lambda = float(state["log_lambda"])
        self.window = deque((float(c) for c in state["window"]), maxlen=self.window_size)
        self.steps = int(state["steps"])
