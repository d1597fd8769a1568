"""CurvatureMonitor: a thin adapter from Lightning's hooks onto the monitor's parts.

When to measure is :mod:`~lightning_curvature.monitor.schedule`'s business, on what
:mod:`~lightning_curvature.monitor.probes`', how :mod:`~lightning_curvature.measure.module`'s
and where the numbers go :mod:`~lightning_curvature.monitor.publish`'s. This module reads the
trainer, keeps the run's state for checkpoints, and handles failures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_curvature import _trainer as facts
from lightning_curvature._checks import check_int
from lightning_curvature._lightning import Callback, pl, rank_zero_info, rank_zero_warn
from lightning_curvature.measure.module import Objective, Outcome
from lightning_curvature.measure.objective import Mode
from lightning_curvature.measure.tags import TAG_PREFIX
from lightning_curvature.monitor.alerts import Alert, AlertRules, AlertTracker
from lightning_curvature.monitor.arguments import check_arguments, measure_settings
from lightning_curvature.monitor.early_warning import Signals
from lightning_curvature.monitor.failures import FailurePolicy, OnError
from lightning_curvature.monitor.logbook import Logbook
from lightning_curvature.monitor.measurer import Measurer, measurer_for
from lightning_curvature.monitor.probes import ProbeKind, ProbeSet, check_params
from lightning_curvature.monitor.schedule import MeasurementSchedule
from lightning_curvature.monitor.triggers import Triggers
from lightning_curvature.operators.names import Curvature


class CurvatureMonitor(Callback):
    r"""Log the Hessian's sharpness, top eigenvalues and trace, and sharpness·lr, while training.

    At every scheduled step a cheap *track* measurement logs the sharpness that matters for
    the optimizer (λmax, and λmax(P⁻¹H) for Adam, RMSprop and Adagrad), λmax·η against the
    optimizer's stability threshold, the learning rate, and the sharpness along the last
    update and of each probe batch's gradient. Every ``full_every`` measurements a *full*
    one adds the top ``k``, the trace, and optionally λmin and the spectral density. Scalars
    go to every logger and ``trainer.callback_metrics``; TensorBoard also gets a dashboard.
    Alerts fire when sharpness jumps or sits at the optimizer's edge of stability, and,
    between measurements, when the learning rate now puts the last measured sharpness past
    the edge (the early warning reads η and the loss at every step, for free).

    Measuring never changes training: parameters, gradients, optimizer state, BatchNorm
    statistics, RNG streams, modes and the module's own Python state are exactly as they would
    be without it (unless you opt into ``stop_on_alert`` or ``lr_factor_on_alert``).

    Under DDP the Hessian is that of the union of the ranks' probe batches, and so under
    ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2), on each rank's shards by finite
    differences; other sharded strategies switch it off. Arguments are keyword-only.

    Args:
        every_n_steps: measure every this many optimizer steps, exactly (never skipped; one
            warning if it costs more than ``max_overhead``). ``None`` (default): calibrate a
            power-of-two cadence once, from a timed measurement, to fit ``max_overhead``, and
            keep it for the run.
        full_every: the first measurement and every this-many-th one after it (log-spaced
            ones included) are full; with ``every_n_steps=None`` so is the last step of a run
            whose length Lightning knows.
        log_spaced: also measure at steps 1, 2, 4, 8, ... below the cadence.
        max_overhead: the measurement time the calibration aims at, as a fraction of the
            training time without it (0.05: a run about 5% slower). ``None``: no warning,
            and the default cadence without calibration.
        params: which parameters' Hessian: ``None`` (every trainable one), a regular
            expression matched with ``re.search`` against parameter names, or names.
        tag_prefix: replaces ``"curvature"`` in every tag, so monitors can run side by side.
        curvature: ``"hessian"`` (default; can be indefinite), ``"ggn"`` (the generalized
            Gauss-Newton JᵀH_ℓJ, positive semi-definite) or ``"fisher"`` (the true Fisher,
            Monte Carlo targets from the model's predictive distribution). GGN and Fisher
            need the model's outputs apart from the loss: ``loss_from_output`` and
            ``output_fn``. The batch sharpness is a Hessian quantity and is left out for them.
        loss_from_output: ``"mse"``, ``"cross_entropy"`` or ``loss(outputs, batch)``: the
            loss on the model's outputs, for ``curvature="ggn"`` or ``"fisher"``.
        output_fn: ``output_fn(module, batch) -> outputs``; default ``module(batch[0])``.
        per_layer: full measurements also log each layer's trace and λmax
            (``<prefix>/layer/<name>/trace``, ``.../lambda_max``): ``True`` for one block per
            module, or a list of regular expressions, one block each; the traces come from
            the whole trace's probes (then plain Hutchinson), at no extra product.
        num_batches: probe batches averaged in each measurement.
        probe: ``"fixed"``: the first ``num_batches`` training batches, copied once, so curves
            are comparable; ``"current"``: the batch about to be trained on.
        probe_dataloader: draw the fixed probe batches from this DataLoader instead.
        loss_fn: ``loss_fn(module, batch) -> loss``; by default ``training_step(batch,
            batch_idx)`` with the probe's training ``batch_idx``, on batches it returned a
            loss for, its ``self.log`` muted and its side effects undone.
        k: how many top eigenvalues a full measurement logs.
        num_iters: the most Lanczos steps per run; ``None`` allows ``30 + 10·k``.
        tol: relative accuracy of the eigenvalues.
        trace: full measurements also estimate the trace.
        num_probes: Hutchinson probes per trace estimate.
        spectral_density: full measurements also estimate the spectral density (SLQ).
        lambda_min: full measurements also estimate the most negative eigenvalue.
        critical_sharpness: every measurement also logs 2/t_c, t_c the smallest step along
            the last update (per unit η) that raises the probe loss, by ~6 forward passes.
        mode: ``"train"`` (default): the objective the optimizer descends (batch statistics,
            dropout off unless ``dropout=True``); ``"eval"``: the eval-mode loss.
        dropout: keep dropout on in ``mode="train"`` (with a fixed mask per probe batch).
        warm_start: start each Lanczos run from the previous Ritz vectors.
        alert_rules: the alert rules, an :class:`~lightning_curvature.AlertRules` (default
            ``AlertRules()``): sharpness spikes, the edge of stability, and the early
            warning's predicted edge and trend.
        triggers: when to measure between scheduled steps, a
            :class:`~lightning_curvature.Triggers` (default ``Triggers()``): the predicted
            ratio crossing the edge, η changing, the loss jumping, the trend, the risk.
        on_alert: called with each :class:`~lightning_curvature.monitor.alerts.Alert`.
        stop_on_alert: stop training at the first alert (changes training).
        lr_factor_on_alert: multiply every learning rate by this at each alert (changes
            training).
        on_error: ``"warn"``: a failed measurement warns once, is skipped, and training goes
            on; ``"raise"``: it raises.
        max_failures: failures in a row after which the monitor switches itself off.
        seed: seeds the estimators' random vectors.
        memory_budget_mb: the estimators' vectors' memory per rank (products' own aside):
            Krylov bases are capped to fit, or the monitor refuses at the start of training.

    Raises:
        ValueError: at construction, for any argument outside its allowed values.

    Example::

        from pytorch_lightning import Trainer
        from lightning_curvature import CurvatureMonitor

        trainer = Trainer(max_epochs=10, callbacks=[CurvatureMonitor()])
        trainer.fit(model, datamodule)
        # tensorboard --logdir lightning_logs
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        full_every: int = 8,
        log_spaced: bool = True,
        max_overhead: float | None = 0.05,
        params: str | Iterable[str] | None = None,
        tag_prefix: str = TAG_PREFIX,
        curvature: Curvature = "hessian",
        loss_from_output: str | Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
        output_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        per_layer: bool | list[str] = False,
        num_batches: int = 1,
        probe: ProbeKind = "fixed",
        probe_dataloader: DataLoader | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        k: int = 5,
        num_iters: int | None = None,
        tol: float = 1e-3,
        trace: bool = True,
        num_probes: int = 10,
        spectral_density: bool = False,
        lambda_min: bool = False,
        critical_sharpness: bool = False,
        mode: Mode = "train",
        dropout: bool = False,
        warm_start: bool = True,
        alert_rules: AlertRules | None = None,
        triggers: Triggers | None = None,
        on_alert: Callable[[Alert], None] | None = None,
        stop_on_alert: bool = False,
        lr_factor_on_alert: float | None = None,
        on_error: OnError = "warn",
        max_failures: int = 3,
        seed: int = 0,
        memory_budget_mb: float | None = None,
    ) -> None:
        super().__init__()
        check_arguments(
            probe=probe,
            mode=mode,
            curvature=curvature,
            loss_from_output=loss_from_output,
            output_fn=output_fn,
            per_layer=per_layer,
            probe_dataloader=probe_dataloader,
            loss_fn=loss_fn,
            on_alert=on_alert,
            tag_prefix=tag_prefix,
            flags={"dropout": dropout, "stop_on_alert": stop_on_alert},
        )
        self.params = check_params(params)
        self.tag_prefix = tag_prefix
        self.settings = measure_settings(
            k=k,
            num_iters=num_iters,
            tol=tol,
            trace=trace,
            num_probes=num_probes,
            spectral_density=spectral_density,
            lambda_min=lambda_min,
            seed=seed,
            critical_sharpness=critical_sharpness,
            memory_budget_mb=memory_budget_mb,
            warm_start=warm_start,
        )
        self.schedule = MeasurementSchedule(
            every_n_steps=every_n_steps,
            log_spaced=log_spaced,
            full_every=full_every,
            max_overhead=max_overhead,
        )
        self.logbook = Logbook(tag_prefix, alert_rules, triggers, on_alert, lr_factor_on_alert)
        self._loss_reader = facts.LossReader()
        self._owner: tuple[Any, int] | None = None  # (optimizer, group) of the parameters
        self.probes = ProbeSet(probe, check_int("num_batches", num_batches, 1), probe_dataloader)
        self.failures = FailurePolicy(on_error, max_failures, rank_zero_warn)
        self.stop_on_alert = bool(stop_on_alert)
        # What is measured, fixed for the run (the optimizers come at each measurement).
        self.objective = Objective(
            loss_fn=loss_fn,
            mode=mode,
            dropout=bool(dropout),
            curvature=curvature,
            output_fn=output_fn,
            loss_from_output=loss_from_output,
            per_layer=per_layer if isinstance(per_layer, bool) else list(per_layer),
        )
        # State that survives checkpoint and resume (besides the parts').
        self.disabled_reason: str | None = None
        self._hvp_method = "auto"  # becomes "finite_difference" after a failed check
        self._measurer: Measurer | None = None  # per-run scratch
        self._facts: facts.StepFacts | None = None
        self._state_key = self._generate_state_key(
            tag_prefix=tag_prefix, params=self.params, curvature=self.objective.curvature
        )

    @property
    def history(self) -> list[dict[str, float]]:
        """One row per measurement: the step and the scalars logged there."""
        return self.logbook.history

    @property
    def alerts(self) -> AlertTracker:
        """The run's alerts (``alerts.fired``), measured and early."""
        return self.logbook.alerts

    @property
    def state_key(self) -> str:
        return self._state_key  # Lightning reads it at every hook of every step

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.disabled_reason = None  # a reused instance starts afresh (resume reloads it)
        self._measurer = None
        reason = facts.cannot_measure(trainer, pl_module, self.objective)
        if reason is not None:
            self._disable(reason)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:
            self._disable("fast_dev_run is a smoke test: CurvatureMonitor stays off")
            return
        # Built here: shards exist after configure_model, a resumed fallback is loaded.
        if self.disabled_reason is None:  # a memory bound is kept or refused up front
            self._measurer, reason = measurer_for(
                pl_module, self.params, self.objective, self.settings, self._hvp_method
            )
            if reason is not None:
                self._disable(reason)
        self.probes.draw(pl_module.device)
        self.schedule.start(trainer.global_step, facts.planned_steps(trainer))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The parameters are about to move on: the last measurement no longer describes them.
        if self.logbook.publisher.holds_metrics:
            self.logbook.publisher.withdraw(trainer.callback_metrics)
        if self.disabled_reason is not None:
            return
        with self.schedule.clock.monitoring():  # all of the monitor's time is overhead
            step = trainer.global_step  # a Lightning property that costs: read once
            upcoming = self.schedule.upcoming(step + 1)
            self.probes.offer(batch, pl_module.device, upcoming is not None, batch_idx)
            if upcoming is not None and self._measurer is not None:
                self._measurer.before_measured_step(step)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.disabled_reason is not None:  # (sanity checks run no training batches)
            return
        with self.schedule.clock.monitoring(ends_step=True):
            self._step_end(trainer, pl_module, outputs)

    def _step_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> None:
        # A batch that training_step skipped (returned None) is no probe for it either.
        self.probes.confirm(not self.objective.is_training_step or facts.returned_a_loss(outputs))
        step = trainer.global_step  # a Lightning property that costs: read once
        run = self._facts = facts.StepFacts.of(trainer, self._facts)
        signals = self._early_signals(run, step, outputs)
        # The calibrated cadence is the one clock-derived decision: rank 0's holds.
        decision = self.schedule.decide(step, run.agree_cadence, signals.trigger, signals.sparse)
        if decision.skipped:  # far from the edge: its cost pays for triggered ones
            self.logbook.early_warning.saved_one()
        for said, say in ((decision.info, rank_zero_info), (decision.warning, rank_zero_warn)):
            if said:
                say(f"CurvatureMonitor[{self.tag_prefix}]: {said}")
        if decision.tier is None or not self.probes.ready or self._measurer is None:
            return
        try:
            # The failure every rank agrees on is raised inside timed(): the schedule's
            # counters (which decide the next tier) then stay the same on every rank.
            with self.schedule.timed(decision):
                outcome = self._measurer.measure(
                    self.probes.batches(pl_module.device, indexed=self.objective.is_training_step),
                    step,
                    decision.tier,
                    optimizers=trainer.optimizers,
                    lr_schedulers=[config.scheduler for config in trainer.lr_scheduler_configs],
                    distributed=facts.distributed(trainer),
                    agree_on_failure=facts.failure_agreement(trainer),
                )
        except Exception as error:
            reason = self.failures.failed(error)  # warns, or re-raises with on_error="raise"
            if reason is not None:
                self._disable(reason)
            return
        self.failures.succeeded()
        self._after(trainer, outcome)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        said = self.logbook.summary(self.schedule, self.disabled_reason)
        rank_zero_info(f"CurvatureMonitor[{self.tag_prefix}]: {said}")

    def state_dict(self) -> dict[str, Any]:
        measurer = self._measurer
        return {
            **self.logbook.state_dict(),
            "schedule": self.schedule.state_dict(),
            "probe_batches": self.probes.state_dict(),
            "failures_in_a_row": self.failures.failures_in_a_row,
            "disabled_reason": self.disabled_reason,
            "hvp_method": self._hvp_method if measurer is None else measurer.hvp_method,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # .get() defaults: checkpoints from older versions still load.
        self.logbook.load_state_dict(state_dict)
        self.schedule.load_state_dict(state_dict.get("schedule", {}))
        self.probes.load_state_dict(state_dict.get("probe_batches", []))
        self.failures.failures_in_a_row = int(state_dict.get("failures_in_a_row", 0))
        self.disabled_reason = state_dict.get("disabled_reason")
        self._hvp_method = state_dict.get("hvp_method", "auto")

    # ------------------------------------------------------------------ measuring
    def _early_signals(self, run: facts.StepFacts, step: int, outputs: Any) -> Signals:
        """The free signals of this step (η, the loss, the last sharpness): the predicted
        ratio, a trigger, early alerts (raised now) and a loss spike's record."""
        signals = self.logbook.stepped(
            step,
            learning_rate=facts.owned_learning_rate(self._owner),
            loss=self._loss_reader.read(facts.step_loss(outputs)),
            cadence=self.schedule.cadence,
            agree_loss=run.agree_loss,
            log_step=run.is_log_step(step),
            loggers=run.loggers,
            writers=run.writers,
            say=rank_zero_info,
        )
        self._raise_alerts(run.trainer, signals.alerts, run.writers)
        return signals

    def _after(self, trainer: pl.Trainer, outcome: Outcome) -> None:
        self._owner = outcome.owner
        for key, text in outcome.messages():
            self.failures.warn_once(key, f"CurvatureMonitor: {text}")
        writers = facts.tensorboard_writers(trainer)
        alerts = self.logbook.measured(
            outcome,
            trainer.global_step,
            overhead=self.schedule.overhead,
            loggers=trainer.loggers,
            callback_metrics=trainer.callback_metrics,
            writers=writers,
        )
        self._raise_alerts(trainer, alerts, writers)

    def _raise_alerts(self, trainer: pl.Trainer, alerts: list[Alert], writers: list[Any]) -> None:
        """Announce ``alerts`` and act on them at the step they were raised (every rank has
        the same: they come from agreed numbers, so no collective is needed)."""
        self.logbook.respond(alerts, writers, rank_zero_warn, trainer.optimizers)
        if alerts and self.stop_on_alert:
            trainer.should_stop = True

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        rank_zero_warn(f"CurvatureMonitor is off: {reason}")
