"""CurvatureMonitor: measure the loss curvature while a Lightning Trainer trains.

When to measure, on what, and where the results go. The numbers come from
:mod:`lightning_curvature.measurement` (one HVP operator, the estimators); this module
adds the schedule, the probe batches, the safety around the training run, the loggers
and the alerts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_curvature._lightning import Callback, pl, rank_zero_warn
from lightning_curvature.alerts import Alert, AlertRules, AlertTracker
from lightning_curvature.batches import detached_copy, move_batch
from lightning_curvature.measurement import Measurement, MeasureSettings, measure
from lightning_curvature.monitor.objective import (
    Mode,
    measurement_mode,
    muted_logging,
    training_step_loss,
)
from lightning_curvature.operators import AllReduceOperator, HessianOperator
from lightning_curvature.stability import (
    first_moment_settled,
    preconditioner_diagonal,
    stability_rule,
)
from lightning_curvature.tensorboard import (
    tensorboard_writers,
    write_alert,
    write_layout,
    write_measurement,
)

ProbeKind = Literal["fixed", "current"]
OnError = Literal["warn", "raise"]

# Strategies that shard parameters: a rank does not hold the whole model, so the flat
# Hessian-vector product of one rank is not defined.
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


class CurvatureMonitor(Callback):
    r"""Log the Hessian's top eigenvalues, trace and sharpness·lr while training.

    Every ``every_n_steps`` optimizer steps (and at steps 1, 2, 4, 8, ... before that when
    ``log_spaced=True``), the monitor takes the probe batches, builds the Hessian of their
    mean loss over the trainable parameters, and runs Lanczos (λmax and the top ``k``),
    Hutchinson (the trace) and, for adaptive optimizers, Lanczos on the preconditioned
    Hessian :math:`P^{-1/2} H P^{-1/2}`. It logs ``curvature/*`` scalars to every logger
    and into ``trainer.callback_metrics``, adds a dashboard to TensorBoard, and raises
    alerts when sharpness spikes or sharpness·lr sits at the optimizer's stability edge.

    Measuring never changes training: parameters, gradients, optimizer state, BatchNorm
    statistics, RNG streams and train/eval modes are exactly as they would be without it
    (unless you opt into ``stop_on_alert`` or ``lr_factor_on_alert``, which act on training
    by design).

    Args:
        every_n_steps: measure every this many optimizer steps.
        log_spaced: also measure at steps 1, 2, 4, 8, ... below ``every_n_steps``, where
            curvature changes fastest.
        num_batches: probe batches averaged in each measurement.
        probe: ``"fixed"``: the first ``num_batches`` training batches, kept on the device
            and reused, so curves are comparable across steps (capturing them consumes no
            RNG); ``"current"``: the batch just trained on.
        probe_dataloader: a DataLoader to draw the fixed probe batches from instead of the
            training data (drawn once, with the global RNG forked so training is untouched).
        loss_fn: ``loss_fn(module, batch) -> loss``. By default the module's own
            ``training_step(batch, 0)`` is called (with its ``self.log`` calls muted).
        k: how many top eigenvalues to log (``curvature/eigenvalue_1..k``).
        num_iters: the most Lanczos steps per measurement; ``None`` allows ``30 + 10·k``.
            The Lanczos basis holds ``num_iters`` vectors of the parameters' size on the
            device, so lower it for very large models.
        tol: relative accuracy for the eigenvalues.
        trace: also estimate the trace (Hutchinson, ``num_probes`` probes).
        num_probes: Hutchinson probes per trace estimate.
        spectral_density: also estimate the spectral density (SLQ) and draw it in TensorBoard.
        lambda_min: also estimate the most negative eigenvalue.
        mode: ``"eval"`` measures the model in eval mode (BatchNorm running statistics,
            dropout off); ``"train"`` keeps train mode (batch statistics, a fixed dropout
            mask) and still never updates the running statistics.
        warm_start: start each Lanczos run from the previous top eigenvectors.
        max_overhead: the most measurement time as a fraction of the time spent training
            without it (0.05: a run at most 5% slower); a scheduled measurement that would
            exceed it is skipped. The first measurement always runs, so the budget binds
            from the second on. ``None`` disables it.
        alert_window: measurements of history the spike rule compares against.
        spike_threshold: a spike is λmax above the median by this many robust standard
            deviations and to more than twice the median.
        threshold_fraction: the stability alert fires when sharpness·lr is at least this
            fraction of the threshold ...
        threshold_patience: ... for this many measurements in a row.
        on_alert: called with each :class:`~lightning_curvature.alerts.Alert`.
        stop_on_alert: stop training at the first alert (changes training).
        lr_factor_on_alert: multiply every learning rate by this at each alert (changes
            training).
        on_error: ``"warn"``: a failed measurement warns once, is skipped, and training
            goes on; ``"raise"``: it raises.
        max_failures: failures in a row after which the monitor switches itself off.
        seed: seeds the estimators' random vectors.

    Raises:
        ValueError: at construction, for any argument outside its allowed values.

    Example::

        from pytorch_lightning import Trainer
        from lightning_curvature import CurvatureMonitor

        trainer = Trainer(max_epochs=10, callbacks=[CurvatureMonitor(every_n_steps=50)])
        trainer.fit(model, datamodule)
        # tensorboard --logdir lightning_logs
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        log_spaced: bool = True,
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
        mode: Mode = "eval",
        warm_start: bool = True,
        max_overhead: float | None = 0.05,
        alert_window: int = 20,
        spike_threshold: float = 6.0,
        threshold_fraction: float = 0.9,
        threshold_patience: int = 3,
        on_alert: Callable[[Alert], None] | None = None,
        stop_on_alert: bool = False,
        lr_factor_on_alert: float | None = None,
        on_error: OnError = "warn",
        max_failures: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_int("every_n_steps", every_n_steps, 1)
        _check_int("num_batches", num_batches, 1)
        _check_int("k", k, 1)
        if num_iters is not None:
            _check_int("num_iters", num_iters, k)
        _check_int("num_probes", num_probes, 2)
        _check_int("max_failures", max_failures, 1)
        _check_int("seed", seed, 0)
        _check_choice("probe", probe, ("fixed", "current"))
        _check_choice("mode", mode, ("eval", "train"))
        _check_choice("on_error", on_error, ("warn", "raise"))
        if probe_dataloader is not None and probe != "fixed":
            raise ValueError(
                "probe_dataloader needs probe='fixed' (its batches are the fixed "
                f"probe set), got probe={probe!r}"
            )
        if probe_dataloader is not None and not isinstance(probe_dataloader, DataLoader):
            raise ValueError(
                "probe_dataloader must be a torch DataLoader or None, got "
                f"{type(probe_dataloader).__name__}"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError("loss_fn must be callable as loss_fn(module, batch) or None")
        if on_alert is not None and not callable(on_alert):
            raise ValueError("on_alert must be callable as on_alert(alert) or None")
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
        if max_overhead is not None and not (
            isinstance(max_overhead, (int, float)) and 0 < max_overhead <= 1
        ):
            raise ValueError(f"max_overhead must be in (0, 1] or None, got {max_overhead!r}")
        if lr_factor_on_alert is not None and not (
            isinstance(lr_factor_on_alert, (int, float)) and 0 < lr_factor_on_alert < 1
        ):
            raise ValueError(
                f"lr_factor_on_alert must be in (0, 1) or None, got {lr_factor_on_alert!r}"
            )
        self.every_n_steps = every_n_steps
        self.log_spaced = log_spaced
        self.num_batches = num_batches
        self.probe = probe
        self.probe_dataloader = probe_dataloader
        self.loss_fn = loss_fn
        self.mode = mode
        self.warm_start = warm_start
        self.max_overhead = max_overhead
        self.on_alert = on_alert
        self.stop_on_alert = stop_on_alert
        self.lr_factor_on_alert = lr_factor_on_alert
        self.on_error = on_error
        self.max_failures = max_failures
        self.settings = MeasureSettings(
            k=k,
            num_iters=num_iters,
            tol=tol,
            trace=trace,
            num_probes=num_probes,
            density=spectral_density,
            lambda_min=lambda_min,
            seed=seed,
        )
        self.alerts = AlertTracker(
            AlertRules(
                window=alert_window,
                warmup=min(5, alert_window),
                num_mads=spike_threshold,
                threshold_fraction=threshold_fraction,
                patience=threshold_patience,
            )
        )
        # State that survives checkpoint and resume.
        self.history: list[dict[str, float]] = []
        self.last_measured_step = -1
        self.failures_in_a_row = 0
        self.disabled_reason: str | None = None
        self.measure_seconds = 0.0
        self.skipped_for_budget = 0
        self._probe_batches: list[Any] = []
        # Per-run scratch.
        self._train_seconds_before = 0.0
        self._train_started: float | None = None
        self._previous_vectors: torch.Tensor | None = None
        self._layout_written = False
        self._warned: set[str] = set()
        # False while Adam's bias correction inflates the stability ratio (no alerts then).
        self._ratio_trusted = True

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in _SHARDED_STRATEGIES):
            self._disable(
                f"{strategy} shards the parameters across ranks, and CurvatureMonitor needs "
                "the whole model on every rank: it is switched off for this run (use DDP)"
            )
        elif self.loss_fn is None and not pl_module.automatic_optimization:
            self._disable(
                "the module uses manual optimization, so its training_step is not a loss "
                "function: pass CurvatureMonitor(loss_fn=...) to measure it"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_started = time.perf_counter()
        if trainer.fast_dev_run:
            self._disable("fast_dev_run is a smoke test: CurvatureMonitor stays off")
        if self.probe_dataloader is not None and not self._probe_batches:
            self._probe_batches = self._draw_probe_batches(self.probe_dataloader, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.probe == "fixed" and len(self._probe_batches) < self.num_batches:
            # A detached copy of a batch training has already drawn: no RNG is consumed.
            self._probe_batches.append(detached_copy(batch, pl_module.device))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if self.disabled_reason is not None or trainer.sanity_checking or not self._due(step):
            return
        if self.probe == "fixed" and len(self._probe_batches) < self.num_batches:
            return  # still collecting the probe set
        if self._over_budget():
            self.skipped_for_budget += 1
            self.last_measured_step = step
            return
        self.last_measured_step = step
        batches = list(self._probe_batches) if self.probe == "fixed" else [batch]
        started = time.perf_counter()
        try:
            record = self._measure(trainer, pl_module, batches, step)
        except Exception as error:
            self._failed(error)
            return
        finally:
            self.measure_seconds += time.perf_counter() - started
        self.failures_in_a_row = 0
        self._publish(trainer, record)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "alerts": self.alerts.state_dict(),
            "last_measured_step": self.last_measured_step,
            "failures_in_a_row": self.failures_in_a_row,
            "disabled_reason": self.disabled_reason,
            "measure_seconds": self.measure_seconds,
            "train_seconds": self._train_seconds(),
            "skipped_for_budget": self.skipped_for_budget,
            "probe_batches": [move_batch(b, torch.device("cpu")) for b in self._probe_batches],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # .get() defaults: checkpoints from older versions still load.
        self.history = list(state_dict.get("history", []))
        self.alerts.load_state_dict(state_dict.get("alerts", {}))
        self.last_measured_step = int(state_dict.get("last_measured_step", -1))
        self.failures_in_a_row = int(state_dict.get("failures_in_a_row", 0))
        self.disabled_reason = state_dict.get("disabled_reason")
        self.measure_seconds = float(state_dict.get("measure_seconds", 0.0))
        self._train_seconds_before = float(state_dict.get("train_seconds", 0.0))
        self.skipped_for_budget = int(state_dict.get("skipped_for_budget", 0))
        self._probe_batches = list(state_dict.get("probe_batches", []))

    # ------------------------------------------------------------------ scheduling
    def _due(self, step: int) -> bool:
        if step <= 0 or step == self.last_measured_step:
            return False
        if step % self.every_n_steps == 0:
            return True
        return self.log_spaced and step < self.every_n_steps and (step & (step - 1)) == 0

    def _train_seconds(self) -> float:
        running = 0.0 if self._train_started is None else time.perf_counter() - self._train_started
        return self._train_seconds_before + running

    def _overhead(self) -> float:
        """Measurement time over the time training spent without it: the run is this
        fraction slower than it would be without the monitor."""
        training_alone = self._train_seconds() - self.measure_seconds
        return self.measure_seconds / training_alone if training_alone > 0 else math.inf

    def _over_budget(self) -> bool:
        if self.max_overhead is None or not self.history:
            return False
        return self._overhead() > self.max_overhead

    # ------------------------------------------------------------------ measuring
    def _measure(
        self, trainer: pl.Trainer, module: pl.LightningModule, batches: list, step: int
    ) -> Measurement:
        batches = [move_batch(b, module.device) for b in batches]
        loss_fn = self.loss_fn or training_step_loss
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        with measurement_mode(module, self.mode), muted_logging(module):
            op: Any = HessianOperator(module, loss_fn, batches)
            params = op.params
            if trainer.world_size > 1 and torch.distributed.is_initialized():
                op = AllReduceOperator(op)
            try:
                rule = stability_rule(optimizer) if optimizer is not None else None
                self._ratio_trusted = optimizer is None or first_moment_settled(optimizer)
                if rule is not None and not rule.known and "unknown optimizer" not in self._warned:
                    self._warned.add("unknown optimizer")
                    rank_zero_warn(f"CurvatureMonitor: {rule.note}")
                preconditioner = None
                if rule is not None and rule.preconditioned:
                    preconditioner = preconditioner_diagonal(optimizer, params)
                init = self._previous_vectors if self.warm_start else None
                if init is not None and init.shape[0] != op.dim:
                    init = None
                record, vectors = measure(
                    op, step, self.settings, rule=rule, preconditioner=preconditioner, init=init
                )
            finally:
                op.release()
            error = getattr(op, "last_error", None)
            if error is not None:
                raise error
        self._previous_vectors = vectors
        return record

    def _draw_probe_batches(self, loader: DataLoader, module: nn.Module) -> list[Any]:
        batches = []
        with torch.random.fork_rng(devices=[]):  # a shuffling loader must not move our RNG
            for batch in loader:
                batches.append(detached_copy(batch, module.device))
                if len(batches) == self.num_batches:
                    break
        if not batches:
            raise ValueError("probe_dataloader yielded no batches")
        return batches

    # ------------------------------------------------------------------ results
    def _publish(self, trainer: pl.Trainer, record: Measurement) -> None:
        metrics = record.scalars()
        overhead = self._overhead()
        if math.isfinite(overhead):
            metrics["curvature/overhead"] = overhead
        self.history.append({"step": float(record.step), **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        writers = tensorboard_writers(trainer.loggers) if trainer.is_global_zero else []
        for writer in writers:
            if not self._layout_written:
                write_layout(writer)
            write_measurement(writer, record, trainer.global_step)
        self._layout_written = self._layout_written or bool(writers)

        ratio = record.stability_ratio if self._ratio_trusted else None
        alerts = self.alerts.update(record.step, record.lambda_max, ratio, record.converged)
        # Every rank computed the same numbers; agreeing anyway keeps the ranks in step
        # should they ever differ.
        fired = trainer.strategy.reduce_boolean_decision(bool(alerts), all=False)
        for alert in alerts:
            rank_zero_warn(f"CurvatureMonitor: {alert.message}")
            for writer in writers:
                write_alert(writer, alert)
            if self.on_alert is not None:
                self.on_alert(alert)
        if fired and self.stop_on_alert:
            trainer.should_stop = True
        if fired and self.lr_factor_on_alert is not None:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = group["lr"] * self.lr_factor_on_alert

    def _failed(self, error: BaseException) -> None:
        if self.on_error == "raise":
            raise error
        if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._previous_vectors = None
        self.failures_in_a_row += 1
        cause = type(error).__name__
        if cause not in self._warned:
            self._warned.add(cause)
            rank_zero_warn(
                f"CurvatureMonitor: a measurement failed and was skipped; training goes on. "
                f"Cause: {cause}: {error}. {_fix_for(error)}"
            )
        if self.failures_in_a_row >= self.max_failures:
            self._disable(f"{self.failures_in_a_row} measurements in a row failed (last: {cause})")

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        rank_zero_warn(f"CurvatureMonitor is off: {reason}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _fix_for(error: BaseException) -> str:
    text = str(error)
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in text:
        return "Fix: use fewer or smaller probe batches (num_batches, probe_dataloader)."
    if isinstance(error, FloatingPointError):
        return (
            "Fix: the loss or its curvature is not finite on the probe batches; check the "
            "learning rate, or pass a probe_dataloader with clean data."
        )
    if "derivative for" in text and "not implemented" in text:
        return (
            "Fix: an op in the model has no double backward; replace it, or restrict the "
            "Hessian to parameters that avoid it."
        )
    return "Fix: pass on_error='raise' to see the full traceback."
