"""Where the numbers go: every logger, ``callback_metrics``, and TensorBoard's extras.

Scalars go to every logger at the trainer's global step (``log_metrics``, as
LearningRateMonitor does: ``LightningModule.log`` would drop steps that miss
``log_every_n_steps``) and into ``callback_metrics`` so EarlyStopping and ModelCheckpoint can
monitor them. A value in ``callback_metrics`` always describes the current parameters: it
is there from the end of the step it was measured at until the next step starts
(:meth:`Publisher.withdraw`), and absent between measurements and after a failed one, so a
checkpoint is never scored with the curvature of older weights. TensorBoard writers also
get the dashboard layout (once), the Ritz-value histogram, the spectral-density figure and a
text entry per alert. Everything is tagged under the monitor's prefix, so several monitors
can publish side by side.
"""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

import torch

from lightning_curvature.measure.record import Measurement
from lightning_curvature.measure.tags import tag
from lightning_curvature.monitor.alerts import Alert
from lightning_curvature.monitor.tensorboard import (
    write_alert,
    write_layout,
    write_loss_spike,
    write_measurement,
)

# The key of a ``history`` row that says whether its stability ratio is trusted (1.0) or
# not yet (0.0, an adaptive optimizer before its bias correction settled); not a logged tag.
RATIO_TRUSTED = "stability_ratio_trusted"


class Publisher:
    """Sends one monitor's measurements and alerts to its destinations."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._layout_written: set[int] = set()
        self._in_callback_metrics: list[str] = []  # the tags :meth:`withdraw` takes back

    def publish(
        self,
        record: Measurement,
        step: int,
        *,
        loggers: Sequence[Any],
        callback_metrics: MutableMapping[str, Any],
        writers: Sequence[Any],
        extra: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """Log ``record`` (and the finite ``extra`` scalars, tagged under the prefix) at
        ``step``; return the scalars logged."""
        metrics = record.scalars(self.prefix)
        metrics.update(
            {
                tag(self.prefix, name): float(v)
                for name, v in (extra or {}).items()
                if math.isfinite(v)
            }
        )
        for logger in loggers:
            logger.log_metrics(metrics, step=step)
        self.withdraw(callback_metrics)
        callback_metrics.update({tag: torch.tensor(value) for tag, value in metrics.items()})
        self._in_callback_metrics = list(metrics)
        for writer in writers:
            if id(writer) not in self._layout_written:
                write_layout(writer, self.prefix)
                self._layout_written.add(id(writer))
            write_measurement(writer, record, step, self.prefix)
        return metrics

    @property
    def holds_metrics(self) -> bool:
        """Whether this monitor has values in ``callback_metrics`` to withdraw."""
        return bool(self._in_callback_metrics)

    def withdraw(self, callback_metrics: MutableMapping[str, Any]) -> None:
        """Take this monitor's values out of ``callback_metrics``: call it before the
        parameters move on (at every batch start), so none outlives the weights it was
        measured on."""
        for name in self._in_callback_metrics:
            callback_metrics.pop(name, None)
        self._in_callback_metrics = []

    def early_signals(
        self,
        signals: Any,
        step: int,
        log_step: bool,
        loggers: Sequence[Any],
        writers: Sequence[Any],
        say: Callable[[str], Any],
    ) -> None:
        """The early warning's step: the predicted ratio to every logger at logging steps
        (``log_step``), triggers and alerts; a loss spike's explanation as a message and a
        TensorBoard text entry. The alerts themselves go through :meth:`announce`."""
        predicted = signals.predicted_ratio
        notable = log_step or signals.alerts or signals.trigger
        if predicted is not None and math.isfinite(predicted) and notable:
            for logger in loggers:
                metric = {tag(self.prefix, "predicted_stability_ratio"): float(predicted)}
                logger.log_metrics(metric, step=step)
        if signals.spike is not None:
            explanation = signals.spike.explanation()
            say(f"CurvatureMonitor: {explanation}")
            for writer in writers:
                write_loss_spike(writer, step, explanation, self.prefix)

    def announce(
        self,
        alerts: Sequence[Alert],
        writers: Sequence[Any],
        warn: Callable[[str], Any],
        on_alert: Callable[[Alert], Any] | None = None,
    ) -> None:
        """Each alert as a warning (``warn``), a TensorBoard text entry and a call of the
        user's ``on_alert``."""
        for alert in alerts:
            warn(f"CurvatureMonitor: {alert.message}")
            for writer in writers:
                write_alert(writer, alert, self.prefix)
            if on_alert is not None:
                on_alert(alert)


def run_summary(
    history: Sequence[dict[str, float]], prefix: str, schedule: Any, alerts: Any
) -> str:
    """The end-of-run line: points, cadence and overhead (the schedule's), the peak stability
    ratio and the alerts fired.

    The peak leaves out the measurements whose ratio the edge alert does not trust either
    (``history`` rows with ``RATIO_TRUSTED`` 0: Adam's first steps, where 1 − β1ᵗ inflates
    P⁻¹H up to ten-fold), so it never reports an artifact of the bias correction.
    """
    ratio = tag(prefix, "stability_ratio")
    logged = [h for h in history if ratio in h]
    trusted = [h for h in logged if h.get(RATIO_TRUSTED, 1.0)]
    peak = max(((h[ratio], int(h["step"])) for h in trusted), default=None)
    text = schedule.summary()
    if peak is not None:
        text += f" Peak stability ratio {peak[0]:.3g} at step {peak[1]}"
        if len(trusted) < len(logged):
            text += " (after the optimizer's bias correction settled)"
        text += "."
    return text + f" {alerts.summary()}"
