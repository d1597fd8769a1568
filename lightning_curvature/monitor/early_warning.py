r"""Early warning: the risk between measurements, from signals that cost nothing.

At every optimizer step the monitor knows, for free, the learning rate η_s of the optimizer
that owns the measured parameters, the training loss, and the last trusted measurement: its
stability ratio r_m (relevant sharpness × η_m over the optimizer's threshold; 1 is the edge)
at step m. Sharpness moves slowly between measurements, η can jump (a scheduler, the end of a
warm-up, a resume), so the **predicted stability ratio** is

.. math:: \hat r_s = r_m \cdot \eta_s / \eta_m .

For adaptive optimizers r_m is λmax(P⁻¹H)·η_m/threshold and P is taken as unchanged; the
next measurement corrects both. :class:`EarlyWarning` turns these into

**Triggers** (measure now, between scheduled steps; :class:`Triggers`):

- ``edge``: :math:`\hat r_s` crosses ``AlertRules.edge_ratio`` from below;
- ``lr_change``: η changed by more than that fraction since the last measurement;
- ``loss_jump``: two losses in a row more than that factor above the median of the last
  ``loss_window`` and more than 10 robust deviations above it (one unlucky minibatch is
  noise; a divergence grows); a non-finite loss cannot be measured: it raises an alert;
- ``trend``: the measured trend (least squares over the last three trusted ratios)
  reaches the edge before the next scheduled measurement: measure at the crossing;
- ``risk``: near the edge, look more often: with :math:`\hat r_s \ge 0.5`, when more than
  n/2 steps passed since the last measurement (n/4 from 0.7, n/8 from ``edge_ratio``; n
  the cadence). Far from it (:math:`\hat r_s < 0.25`, no trend reaching the edge within
  4n steps), a calibrated cadence skips every other track point, and each skipped point
  goes into the budget.

Triggered measurements are *added* to the schedule (an explicit ``every_n_steps`` stays a
promise), at least ``min_gap`` steps apart, and paid from a budget: a bucket that refills
at one measurement per cadence n and holds at most ``burst`` (it starts full); only
``edge`` bypasses it (once per crossing). Every rule depends on steps, η, the agreed
measurements and the loss; under data parallelism each rank's loss jump is agreed at
multiples of ``min_gap``, one collective there and none elsewhere.

**Alerts with lead time** (:class:`~lightning_curvature.monitor.alerts.Alert`):

- ``predicted_edge``: :math:`\hat r_s` reaches ``AlertRules.predicted_ratio`` (1: the
  edge) at a step between measurements, before any measurement confirms it;
- ``sharpness_trend``: the trend reaches the edge within ``AlertRules.trend_horizon``
  steps, from a ratio of at least 0.5;
- ``loss_not_finite``: the training loss is NaN or infinite.

Each fires once and re-arms when its condition stops holding.

**Loss spikes explained.** A loss jump (as above) or a non-finite loss starts a spike (a
new one only after a whole ``loss_window`` of calm); :attr:`EarlyWarning.spikes` records
what curvature said then: the last measured ratio, the predicted one, the trend, and which
alert came first and how many steps before.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_curvature.monitor.alerts import Alert, AlertTracker
from lightning_curvature.monitor.loss_spikes import (
    LossSpike,
    far_above_recent,
    not_finite_message,
    spike_summary,
)
from lightning_curvature.monitor.triggers import (
    TriggerBudget,
    Triggers,
    least_squares_slope,
    risk_wait,
)

PREDICTED = "predicted_edge"
TREND = "sharpness_trend"
LOSS_NOT_FINITE = "loss_not_finite"
EARLY_KINDS = (PREDICTED, TREND, LOSS_NOT_FINITE)
_TREND_POINTS = 3
_FAR = 0.25  # a predicted ratio under this is far from the edge
# Loss events, ordered so that the worst over ranks is the maximum.
_CALM, _JUMP, _NOT_FINITE = 0, 1, 2
# The trigger that does not draw on the budget: it fires once per crossing.
_UNBUDGETED = ("edge",)
_TREND_FLOOR = 0.5  # no trend alert from further below the edge than this ratio


@dataclass
class Signals:
    """What :meth:`EarlyWarning.observe` says for one step."""

    predicted_ratio: float | None = None
    trigger: str | None = None
    sparse: bool = False  # far from the edge: the schedule may skip a track point
    alerts: list[Alert] = field(default_factory=list)
    spike: LossSpike | None = None


class EarlyWarning:
    """Predicted ratio, triggers, early alerts and spike records over a run (module
    docstring). Feed every step to :meth:`observe` and every measurement to :meth:`measured`;
    the state survives resume (:meth:`state_dict`)."""

    def __init__(self, triggers: Triggers | None = None, alerts: AlertTracker | None = None):
        self.triggers = triggers or Triggers()
        # The run's alert log: early alerts join the measurements' ones there.
        self.alerts = alerts or AlertTracker()
        self.rules = self.alerts.rules
        self.reference: tuple[int, float, float] | None = None  # (step, ratio, η) trusted
        self.last_measured_step = 0
        self.last_measured_lr: float | None = None
        self.trend_points: list[tuple[int, float]] = []  # replaced, never changed in place
        self._slope: tuple[list[tuple[int, float]], float | None] | None = None
        self.losses: list[float] = []
        self.pending_loss_event = _CALM
        self.above_recent = False  # the last loss was far above the recent ones
        self.last_unsettled_step: int | None = None  # the last step with a loss event
        self.budget = TriggerBudget(self.triggers.burst)
        self.last_trigger_step = -(10**9)
        self.active: dict[str, bool] = {kind: False for kind in (*EARLY_KINDS, "edge")}
        self.spikes: list[LossSpike] = []

    # ------------------------------------------------------------------ inputs
    def measured(self, step: int, ratio: float | None, learning_rate: float | None) -> None:
        """A measurement completed at ``step`` with this trusted stability ratio (None: none
        to trust) under this η."""
        self.last_measured_step = step
        self.last_measured_lr = learning_rate
        if ratio is None or learning_rate is None or not math.isfinite(ratio) or learning_rate <= 0:
            return
        self.reference = (step, float(ratio), float(learning_rate))
        # Each point as the sharpness it measured (ratio per unit η): an η change is no trend.
        point = (step, float(ratio) / float(learning_rate))
        self.trend_points = [*self.trend_points, point][-_TREND_POINTS:]
        self.active["edge"] = ratio >= self.rules.edge_ratio

    def observe(
        self,
        step: int,
        learning_rate: float | None,
        loss: float | None,
        cadence: int | None,
        agree_loss: Callable[[int], int] | None = None,
    ) -> Signals:
        """The predicted ratio, the trigger (or None) and the early alerts at ``step``.

        Args:
            step: the global step after this optimizer step.
            learning_rate: η now (of the optimizer owning the measured parameters).
            loss: the training loss of this step, when known.
            cadence: the schedule's cadence n (None while it calibrates).
            agree_loss: under data parallelism, ``max_over_ranks(code) -> code``, a
                collective, called only at steps that are multiples of ``min_gap``.
        """
        self.budget.refill(step, cadence)
        signals = Signals(predicted_ratio=self.predicted_ratio(learning_rate, step))
        event = self._loss_event(step, loss, agree_loss)
        if event == _NOT_FINITE:
            message = not_finite_message(step, self.reference)
            signals.alerts += self._fire(LOSS_NOT_FINITE, True, step, math.inf, 0.0, message)
        signals.alerts += self._predicted_alert(step, signals.predicted_ratio, learning_rate)
        signals.alerts += self._trend_alert(step)
        self.alerts.fired += signals.alerts
        if event != _CALM:
            # A new spike only after a whole loss window of calm: an oscillating blow-up
            # is one spike, not one per swing.
            last = self.last_unsettled_step
            if last is None or step - last > self.triggers.loss_window:
                signals.spike = LossSpike.record(
                    step, loss, signals.predicted_ratio, self, self.alerts.fired
                )
                self.spikes.append(signals.spike)
            self.last_unsettled_step = step
        if event != _NOT_FINITE:
            new_jump = signals.spike is not None
            signals.trigger = self._trigger(
                step, signals.predicted_ratio, learning_rate, new_jump, cadence
            )
        signals.sparse = self.far_from_edge(signals.predicted_ratio, cadence)
        if signals.trigger is not None:
            self.last_trigger_step = step
            if signals.trigger not in _UNBUDGETED:
                self.budget.spend()
        return signals

    def far_from_edge(self, predicted: float | None, cadence: int | None) -> bool:
        """Whether the run is far from the edge: a predicted ratio under 0.25 and no trend
        that reaches the edge within four cadences (the schedule may then measure sparser,
        and what it saves pays for triggered measurements: :meth:`saved_one`)."""
        if not self.triggers.risk or predicted is None or cadence is None:
            return False
        steps = self._steps_to_edge()
        return predicted < _FAR and (steps is None or steps > 4 * cadence)

    def saved_one(self) -> None:
        """A scheduled measurement was skipped far from the edge: its cost is in the budget."""
        self.budget.save()

    def predicted_ratio(self, learning_rate: float | None, step: int | None = None) -> float | None:
        """The last trusted ratio rescaled to η now; with ``step``, its sharpness carried
        along a rising trend too (at most ``trend_horizon`` steps of it): during a warm-up
        sharpness and η rise together. None without a ratio or an η."""
        if self.reference is None or learning_rate is None or not math.isfinite(learning_rate):
            return None
        measured_step, ratio, lr = self.reference
        per_lr = ratio / lr  # sharpness over the threshold
        slope = self._sharpness_slope()
        if step is not None and slope is not None and slope > 0:
            per_lr += slope * min(step - measured_step, self.rules.trend_horizon)
        return per_lr * learning_rate

    def trend(self) -> float | None:
        """The ratio's slope per step at the last measurement's η: least squares over the
        last trusted measurements of the sharpness (ratio per unit η), times that η."""
        slope = self._sharpness_slope()
        return None if slope is None or self.reference is None else slope * self.reference[2]

    def _sharpness_slope(self) -> float | None:
        """The least-squares slope per step of the sharpness over the threshold (ratio per
        unit η) over the last trusted measurements; None with too few. Read several times
        at every step, it changes only with the points (a new list each time): kept."""
        points = self.trend_points
        if self._slope is None or self._slope[0] is not points:
            self._slope = (points, least_squares_slope(points, _TREND_POINTS))
        return self._slope[1]

    def summary(self) -> str:
        """One line for the end of a run: the loss spikes and their lead times."""
        return spike_summary(self.spikes)

    # ------------------------------------------------------------------ resume
    _STATE = (
        "last_measured_step",
        "last_measured_lr",
        "losses",
        "last_trigger_step",
        "last_unsettled_step",
        "above_recent",
        "active",
    )

    def state_dict(self) -> dict[str, Any]:
        return {
            **{name: copy.copy(getattr(self, name)) for name in self._STATE},
            "budget": self.budget.state_dict(),
            "reference": None if self.reference is None else list(self.reference),
            "trend_points": [list(point) for point in self.trend_points],
            "spikes": [asdict(spike) for spike in self.spikes],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self._STATE:
            if name in state:
                value = state[name]
                setattr(self, name, copy.copy(value))
        self.budget.load_state_dict(state.get("budget", {}))
        reference = state.get("reference")
        self.reference = (
            None
            if reference is None
            else (int(reference[0]), float(reference[1]), float(reference[2]))
        )
        self.trend_points = [(int(s), float(r)) for s, r in state.get("trend_points", [])]
        self.spikes = [LossSpike(**spike) for spike in state.get("spikes", [])]

    # ------------------------------------------------------------------ rules
    def _loss_event(self, step: int, loss: float | None, agree: Callable[[int], int] | None) -> int:
        """This step's loss event: calm, a jump above the recent median, or not finite.
        Under data parallelism each rank's event waits for the next multiple of
        ``min_gap``, where the worst over ranks holds on every rank."""
        rules = self.triggers
        event = _CALM
        if loss is not None and not math.isfinite(loss):
            event = _NOT_FINITE
        elif loss is not None:
            above = far_above_recent(self.losses, float(loss), self.triggers)
            if above and self.above_recent:
                event = _JUMP
            self.above_recent = above
            self.losses.append(float(loss))  # (state_dict hands out a copy)
            del self.losses[: -rules.loss_window]
        if agree is None:
            return event
        self.pending_loss_event = max(self.pending_loss_event, event)
        if step % rules.min_gap != 0:
            return _CALM  # this rank's event waits for the agreement
        event, self.pending_loss_event = int(agree(self.pending_loss_event)), _CALM
        return event

    def _trigger(
        self, step: int, predicted: float | None, lr: float | None, jump: bool, cadence: int | None
    ) -> str | None:
        rules = self.triggers
        if step - max(self.last_trigger_step, self.last_measured_step) < rules.min_gap:
            return None
        crossed = predicted is not None and predicted >= self.rules.edge_ratio
        if rules.edge and crossed and not self.active["edge"]:
            self.active["edge"] = True  # once per crossing; a measurement re-arms it
            return "edge"
        if not self.budget.affords_one():
            return None
        if jump:
            return "loss_jump"  # once per spike: the start of it
        if rules.lr_change is not None and lr is not None and self.last_measured_lr:
            if abs(lr - self.last_measured_lr) > rules.lr_change * self.last_measured_lr:
                return "lr_change"
        since = step - self.last_measured_step
        if rules.trend and cadence is not None:
            crossing = self._steps_to_edge()
            if crossing is not None and self.last_measured_step + crossing <= step < (
                self.last_measured_step + cadence
            ):
                return "trend"
        if rules.risk and cadence is not None and predicted is not None:
            wait = risk_wait(predicted, cadence, rules.min_gap, self.rules.edge_ratio)
            return "risk" if wait is not None and since >= wait else None
        return None

    def _steps_to_edge(self) -> float | None:
        """Steps from the last trusted measurement until the trend reaches the edge."""
        slope = self.trend()
        if slope is None or slope <= 0 or self.reference is None:
            return None
        return max(0.0, (1.0 - self.reference[1]) / slope)

    def _predicted_alert(self, step: int, predicted: float | None, lr: float | None) -> list[Alert]:
        if predicted is None or self.reference is None or lr is None:
            return []
        measured_step, ratio, measured_lr = self.reference
        limit = self.rules.predicted_ratio
        # The crossing is η's (and the trend's) doing: a measured ratio at the edge is the
        # edge rule's business.
        holds = predicted >= limit > ratio and step > measured_step
        if predicted < self.rules.edge_ratio:
            self.active[PREDICTED] = False
        if not holds or self.active[PREDICTED]:
            return []  # nothing fires (the message is written only for an alert)
        trend = " and its rising trend" if predicted > ratio * lr / measured_lr else ""
        message = (
            f"Predicted edge of stability at step {step}: the learning rate is now {lr:.4g}, "
            f"{lr / measured_lr:.3g}× the {measured_lr:.4g} of step {measured_step}, whose "
            f"stability ratio was {ratio:.3g}; with the sharpness measured there{trend}, the "
            f"ratio is now about {predicted:.3g} (1 is the edge: sharpness·lr at the "
            "optimizer's threshold). Training is likely to diverge along the top eigenvector "
            "within tens of steps unless the learning rate comes down; a measurement follows."
        )
        return self._fire(PREDICTED, True, step, predicted, limit, message, rearm=False)

    def _trend_alert(self, step: int) -> list[Alert]:
        steps = self._steps_to_edge()
        assert self.rules.trend_horizon >= 1
        holds = (
            steps is not None
            and self.reference is not None
            and _TREND_FLOOR <= self.reference[1] < 1.0  # at the edge: the edge rule speaks
            and steps <= self.rules.trend_horizon
        )
        if not holds or self.reference is None or steps is None:
            self.active[TREND] = False
            return []
        slope = self.trend() or 0.0
        measured_step, ratio, _ = self.reference
        message = (
            f"Sharpness trend at step {step}: the stability ratio rose to {ratio:.3g} at step "
            f"{measured_step}, {slope * 100:+.3g} per 100 steps over the last "
            f"{len(self.trend_points)} measurements; at this rate sharpness·lr reaches the "
            f"optimizer's threshold in about {steps:.0f} steps (by step "
            f"{measured_step + round(steps)}). Lower the learning rate, or expect the edge of "
            "stability."
        )
        return self._fire(TREND, True, step, ratio, 1.0, message)

    def _fire(
        self,
        kind: str,
        holds: bool,
        step: int,
        value: float,
        reference: float,
        message: str,
        rearm: bool = True,
    ) -> list[Alert]:
        if not holds:
            if rearm:
                self.active[kind] = False
            return []
        if self.active[kind]:
            return []
        self.active[kind] = True
        return [Alert(kind=kind, step=step, value=value, reference=reference, message=message)]
