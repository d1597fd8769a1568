"""Where the numbers go: every logger, ``callback_metrics``, and TensorBoard's extras.

Scalars go to every logger at the trainer's global step (``log_metrics``, as
LearningRateMonitor does: ``LightningModule.log`` would drop steps that miss
``log_every_n_steps``) and into ``callback_metrics`` so EarlyStopping and ModelCheckpoint can
monitor them. TensorBoard writers also get the dashboard layout (once), the Ritz-value
histogram, the spectral-density figure and a text entry per alert. Everything is tagged
under the monitor's prefix, so several monitors can publish side by side.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

import torch

from lightning_curvature.alerts import Alert
from lightning_curvature.measurement import Measurement
from lightning_curvature.tensorboard import write_alert, write_layout, write_measurement


class Publisher:
    """Sends one monitor's measurements and alerts to its destinations."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._layout_written: set[int] = set()

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
        """Log ``record`` (and ``extra`` scalars, tagged under the prefix) at ``step``;
        return the scalars logged."""
        metrics = record.scalars(self.prefix)
        metrics.update({f"{self.prefix}/{name}": float(v) for name, v in (extra or {}).items()})
        for logger in loggers:
            logger.log_metrics(metrics, step=step)
        callback_metrics.update({tag: torch.tensor(value) for tag, value in metrics.items()})
        for writer in writers:
            if id(writer) not in self._layout_written:
                write_layout(writer, self.prefix)
                self._layout_written.add(id(writer))
            write_measurement(writer, record, step, self.prefix)
        return metrics

    def alert(self, alert: Alert, writers: Sequence[Any]) -> None:
        for writer in writers:
            write_alert(writer, alert, self.prefix)
