"""Alert rules over the history of curvature measurements.

Two rules, both pure and small:

- **Sharpness spike**: λmax far above its recent history. Over a window of the last
  ``window`` converged measurements (after ``warmup`` of them), a new λmax fires when it
  exceeds the median by more than ``num_mads`` robust standard deviations
  (1.4826·MAD) *and* by more than ``rtol`` relative to the median, so a flat history with
  a tiny MAD does not fire on noise.
- **Stability threshold**: the stability ratio (relevant sharpness·η / threshold) at or
  above ``threshold_fraction`` for ``patience`` measurements in a row. It fires once and
  re-arms when the ratio falls back below the fraction.

An estimate that has not converged never fires and never enters the history.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

SPIKE = "sharpness_spike"
THRESHOLD = "stability_threshold"
# Scales the median absolute deviation to a standard deviation for Gaussian noise.
MAD_TO_STD = 1.4826


@dataclass(frozen=True)
class Alert:
    """One alert: what fired, at which step, on which value, against which reference."""

    kind: str
    step: int
    value: float
    reference: float
    message: str


@dataclass(frozen=True)
class AlertRules:
    """Settings of the two rules (see the module docstring)."""

    window: int = 20
    warmup: int = 5
    num_mads: float = 6.0
    rtol: float = 1.0
    threshold_fraction: float = 0.9
    patience: int = 3

    def __post_init__(self) -> None:
        for name in ("window", "warmup", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.warmup > self.window:
            raise ValueError(f"warmup must be at most window={self.window}, got {self.warmup}")
        for name in ("num_mads", "rtol", "threshold_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass
class AlertTracker:
    """Applies :class:`AlertRules` to measurements as they arrive; its state survives resume."""

    rules: AlertRules = field(default_factory=AlertRules)
    history: list[float] = field(default_factory=list)
    above_threshold_streak: int = 0
    threshold_alert_active: bool = False
    fired: list[Alert] = field(default_factory=list)

    def update(
        self, step: int, lambda_max: float, stability_ratio: float | None, converged: bool
    ) -> list[Alert]:
        """Feed one measurement; return the alerts it fires (often none)."""
        if not converged or not math.isfinite(lambda_max):
            return []
        alerts = []
        spike = self._spike(step, lambda_max)
        if spike is not None:
            alerts.append(spike)
        self.history = [*self.history, lambda_max][-self.rules.window :]
        crossing = self._threshold(step, stability_ratio)
        if crossing is not None:
            alerts.append(crossing)
        self.fired.extend(alerts)
        return alerts

    def _spike(self, step: int, value: float) -> Alert | None:
        if len(self.history) < self.rules.warmup:
            return None
        median = statistics.median(self.history)
        mad = statistics.median(abs(v - median) for v in self.history)
        robust_limit = median + self.rules.num_mads * MAD_TO_STD * mad
        relative_limit = median + self.rules.rtol * abs(median)
        if value <= max(robust_limit, relative_limit):
            return None
        return Alert(
            kind=SPIKE,
            step=step,
            value=value,
            reference=median,
            message=(
                f"Sharpness spike at step {step}: λmax = {value:.4g}, {value / median:.2f}× the "
                f"median {median:.4g} of the last {len(self.history)} measurements. Training "
                "may be about to become unstable: consider a lower learning rate or warm-up."
                if median > 0
                else f"Sharpness spike at step {step}: λmax = {value:.4g} (median {median:.4g})."
            ),
        )

    def _threshold(self, step: int, ratio: float | None) -> Alert | None:
        if ratio is None or not math.isfinite(ratio):
            return None
        if ratio < self.rules.threshold_fraction:
            self.above_threshold_streak = 0
            self.threshold_alert_active = False
            return None
        self.above_threshold_streak += 1
        if self.threshold_alert_active or self.above_threshold_streak < self.rules.patience:
            return None
        self.threshold_alert_active = True
        return Alert(
            kind=THRESHOLD,
            step=step,
            value=ratio,
            reference=self.rules.threshold_fraction,
            message=(
                f"Edge of stability at step {step}: sharpness·lr is {ratio:.2f}× the optimizer's "
                f"stability threshold for {self.above_threshold_streak} measurements in a row "
                "(1.0 is the edge). Expect oscillating or rising loss; lower the learning rate "
                "if that is not what you want."
            ),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "above_threshold_streak": self.above_threshold_streak,
            "threshold_alert_active": self.threshold_alert_active,
            "fired": [asdict(alert) for alert in self.fired],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # .get() defaults: checkpoints written by older versions still load.
        self.history = [float(v) for v in state.get("history", [])][-self.rules.window :]
        self.above_threshold_streak = int(state.get("above_threshold_streak", 0))
        self.threshold_alert_active = bool(state.get("threshold_alert_active", False))
        self.fired = [Alert(**alert) for alert in state.get("fired", [])]
