"""What a monitor has seen over a run, and where it went: each measurement's scalars (the
``history`` that survives resume), the alerts, measured and early, and the loss spikes.

:class:`Logbook` joins the parts that read a measurement or a step — the publisher, the
alert rules and the early warning — so the callback only hands it what Lightning knows
(loggers, ``callback_metrics``, TensorBoard writers) and acts on the alerts it returns.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

from lightning_curvature._checks import check_open_unit
from lightning_curvature.measure.module import Outcome
from lightning_curvature.monitor.alerts import Alert, AlertRules, AlertTracker, check_alert_rules
from lightning_curvature.monitor.early_warning import EarlyWarning, Signals
from lightning_curvature.monitor.publish import RATIO_TRUSTED, Publisher, run_summary
from lightning_curvature.monitor.triggers import Triggers, check_triggers


class Logbook:
    """A run's measurements, alerts and loss spikes, published as they come.

    Args:
        prefix: the tag prefix.
        alert_rules: an :class:`AlertRules`, or None for the defaults.
        triggers: a :class:`Triggers`, or None for the defaults.
        on_alert: called with each alert.
        lr_factor_on_alert: multiply every learning rate by this, in (0, 1), at each alert.
    """

    def __init__(
        self,
        prefix: str,
        alert_rules: AlertRules | None = None,
        triggers: Triggers | None = None,
        on_alert: Callable[[Alert], Any] | None = None,
        lr_factor_on_alert: float | None = None,
    ) -> None:
        self.publisher = Publisher(prefix)
        self.alerts = AlertTracker(check_alert_rules(alert_rules))
        self.early_warning = EarlyWarning(check_triggers(triggers), self.alerts)
        self.on_alert = on_alert
        self.lr_factor_on_alert = (
            None
            if lr_factor_on_alert is None
            else check_open_unit("lr_factor_on_alert", lr_factor_on_alert)
        )
        self.history: list[dict[str, float]] = []

    def measured(
        self,
        outcome: Outcome,
        step: int,
        *,
        overhead: float,
        loggers: Sequence[Any],
        callback_metrics: MutableMapping[str, Any],
        writers: Sequence[Any],
    ) -> list[Alert]:
        """Publish a measurement at ``step``, keep its scalars, and return the alerts it
        raises (to announce and act on)."""
        record = outcome.record
        metrics = self.publisher.publish(
            record,
            step,
            loggers=loggers,
            callback_metrics=callback_metrics,
            writers=writers,
            extra={"overhead": overhead},
        )
        trusted = float(outcome.ratio_trusted)
        self.history.append({"step": float(record.step), **metrics, RATIO_TRUSTED: trusted})
        ratio = record.stability_ratio if outcome.ratio_trusted else None
        self.early_warning.measured(
            record.step, ratio if record.converged else None, record.learning_rate
        )
        return self.alerts.update(record.step, record.sharpness, ratio, record.converged)

    def stepped(
        self,
        step: int,
        *,
        learning_rate: float | None,
        loss: float | None,
        cadence: int | None,
        agree_loss: Callable[[int], int] | None,
        log_step: bool,
        loggers: Sequence[Any],
        writers: Sequence[Any],
        say: Callable[[str], Any],
    ) -> Signals:
        """The early warning's reading of one optimizer step, published; its alerts are
        in the returned signals (to announce and act on)."""
        signals = self.early_warning.observe(step, learning_rate, loss, cadence, agree_loss)
        self.publisher.early_signals(signals, step, log_step, loggers, writers, say)
        return signals

    def respond(
        self,
        alerts: Sequence[Alert],
        writers: Sequence[Any],
        warn: Callable[[str], Any],
        optimizers: Sequence[Any],
    ) -> None:
        """Announce ``alerts`` (a warning, a text entry, the user's ``on_alert``) and, with
        ``lr_factor_on_alert``, multiply every learning rate by it (changes training)."""
        if not alerts:
            return
        self.publisher.announce(alerts, writers, warn, self.on_alert)
        if self.lr_factor_on_alert is not None:
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = group["lr"] * self.lr_factor_on_alert

    def summary(self, schedule: Any, disabled_reason: str | None = None) -> str:
        """The end-of-run line: points, cadence, overhead, the peak ratio, alerts, spikes,
        and why the monitor is off, when it is."""
        summary = run_summary(self.history, self.publisher.prefix, schedule, self.alerts)
        off = None if disabled_reason is None else f"The monitor is off: {disabled_reason}."
        return " ".join(filter(None, (summary, self.early_warning.summary(), off)))

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "alerts": self.alerts.state_dict(),
            "early_warning": self.early_warning.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # .get() defaults: checkpoints from older versions still load.
        self.history = list(state.get("history", []))
        self.alerts.load_state_dict(state.get("alerts", {}))
        self.early_warning.load_state_dict(state.get("early_warning", {}))
