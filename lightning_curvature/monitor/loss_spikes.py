"""Loss spikes and what curvature said when they came: the record the early warning keeps
for each, in words for TensorBoard's text tab and the end-of-fit line."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_curvature.monitor.triggers import Triggers

# A loss spike's lead time counts from alerts at most this many steps before it.
LEAD_WINDOW = 1000
# How far above the recent losses' spread a loss jump must be, in robust deviations.
_ROBUST_Z = 10.0


def far_above_recent(losses: Sequence[float], loss: float, rules: Triggers) -> bool:
    """Whether ``loss`` is far above the recent ``losses``: ``rules.loss_jump`` × their
    median, and more than ``_ROBUST_Z`` robust standard deviations (1.4826 × the median
    absolute deviation) above it (never with fewer than half of ``rules.loss_window``). A
    jump counts when two steps in a row are far above: one unlucky minibatch is noise, a
    divergence grows (on a 2,000-step minibatch run the ratio alone flagged 20 batches, two
    in a row with the spread none)."""
    if rules.loss_jump is None or len(losses) < rules.loss_window // 2:
        return False
    median = statistics.median(losses)
    if loss <= rules.loss_jump * median:
        return False  # the usual case, decided without the spread
    spread = 1.4826 * statistics.median(abs(x - median) for x in losses)
    return loss > median + _ROBUST_Z * spread


@dataclass(frozen=True)
class LossSpike:
    """A loss spike and what curvature said when it came."""

    step: int
    loss: float
    recent_median: float
    measured_ratio: float | None
    measured_step: int | None
    predicted_ratio: float | None
    trend_per_step: float | None
    first_alert: str | None
    first_alert_step: int | None

    @classmethod
    def record(
        cls,
        step: int,
        loss: float | None,
        predicted: float | None,
        early: Any,
        fired: Sequence[Any],
    ) -> LossSpike:
        """What curvature said at a spike at ``step``: the early warning's reference, its
        prediction and trend, and the first alert since the previous spike (at most
        :data:`LEAD_WINDOW` steps before)."""
        after = early.spikes[-1].step if early.spikes else -math.inf
        recent = (a for a in fired if after < a.step <= step and step - a.step <= LEAD_WINDOW)
        first = next(recent, None)
        reference = early.reference
        return cls(
            step=step,
            loss=math.nan if loss is None else float(loss),
            recent_median=statistics.median(early.losses) if early.losses else math.nan,
            measured_ratio=None if reference is None else reference[1],
            measured_step=None if reference is None else reference[0],
            predicted_ratio=predicted,
            trend_per_step=early.trend(),
            first_alert=None if first is None else first.kind,
            first_alert_step=None if first is None else first.step,
        )

    @property
    def lead_steps(self) -> int | None:
        """Steps from the first alert to the spike (None: no alert came first)."""
        return None if self.first_alert_step is None else self.step - self.first_alert_step

    def explanation(self) -> str:
        """What curvature said at this spike, in words."""
        loss = f"{self.loss:.4g}" if math.isfinite(self.loss) else "not finite"
        text = f"Loss spike at step {self.step}: loss {loss} against a recent median of "
        text += f"{self.recent_median:.4g}."
        if self.measured_ratio is None:
            text += " No trusted stability ratio had been measured yet."
        else:
            text += f" The stability ratio was {self.measured_ratio:.3g} at step "
            text += f"{self.measured_step} (1 is the edge)"
            if self.predicted_ratio is not None:
                text += f", {self.predicted_ratio:.3g} predicted with today's learning rate"
            if self.trend_per_step is not None:
                text += f", trend {self.trend_per_step * 100:+.3g} per 100 steps"
            text += "."
        if self.first_alert is None:
            text += " No alert came before it."
        else:
            text += f" The first alert, {self.first_alert}, came {self.lead_steps} steps before."
        return text


def spike_summary(spikes: Sequence[LossSpike]) -> str:
    """One line for the end of a run: the loss spikes and their lead times ("" for none)."""
    if not spikes:
        return ""
    parts = []
    for spike in spikes[:5]:
        lead = (
            "no alert before it"
            if spike.first_alert is None
            else f"{spike.first_alert} {spike.lead_steps} steps before"
        )
        parts.append(f"step {spike.step} ({lead})")
    more = ", …" if len(spikes) > 5 else ""
    return f"Loss spikes: {len(spikes)} ({'; '.join(parts)}{more})."


def not_finite_message(step: int, reference: tuple[int, float, float] | None) -> str:
    """The alert for a non-finite training loss, with what curvature said last."""
    said = "no trusted stability ratio was measured before it"
    if reference is not None:
        said = f"the last stability ratio was {reference[1]:.3g}, at step {reference[0]}"
    return (
        f"The training loss is not finite at step {step}, so curvature cannot be measured "
        f"there; {said}. Training has diverged: lower the learning rate, or resume from an "
        "earlier checkpoint."
    )
