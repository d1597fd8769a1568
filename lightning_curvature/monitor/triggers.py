"""When the early warning measures between scheduled steps: the :class:`Triggers` a user
sets, the budget that bounds them, and how long to wait near the edge.

The rules themselves are stated in :mod:`~lightning_curvature.monitor.early_warning`.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_curvature._checks import check_int, check_number

# Risk levels of the predicted ratio below the edge rule's own, and the share of the cadence
# each waits between looks (from ``AlertRules.edge_ratio``: an eighth).
RISK_LEVELS = ((0.7, 4), (0.5, 2))
# While the cadence is being calibrated, the budget refills as if it were this.
_CALIBRATING_CADENCE = 32


@dataclass(frozen=True)
class Triggers:
    """When to measure between scheduled steps (see the module docstring).

    Args:
        edge: measure when the predicted stability ratio crosses ``AlertRules.edge_ratio``.
        lr_change: measure when η moved by more than this fraction since the last
            measurement (0.5: by half); ``None``: never for that.
        loss_jump: measure when the loss exceeds this factor times its recent median (> 1);
            ``None``: never for that.
        loss_window: how many recent losses form that median.
        trend: measure where the measured trend crosses the edge, when that comes before
            the next scheduled measurement.
        risk: measure more often near the edge (every n/2, n/4, n/8 steps).
        min_gap: the fewest steps between two triggered measurements.
        burst: the most triggered measurements in a row before the budget (one per
            cadence) limits them.

    Raises:
        ValueError: naming the argument, for a value outside its range.
    """

    edge: bool = True
    lr_change: float | None = 0.5
    loss_jump: float | None = 3.0
    loss_window: int = 32
    trend: bool = True
    risk: bool = True
    min_gap: int = 8
    burst: int = 4

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # frozen; NumPy numbers become Python ones
        for name in ("edge", "trend", "risk"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.lr_change is not None:
            set_field(self, "lr_change", check_number("lr_change", self.lr_change, above=0.0))
        if self.loss_jump is not None:
            set_field(self, "loss_jump", check_number("loss_jump", self.loss_jump, above=1.0))
        set_field(self, "loss_window", check_int("loss_window", self.loss_window, 3))
        set_field(self, "min_gap", check_int("min_gap", self.min_gap, 1))
        set_field(self, "burst", check_int("burst", self.burst, 1))


def check_triggers(triggers: object) -> Triggers:
    """``triggers``, or the default triggers for None; a ValueError for anything else."""
    if triggers is None:
        return Triggers()
    if not isinstance(triggers, Triggers):
        raise ValueError(f"triggers must be a Triggers or None, got {type(triggers).__name__}")
    return triggers


def risk_wait(predicted_ratio: float, cadence: int, min_gap: int, edge_ratio: float) -> int | None:
    """Steps to wait between looks at this predicted ratio (n/2 from 0.5, n/4 from 0.7,
    n/8 from ``edge_ratio``, never under ``min_gap``); None far from the edge (no extra
    looks)."""
    levels = sorted(((edge_ratio, 8), *RISK_LEVELS), reverse=True)
    for level, parts in levels:
        if predicted_ratio >= level:
            return max(min_gap, cadence // parts)
    return None


class TriggerBudget:
    """A bucket of triggered measurements: it holds at most ``burst`` (and starts full),
    and refills at one per cadence, so triggers at most double the measurement rate."""

    def __init__(self, burst: int) -> None:
        self.burst = burst
        self.credit = float(burst)
        self.last_step: int | None = None

    def refill(self, step: int, cadence: int | None) -> None:
        if self.last_step is not None and step > self.last_step:
            gained = (step - self.last_step) / (cadence or _CALIBRATING_CADENCE)
            self.credit = min(float(self.burst), self.credit + gained)
        self.last_step = step

    def affords_one(self) -> bool:
        return self.credit >= 1.0

    def spend(self) -> None:
        self.credit -= 1.0

    def save(self) -> None:
        """A scheduled measurement left out: one more in the bucket (up to ``burst``)."""
        self.credit = min(float(self.burst), self.credit + 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"credit": self.credit, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.credit = float(state.get("credit", self.burst))
        self.last_step = state.get("last_step")


def least_squares_slope(points: Sequence[tuple[int, float]], needed: int) -> float | None:
    """The least-squares slope per step through ``points`` (step, value); None with fewer
    than ``needed`` points or a single step among them."""
    if len(points) < needed:
        return None
    steps = [float(s) for s, _ in points]
    if len(set(steps)) < 2:
        return None
    return statistics.linear_regression(steps, [value for _, value in points]).slope
