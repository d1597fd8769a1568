"""CurvatureMonitor: a thin adapter from Lightning's hooks onto the monitor's parts.

When to measure is :mod:`~lightning_curvature.monitor.schedule`'s business, on what
:mod:`~lightning_curvature.monitor.probes`', how :mod:`~lightning_curvature.measure.module`'s
and where the numbers go :mod:`~lightning_curvature.monitor.publish`'s. This module reads the
trainer, keeps the run's state for checkpoints, and handles failures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_curvature._checks import check_int, check_open_unit
from lightning_curvature._lightning import (
    Callback,
    TensorBoardLogger,
    pl,
    rank_zero_info,
    rank_zero_warn,
)
from lightning_curvature.measure.module import (
    Context,
    RankFailure,
    flat_parameters,
    measure_module,
)
from lightning_curvature.measure.objective import Mode, training_step_loss
from lightning_curvature.measure.tags import TAG_PREFIX
from lightning_curvature.measure.tiers import MeasureSettings, WarmStart
from lightning_curvature.monitor.alerts import Alert, AlertRules, AlertTracker
from lightning_curvature.monitor.arguments import check_arguments
from lightning_curvature.monitor.failures import agree_on_failure, describe, fix_for
from lightning_curvature.monitor.probes import ProbeKind, ProbeSet, check_params, select_parameters
from lightning_curvature.monitor.publish import RATIO_TRUSTED, Publisher, run_summary
from lightning_curvature.monitor.schedule import MeasurementSchedule
from lightning_curvature.operators.names import Curvature

OnError = Literal["warn", "raise"]
# Strategies that shard parameters: a rank does not hold the whole model, so the flat
# Hessian-vector product of one rank is not defined.
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


class CurvatureMonitor(Callback):
    r"""Log the Hessian's sharpness, top eigenvalues and trace, and sharpness·lr, while training.

    At every scheduled step a cheap *track* measurement logs the sharpness that matters for
    the optimizer (λmax, and λmax(P⁻¹H) for Adam, RMSprop and Adagrad), λmax·η against the
    optimizer's stability threshold, the learning rate, and the sharpness along the last
    update and of each probe batch's gradient. Every ``full_every`` measurements a *full*
    one adds the top ``k``, the trace, and optionally λmin and the spectral density. Scalars
    go to every logger and ``trainer.callback_metrics``; TensorBoard also gets a dashboard.
    Alerts fire when sharpness jumps or sits at the optimizer's edge of stability.

    Measuring never changes training: parameters, gradients, optimizer state, BatchNorm
    statistics, RNG streams, modes and the module's own Python state are exactly as they would
    be without it (unless you opt into ``stop_on_alert`` or ``lr_factor_on_alert``).

    Every argument is keyword-only, as in Lightning's newer callbacks.

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
            module, or a list of regular expressions, one block each. The per-layer traces
            come from the whole trace's probes (no extra products; the whole trace is then
            plain Hutchinson); the per-layer λmax from one batched Lanczos over all layers.
        num_batches: probe batches averaged in each measurement.
        probe: ``"fixed"``: the first ``num_batches`` training batches, copied once, so curves
            are comparable; ``"current"``: the batch about to be trained on.
        probe_dataloader: draw the fixed probe batches from this DataLoader instead.
        loss_fn: ``loss_fn(module, batch) -> loss``. By default the module's own
            ``training_step(batch, batch_idx)`` is called, ``batch_idx`` the index the probe
            batch had in training (0, 1, ... for a ``probe_dataloader``'s), and probe batches
            are only batches it returned a loss for (its ``self.log`` muted and its side
            effects on the module, optimizers, schedulers and Python/numpy RNG undone
            afterwards); with ``loss_fn`` given, ``training_step`` is never called.
        k: how many top eigenvalues a full measurement logs.
        num_iters: the most Lanczos steps per run; ``None`` allows ``30 + 10·k``.
        tol: relative accuracy of the eigenvalues.
        trace: full measurements also estimate the trace.
        num_probes: Hutchinson probes per trace estimate.
        spectral_density: full measurements also estimate the spectral density (SLQ).
        lambda_min: full measurements also estimate the most negative eigenvalue.
        mode: ``"train"`` (default) measures the objective the optimizer descends:
            normalization layers use batch statistics (running statistics untouched) and
            dropout is off unless ``dropout=True``; ``"eval"`` measures the eval-mode loss.
        dropout: keep dropout on in ``mode="train"`` (with a fixed mask per probe batch).
        warm_start: start each Lanczos run from the previous Ritz vectors.
        alert_rules: the spike and edge-of-stability rules, an
            :class:`~lightning_curvature.AlertRules` (default ``AlertRules()``: spike factor
            2 over a window of 3, quiet below a stability ratio of 0.1; edge at a ratio of
            0.9 for 3 measurements).
        on_alert: called with each :class:`~lightning_curvature.monitor.alerts.Alert`.
        stop_on_alert: stop training at the first alert (changes training).
        lr_factor_on_alert: multiply every learning rate by this at each alert (changes
            training).
        on_error: ``"warn"``: a failed measurement warns once, is skipped, and training goes
            on; ``"raise"``: it raises.
        max_failures: failures in a row after which the monitor switches itself off.
        seed: seeds the estimators' random vectors.

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
        mode: Mode = "train",
        dropout: bool = False,
        warm_start: bool = True,
        alert_rules: AlertRules | None = None,
        on_alert: Callable[[Alert], None] | None = None,
        stop_on_alert: bool = False,
        lr_factor_on_alert: float | None = None,
        on_error: OnError = "warn",
        max_failures: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        num_batches = check_int("num_batches", num_batches, 1)
        k = check_int("k", k, 1)
        if num_iters is not None:
            num_iters = check_int("num_iters", num_iters, k)
        check_arguments(
            probe=probe,
            mode=mode,
            curvature=curvature,
            loss_from_output=loss_from_output,
            output_fn=output_fn,
            per_layer=per_layer,
            on_error=on_error,
            probe_dataloader=probe_dataloader,
            loss_fn=loss_fn,
            on_alert=on_alert,
            tag_prefix=tag_prefix,
            flags={
                "log_spaced": log_spaced,
                "trace": trace,
                "spectral_density": spectral_density,
                "lambda_min": lambda_min,
                "dropout": dropout,
                "warm_start": warm_start,
                "stop_on_alert": stop_on_alert,
            },
        )
        if lr_factor_on_alert is not None:
            lr_factor_on_alert = check_open_unit("lr_factor_on_alert", lr_factor_on_alert)
        self.params = check_params(params)
        self.tag_prefix = tag_prefix
        self.curvature = curvature
        self.loss_from_output = loss_from_output
        self.output_fn = output_fn
        self.per_layer = per_layer if isinstance(per_layer, bool) else list(per_layer)
        self.loss_fn = loss_fn
        self.mode: Mode = mode
        self.dropout = bool(dropout)
        self.warm_start = bool(warm_start)
        self.on_alert = on_alert
        self.stop_on_alert = bool(stop_on_alert)
        self.lr_factor_on_alert = lr_factor_on_alert
        self.on_error = on_error
        self.max_failures = check_int("max_failures", max_failures, 1)
        self.settings = MeasureSettings(
            k=k,
            num_iters=num_iters,
            tol=check_open_unit("tol", tol),
            trace=bool(trace),
            num_probes=check_int("num_probes", num_probes, 2),
            density=bool(spectral_density),
            lambda_min=bool(lambda_min),
            seed=check_int("seed", seed, 0),
        )
        self.schedule = MeasurementSchedule(
            every_n_steps=every_n_steps,
            log_spaced=bool(log_spaced),
            full_every=full_every,
            max_overhead=max_overhead,
        )
        if alert_rules is not None and not isinstance(alert_rules, AlertRules):
            raise ValueError(
                f"alert_rules must be an AlertRules or None, got {type(alert_rules).__name__}"
            )
        self.alerts = AlertTracker(alert_rules or AlertRules())
        self.probes = ProbeSet(probe, num_batches, probe_dataloader)
        self.publisher = Publisher(tag_prefix)
        # State that survives checkpoint and resume.
        self.history: list[dict[str, float]] = []
        self.failures_in_a_row = 0
        self.disabled_reason: str | None = None
        self._hvp_method = "auto"  # becomes "finite_difference" after a failed check
        # Per-run scratch.
        self._param_names: list[str] = []
        self._warm: WarmStart | None = None
        self._previous_params: tuple[int, torch.Tensor] | None = None
        self._checked = False
        self._warned: set[str] = set()
        self._ratio_trusted = True

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            tag_prefix=self.tag_prefix, params=self.params, curvature=self.curvature
        )

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.disabled_reason = None  # a reused instance starts afresh (resume reloads it)
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in _SHARDED_STRATEGIES):
            self._disable(
                f"{strategy} shards the parameters across ranks, and CurvatureMonitor needs "
                "the whole model on every rank: it is switched off for this run (use DDP)"
            )
            return
        if self.loss_fn is None and not pl_module.automatic_optimization:
            self._disable(
                "the module uses manual optimization, so its training_step is not a loss "
                "function: pass CurvatureMonitor(loss_fn=...) to measure it"
            )
            return
        if self.curvature != "hessian" and self.output_fn is None and not _has_forward(pl_module):
            self._disable(
                f"curvature={self.curvature!r} needs the model's outputs, and "
                f"{type(pl_module).__name__} defines no forward: define forward, or pass "
                "CurvatureMonitor(output_fn=...), output_fn(module, batch) -> outputs"
            )
            return
        self._param_names = select_parameters(pl_module, self.params)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:
            self._disable("fast_dev_run is a smoke test: CurvatureMonitor stays off")
            return
        self.probes.draw(pl_module.device)
        self.schedule.start(trainer.global_step, _planned_steps(trainer))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The parameters are about to move on: the last measurement no longer describes them.
        self.publisher.withdraw(trainer.callback_metrics)
        if self.disabled_reason is not None:
            return
        upcoming = self.schedule.upcoming(trainer.global_step + 1)
        self.probes.offer(batch, pl_module.device, upcoming is not None, batch_idx)
        if upcoming is not None and self._param_names:
            # θ_{s−1}, for the sharpness along the update that produces step s.
            flat = flat_parameters(pl_module, self._param_names)
            self._previous_params = (trainer.global_step, flat)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.disabled_reason is not None or trainer.sanity_checking:
            return
        # A batch that training_step skipped (returned None) is no probe for it either.
        self.probes.confirm(not self._measures_training_step or _returned_a_loss(outputs))
        step = trainer.global_step
        # The calibrated cadence is the one clock-derived decision: rank 0's holds.
        decision = self.schedule.decide(step, agree=_rank_zero_value(trainer))
        if decision.info:
            rank_zero_info(f"CurvatureMonitor[{self.tag_prefix}]: {decision.info}")
        if decision.warning:
            rank_zero_warn(f"CurvatureMonitor[{self.tag_prefix}]: {decision.warning}")
        if decision.tier is None or not self.probes.ready:
            return
        try:
            with self.schedule.timed(decision):
                outcome = self._measure_on_every_rank(trainer, pl_module, decision)
        except Exception as error:
            self._failed(error)
            return
        self.failures_in_a_row = 0
        self._after(trainer, outcome)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        summary = run_summary(self.history, self.tag_prefix, self.schedule, self.alerts)
        if self.disabled_reason is not None:
            summary += f" The monitor is off: {self.disabled_reason}."
        rank_zero_info(f"CurvatureMonitor[{self.tag_prefix}]: {summary}")

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "alerts": self.alerts.state_dict(),
            "schedule": self.schedule.state_dict(),
            "failures_in_a_row": self.failures_in_a_row,
            "disabled_reason": self.disabled_reason,
            "hvp_method": self._hvp_method,
            "probe_batches": self.probes.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # .get() defaults: checkpoints from older versions still load.
        self.history = list(state_dict.get("history", []))
        self.alerts.load_state_dict(state_dict.get("alerts", {}))
        self.schedule.load_state_dict(state_dict.get("schedule", {}))
        self.failures_in_a_row = int(state_dict.get("failures_in_a_row", 0))
        self.disabled_reason = state_dict.get("disabled_reason")
        self._hvp_method = state_dict.get("hvp_method", "auto")
        self.probes.load_state_dict(state_dict.get("probe_batches", []))

    # ------------------------------------------------------------------ measuring
    def _measure_on_every_rank(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, decision: Any
    ) -> Any:
        """The measurement's outcome, or the failure every rank agrees on, raised inside
        ``schedule.timed``: the schedule's counters (which decide the next tier) then stay
        the same on every rank."""
        step = trainer.global_step
        error: BaseException | None = None
        try:
            outcome = measure_module(
                self._context(trainer, pl_module),
                self.probes.batches(pl_module.device, indexed=self._measures_training_step),
                step,
                decision.tier,
                self.settings,
                warm=self._warm if self.warm_start else None,
                update=self._update(pl_module, step),
                hvp_method=self._hvp_method,
                verify=not self._checked or decision.full,
            )
        except Exception as caught:
            error = caught
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            error = agree_on_failure(
                error, trainer.strategy, trainer.world_size, trainer.global_rank
            )
        if error is not None:
            raise error
        return outcome

    @property
    def _measures_training_step(self) -> bool:
        """Whether the loss is ``training_step``'s, called with each probe's own batch_idx
        (a ``loss_fn``, or the GGN's and Fisher's output-space loss, takes the batch alone)."""
        return self.loss_fn is None and self.curvature == "hessian"

    def _context(self, trainer: pl.Trainer, module: pl.LightningModule) -> Context:
        return Context(
            module=module,
            loss_fn=self.loss_fn or training_step_loss,
            param_names=self._param_names,
            optimizers=trainer.optimizers,
            lr_schedulers=[config.scheduler for config in trainer.lr_scheduler_configs],
            mode=self.mode,
            dropout=self.dropout,
            distributed=trainer.world_size > 1 and torch.distributed.is_initialized(),
            curvature=self.curvature,
            output_fn=self.output_fn,
            loss_from_output=self.loss_from_output,
            per_layer=self.per_layer,
        )

    def _update(self, module: nn.Module, step: int) -> torch.Tensor | None:
        """θ_s − θ_{s−1}, when θ_{s−1} was captured just before this step's update."""
        previous, self._previous_params = self._previous_params, None
        if previous is None or previous[0] >= step:
            return None
        return flat_parameters(module, self._param_names) - previous[1]

    def _after(self, trainer: pl.Trainer, outcome: Any) -> None:
        record = outcome.record
        self._warm = outcome.warm
        self._checked = True
        self._ratio_trusted = outcome.ratio_trusted
        if outcome.fallback_reason and self._hvp_method != "finite_difference":
            self._hvp_method = "finite_difference"
            self._warn_once("fallback", f"CurvatureMonitor: {outcome.fallback_reason}")
        for note in outcome.notes:
            self._warn_once(note, f"CurvatureMonitor: {note}")
        if not record.converged:
            self._warn_once(
                "not converged",
                f"CurvatureMonitor: the sharpness did not converge at step {record.step} "
                f"within {record.num_matvecs} products, so it is not logged there (raise "
                "num_iters, or loosen tol).",
            )
        writers = (
            [log.experiment for log in trainer.loggers if isinstance(log, TensorBoardLogger)]
            if trainer.is_global_zero
            else []
        )
        metrics = self.publisher.publish(
            record,
            trainer.global_step,
            loggers=trainer.loggers,
            callback_metrics=trainer.callback_metrics,
            writers=writers,
            extra={"overhead": self.schedule.overhead},
        )
        self.history.append(
            {"step": float(record.step), **metrics, RATIO_TRUSTED: float(self._ratio_trusted)}
        )
        ratio = record.stability_ratio if self._ratio_trusted else None
        alerts = self.alerts.update(record.step, record.lambda_max, ratio, record.converged)
        # Every rank computed the same numbers; agreeing anyway keeps the ranks in step.
        fired = trainer.strategy.reduce_boolean_decision(bool(alerts), all=False)
        self.publisher.announce(alerts, writers, rank_zero_warn, self.on_alert)
        if fired and self.stop_on_alert:
            trainer.should_stop = True
        if fired and self.lr_factor_on_alert is not None:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = group["lr"] * self.lr_factor_on_alert

    # ------------------------------------------------------------------ failures
    def _failed(self, error: BaseException) -> None:
        if self.on_error == "raise":
            raise error
        if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._warm = None
        self.failures_in_a_row += 1
        cause = type(error.__cause__ if isinstance(error, RankFailure) else error).__name__
        self._warn_once(
            cause,
            "CurvatureMonitor: a measurement failed and was skipped; training goes on. "
            f"Cause: {describe(error)}. {fix_for(error)}",
        )
        if self.failures_in_a_row >= self.max_failures:
            self._disable(f"{self.failures_in_a_row} measurements in a row failed (last: {cause})")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        rank_zero_warn(f"CurvatureMonitor is off: {reason}")


def _planned_steps(trainer: pl.Trainer) -> int | None:
    """The global step the run will end at, when Lightning knows it (``max_steps``, or
    ``max_epochs`` over a sized loader); None for an open-ended run."""
    try:
        planned = trainer.estimated_stepping_batches
    except Exception:  # a loader without len, or a config Lightning cannot estimate
        return None
    return int(planned) if math.isfinite(planned) and planned >= 1 else None


def _returned_a_loss(outputs: Any) -> bool:
    """Whether ``training_step`` returned a loss: Lightning hands ``{}`` (or None) to
    ``on_train_batch_end`` when it returned None, and skipped the batch."""
    return outputs is not None and not (isinstance(outputs, Mapping) and not outputs)


def _has_forward(module: nn.Module) -> bool:
    """Whether the module's class (or a mixin) defines ``forward``; LightningModule's own
    only forwards to ``nn.Module``'s, which raises NotImplementedError."""
    framework = set(pl.LightningModule.__mro__)
    return any("forward" in vars(cls) for cls in type(module).__mro__ if cls not in framework)


def _rank_zero_value(trainer: pl.Trainer) -> Callable[[int], int]:
    def agree(value: int) -> int:
        return int(trainer.strategy.broadcast(value, src=0))

    return agree
