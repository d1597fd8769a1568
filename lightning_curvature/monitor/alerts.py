r"""Alert rules over the measurements of one training run.

Two rules, each firing once when its condition starts to hold and re-arming when it stops:

- **Sharpness spike** (``"sharpness_spike"``): λmax (the stability-relevant sharpness:
  λmax(P⁻¹H) for adaptive optimizers) is more than ``spike_factor`` times the highest of the
  previous ``spike_window`` converged measurements,

  .. math:: \lambda_t > f \cdot \max(\lambda_{t-w}, \dots, \lambda_{t-1}),

  (:math:`f` compounds as :math:`f^{g/G}` when the last measurement is :math:`g` >
  ``spike_gap_steps`` :math:`= G` steps back: a sparse schedule sees steady sharpening as
  large rises), the jump matters for stability, and the rule is past its warm-up (at least
  ``spike_warmup_measurements`` converged measurements before this one, and the step at
  least ``spike_warmup_steps``). The reference is the last few *measurements*, whatever the
  steps between them: during progressive sharpening (λmax rising several-fold over a run, a
  few percent per measurement) it is the previous value, so no flat early point of a
  log-spaced schedule pins it; a noisy low value cannot lower it; a return to a level seen
  within the window is no spike. A genuine jump (weights scaled up, a learning-rate raise)
  fires at the first measurement that sees it, once: the rule stays quiet while λmax stays
  more than ``spike_factor`` above its reference, and re-arms once it is not (λmax came
  back down, or stopped rising).

  The jump *matters* when the stability ratio it leaves (relevant sharpness × η over the
  optimizer's threshold; 1 is the edge) is at least ``spike_min_ratio``: λmax going from
  0.004 to 0.015 at a ratio of 5·10⁻⁵ is a jump from nothing to almost nothing, far below
  the edge, and no risk to training. Without a trusted ratio (no optimizer owns the
  parameters; Adam before its bias correction settles) the jump alone decides, and the
  message says that it is a relative jump only.
- **Edge of stability** (``"edge_of_stability"``): the stability ratio (relevant
  sharpness × η over the optimizer's stability threshold; 1 is the edge) is at least
  ``edge_ratio`` for ``edge_patience`` measurements in a row, or for at least two in a row
  spanning ``edge_patience_steps`` steps (so a sparse schedule does not delay it by
  thousands of steps). It re-arms when the ratio falls below ``edge_ratio``.

The alerts with lead time, raised between measurements from the predicted ratio and the
trend, are :mod:`~lightning_curvature.monitor.early_warning`'s; their settings
(``predicted_ratio``, ``trend_horizon``) are here, with the others.

An estimate that has not converged (or is not finite) never fires, never enters the
history and leaves both rules' state as it was.

Example::

    from lightning_curvature.monitor.alerts import AlertRules, AlertTracker

    tracker = AlertTracker(AlertRules(spike_warmup_steps=0))
    for step, sharpness in enumerate([7.0, 7.1, 6.9, 7.0, 7.2, 43.4, 18.8, 18.3], start=1):
        for alert in tracker.update(step, sharpness, stability_ratio=None, converged=True):
            print(alert.message)  # once, at step 6
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_curvature._checks import check_int, check_number

SPIKE = "sharpness_spike"
EDGE = "edge_of_stability"
# Alert kinds under the names that older checkpoints stored.
_OLD_KINDS = {"stability_threshold": EDGE}


@dataclass(frozen=True)
class Alert:
    """One alert: what fired (:data:`SPIKE` or :data:`EDGE`), at which step, on which
    value (λmax, or the stability ratio), against which reference (the highest λmax of the
    window, or ``edge_ratio``), and a message for the user."""

    kind: str
    step: int
    value: float
    reference: float
    message: str


@dataclass(frozen=True)
class AlertRules:
    """Settings of the two rules (see the module docstring for the rules themselves).

    Args:
        spike_factor: a spike is λmax above this many times the highest of the previous
            ``spike_window`` measurements; a number > 1.
        spike_window: how many previous converged measurements form the reference.
        spike_warmup_measurements: converged measurements needed before the spike rule
            can fire (at least 1).
        spike_warmup_steps: the spike rule stays quiet before this training step, where
            curvature changes fastest by nature.
        spike_min_ratio: a spike alerts only when it leaves the stability ratio at least
            this (1 is the edge): a jump far below the edge cannot destabilize training.
            0 alerts on every jump.
        spike_gap_steps: when the last measurement is further back than this many steps,
            the factor compounds (``spike_factor ** (gap / spike_gap_steps)``): a sparse
            schedule sees steady sharpening as large rises between its points.
        edge_ratio: the edge-of-stability rule fires when the stability ratio is at least
            this (1.0 is the edge itself) ...
        edge_patience: ... for this many measurements in a row ...
        edge_patience_steps: ... or for at least two in a row this many steps apart.
        predicted_ratio: the early warning alerts when the *predicted* stability ratio (the
            last measured one rescaled to today's learning rate) reaches this, between
            measurements.
        trend_horizon: the early warning alerts when the measured trend reaches the edge
            within this many steps.

    Raises:
        ValueError: naming the argument, for a value outside the range given above.
    """

    spike_factor: float = 2.0
    spike_window: int = 3
    spike_warmup_measurements: int = 5
    spike_warmup_steps: int = 100
    spike_min_ratio: float = 0.1
    spike_gap_steps: int = 256
    edge_ratio: float = 0.9
    edge_patience: int = 3
    edge_patience_steps: int = 50
    predicted_ratio: float = 1.0
    trend_horizon: int = 200

    def __post_init__(self) -> None:
        # object.__setattr__: the dataclass is frozen, and NumPy numbers become Python ones.
        set_field = object.__setattr__
        set_field(
            self,
            "spike_factor",
            check_number("spike_factor", self.spike_factor, above=1.0),
        )
        set_field(self, "spike_window", check_int("spike_window", self.spike_window, 1))
        set_field(
            self,
            "spike_warmup_measurements",
            check_int("spike_warmup_measurements", self.spike_warmup_measurements, 1),
        )
        set_field(
            self,
            "spike_warmup_steps",
            check_int("spike_warmup_steps", self.spike_warmup_steps, 0),
        )
        set_field(
            self,
            "spike_min_ratio",
            check_number("spike_min_ratio", self.spike_min_ratio, at_least=0.0),
        )
        set_field(self, "spike_gap_steps", check_int("spike_gap_steps", self.spike_gap_steps, 1))
        set_field(self, "edge_ratio", check_number("edge_ratio", self.edge_ratio, above=0.0))
        set_field(self, "edge_patience", check_int("edge_patience", self.edge_patience, 1))
        set_field(
            self,
            "edge_patience_steps",
            check_int("edge_patience_steps", self.edge_patience_steps, 1),
        )
        set_field(
            self,
            "predicted_ratio",
            check_number("predicted_ratio", self.predicted_ratio, above=0.0),
        )
        set_field(self, "trend_horizon", check_int("trend_horizon", self.trend_horizon, 1))


def check_alert_rules(rules: object) -> AlertRules:
    """``rules``, or the default rules for None; a ValueError for anything else."""
    if rules is None:
        return AlertRules()
    if not isinstance(rules, AlertRules):
        raise ValueError(f"alert_rules must be an AlertRules or None, got {type(rules).__name__}")
    return rules


@dataclass
class AlertTracker:
    """Applies :class:`AlertRules` to measurements as they arrive; its state survives resume.

    Feed every measurement, in step order, to :meth:`update`; it returns the alerts that
    measurement fires (usually none). ``fired`` keeps every alert of the run.
    """

    rules: AlertRules = field(default_factory=AlertRules)
    # The last ``spike_window`` converged λmax values; their maximum is the spike reference.
    history: list[float] = field(default_factory=list)
    # The step of the latest of them: a rise over a long gap is sharpening, not a jump.
    last_step: int | None = None
    # Converged measurements seen in total (the spike rule's warm-up counts them).
    num_converged: int = 0
    spike_active: bool = False
    edge_streak: int = 0
    edge_streak_start: int = 0
    edge_active: bool = False
    fired: list[Alert] = field(default_factory=list)

    def update(
        self, step: int, lambda_max: float, stability_ratio: float | None, converged: bool
    ) -> list[Alert]:
        """Feed one measurement; return the alerts it fires (often none).

        Args:
            step: the training step of the measurement.
            lambda_max: the measured stability-relevant sharpness (λmax, or λmax(P⁻¹H)
                for adaptive optimizers).
            stability_ratio: relevant sharpness × η over the optimizer's threshold, or
                ``None`` when there is none to trust (then the edge rule waits).
            converged: whether the estimate converged; if not, nothing happens.
        """
        lambda_max = float(lambda_max)
        if not converged or not math.isfinite(lambda_max):
            return []
        alerts = [
            alert
            for alert in (
                self._spike(step, lambda_max, stability_ratio),
                self._edge(step, stability_ratio),
            )
            if alert is not None
        ]
        self.history = [*self.history, lambda_max][-self.rules.spike_window :]
        self.last_step = step
        self.num_converged += 1
        self.fired.extend(alerts)
        return alerts

    def summary(self) -> str:
        """One line for the end of a run: the alerts fired, by kind, with their steps."""
        if not self.fired:
            return "Alerts: none fired."
        parts = []
        # The measurements' rules first, then the early warning's in order of first firing.
        kinds = dict.fromkeys([SPIKE, EDGE, *(alert.kind for alert in self.fired)])
        for kind in kinds:
            steps = [alert.step for alert in self.fired if alert.kind == kind]
            if steps:
                shown = ", ".join(str(s) for s in steps[:10]) + (", …" if len(steps) > 10 else "")
                parts.append(f"{len(steps)} {kind.replace('_', ' ')} (steps {shown})")
        return f"Alerts: {'; '.join(parts)}."

    # ------------------------------------------------------------------ the two rules
    def _spike(self, step: int, value: float, ratio: float | None) -> Alert | None:
        rules = self.rules
        warmed_up = (
            self.num_converged >= rules.spike_warmup_measurements
            and step >= rules.spike_warmup_steps
            and self.history
        )
        if not warmed_up:
            return None
        reference = max(self.history)
        # Over a gap longer than spike_gap_steps, a rise of spike_factor per that many steps
        # is progressive sharpening seen sparsely, not a jump: the factor compounds.
        gap = step - (self.last_step if self.last_step is not None else step)
        factor = rules.spike_factor ** max(1.0, gap / rules.spike_gap_steps)
        # A relative rule needs a positive reference: λmax <= 0 has no "times higher".
        is_spike = reference > 0 and value > factor * reference
        level = math.nan if ratio is None else float(ratio)
        known = math.isfinite(level)
        matters = not known or level >= rules.spike_min_ratio
        fires = is_spike and matters and not self.spike_active
        self.spike_active = is_spike
        if not fires:
            return None
        where = (
            f"The stability ratio is now {level:.3g} (1 is the edge of stability)"
            if known
            else "The stability ratio is unknown here, so this is a relative jump only"
        )
        return Alert(
            kind=SPIKE,
            step=step,
            value=value,
            reference=reference,
            message=(
                f"Sharpness spike at step {step}: λmax = {value:.4g}, {value / reference:.2f}× "
                f"the highest {reference:.4g} of the previous {len(self.history)} "
                f"measurements (spike_factor={rules.spike_factor:g}). {where}. Something "
                "changed the loss landscape abruptly (a learning-rate change, a weight scale, "
                "a data shift); training may become unstable."
            ),
        )

    def _edge(self, step: int, ratio: float | None) -> Alert | None:
        if ratio is None or not math.isfinite(ratio):
            return None
        ratio = float(ratio)
        if ratio < self.rules.edge_ratio:
            self.edge_streak = 0
            self.edge_active = False
            return None
        if self.edge_streak == 0:
            self.edge_streak_start = step
        self.edge_streak += 1
        span = step - self.edge_streak_start
        patient = self.edge_streak >= self.rules.edge_patience or (
            self.edge_streak >= 2 and span >= self.rules.edge_patience_steps
        )
        if self.edge_active or not patient:
            return None
        self.edge_active = True
        return Alert(
            kind=EDGE,
            step=step,
            value=ratio,
            reference=self.rules.edge_ratio,
            message=(
                f"Edge of stability at step {step}: sharpness·lr is {ratio:.2f}× the "
                f"optimizer's stability threshold for {self.edge_streak} measurements in a "
                f"row, over {span} steps (1.0 is the edge). Expect oscillating or rising "
                "loss; lower the learning rate if that is not what you want."
            ),
        )

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "last_step": self.last_step,
            "num_converged": self.num_converged,
            "spike_active": self.spike_active,
            "edge_streak": self.edge_streak,
            "edge_streak_start": self.edge_streak_start,
            "edge_active": self.edge_active,
            "fired": [asdict(alert) for alert in self.fired],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # .get() defaults, and the key names older versions wrote, so old checkpoints load.
        history = [float(v) for v in state.get("history", [])]
        self.history = history[-self.rules.spike_window :]
        self.num_converged = int(state.get("num_converged", len(history)))
        self.last_step = state.get("last_step")
        self.spike_active = bool(state.get("spike_active", False))
        self.edge_streak = int(state.get("edge_streak", state.get("above_threshold_streak", 0)))
        self.edge_streak_start = int(state.get("edge_streak_start", 0))
        self.edge_active = bool(
            state.get("edge_active", state.get("threshold_alert_active", False))
        )
        self.fired = [
            Alert(**{**alert, "kind": _OLD_KINDS.get(alert["kind"], alert["kind"])})
            for alert in state.get("fired", [])
        ]
