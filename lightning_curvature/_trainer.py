"""What the callback reads off a Lightning ``Trainer`` and module: facts, not decisions.

Kept apart from :mod:`~lightning_curvature.callback` so the adapter reads as hooks only; the
monitor's parts below it never see a trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_curvature._lightning import TensorBoardLogger, pl
from lightning_curvature.monitor.failures import agree_on_failure

# Strategies that shard parameters. Under ModelParallelStrategy with fully_shard (FSDP2) each
# rank measures its shards (operators/sharded.py); the others keep their shards in forms
# this package does not read, and the monitor switches itself off there, saying so.
SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
MEASURED_SHARDED_STRATEGY = "ModelParallelStrategy"


def sharded_strategy(trainer: pl.Trainer) -> str | None:
    """The strategy's class name when it shards the parameters, else None."""
    name = type(trainer.strategy).__name__
    return name if any(sharded in name for sharded in SHARDED_STRATEGIES) else None


def planned_steps(trainer: pl.Trainer) -> int | None:
    """The global step the run will end at, when Lightning knows it (``max_steps``, or
    ``max_epochs`` over a sized loader); None for an open-ended run."""
    try:
        planned = trainer.estimated_stepping_batches
    except Exception:  # a loader without len, or a config Lightning cannot estimate
        return None
    return int(planned) if math.isfinite(planned) and planned >= 1 else None


def returned_a_loss(outputs: Any) -> bool:
    """Whether ``training_step`` returned a loss: Lightning hands ``{}`` (or None) to
    ``on_train_batch_end`` when it returned None, and skipped the batch."""
    return outputs is not None and not (isinstance(outputs, Mapping) and not outputs)


def has_forward(module: nn.Module) -> bool:
    """Whether the module's class (or a mixin) defines ``forward``; LightningModule's own
    only forwards to ``nn.Module``'s, which raises NotImplementedError."""
    framework = set(pl.LightningModule.__mro__)
    return any("forward" in vars(cls) for cls in type(module).__mro__ if cls not in framework)


def distributed(trainer: pl.Trainer) -> bool:
    """Whether several processes train together (collectives are needed and safe)."""
    return trainer.world_size > 1 and torch.distributed.is_initialized()


def rank_zero_value(trainer: pl.Trainer) -> Callable[[int], int]:
    """``agree(value)``: rank 0's value, on every rank."""

    def agree(value: int) -> int:
        return int(trainer.strategy.broadcast(value, src=0))

    return agree


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger, on rank zero (empty elsewhere)."""
    if not trainer.is_global_zero:
        return []
    return [log.experiment for log in trainer.loggers if isinstance(log, TensorBoardLogger)]


class StepFacts:
    """What the per-step hooks read off a trainer, read once per trainer: the TensorBoard
    writers, the loggers and their period, and the collectives. None of it changes within a
    fit, and Lightning's properties cost microseconds each, which on a small model's
    millisecond step add up to a few percent of the run (benchmarks/RESULTS.md, "The
    monitor's per-step work")."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.writers = tensorboard_writers(trainer)
        self.loggers = trainer.loggers
        self.log_every_n_steps = int(trainer.log_every_n_steps)  # 0: never
        self.agree_loss = max_over_ranks(trainer)
        self.agree_cadence = rank_zero_value(trainer)

    @classmethod
    def of(cls, trainer: pl.Trainer, cached: StepFacts | None) -> StepFacts:
        """``cached`` while it belongs to ``trainer``, else read afresh."""
        return cached if cached is not None and cached.trainer is trainer else cls(trainer)

    def is_log_step(self, step: int) -> bool:
        return self.log_every_n_steps > 0 and step % self.log_every_n_steps == 0


def cannot_measure(trainer: pl.Trainer, module: pl.LightningModule, objective: Any) -> str | None:
    """Why this run cannot be measured, in words with the fix; None when it can."""
    curvature, loss_fn, output_fn = objective.curvature, objective.loss_fn, objective.output_fn
    strategy = sharded_strategy(trainer)
    if strategy is not None and strategy != MEASURED_SHARDED_STRATEGY:
        return (
            f"{strategy} shards the parameters in a form CurvatureMonitor does not read: it "
            "measures sharded models under ModelParallelStrategy with fully_shard (FSDP2) "
            "applied in configure_model, or whole ones under DDP; it is switched off for "
            "this run"
        )
    if strategy is not None and (curvature != "hessian" or objective.per_layer):
        return (
            f"under {strategy} CurvatureMonitor measures the whole Hessian only, by finite "
            "differences on each rank's shards: pass curvature='hessian' and per_layer=False"
        )
    if loss_fn is None and not module.automatic_optimization:
        return (
            "the module uses manual optimization, so its training_step is not a loss "
            "function: pass CurvatureMonitor(loss_fn=...) to measure it"
        )
    if curvature != "hessian" and output_fn is None and not has_forward(module):
        return (
            f"curvature={curvature!r} needs the model's outputs, and "
            f"{type(module).__name__} defines no forward: define forward, or pass "
            "CurvatureMonitor(output_fn=...), output_fn(module, batch) -> outputs"
        )
    return None


def step_loss(outputs: Any) -> torch.Tensor | None:
    """The loss ``training_step`` returned for this batch, when it returned one: a tensor,
    or a mapping's ``"loss"`` (not detached: it is read, never differentiated)."""
    # Lightning hands a dict: decided before the (slower) abstract Mapping check.
    is_mapping = type(outputs) is dict or isinstance(outputs, Mapping)
    loss = outputs.get("loss") if is_mapping else outputs
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


class LossReader:
    """The training loss as a Python float at every step, without stalling an accelerator:
    there the value is copied to the host without blocking and read one step later (when
    it is long computed); on a CPU it is read at once."""

    def __init__(self) -> None:
        self._pending: tuple[torch.Tensor, Any] | None = None
        self._buffers: list[torch.Tensor] = []  # two pinned host scalars, used in turn

    def read(self, loss: torch.Tensor | None) -> float | None:
        """Hand over this step's loss; get the latest loss that is ready (None: none yet)."""
        if loss is None or not loss.is_cuda:
            return None if loss is None else float(loss)
        loss = loss.detach()
        ready = None
        if self._pending is not None and self._pending[1].query():
            ready = float(self._pending[0])
        if not self._buffers:
            self._buffers = [torch.empty((), pin_memory=True) for _ in range(2)]
        self._buffers.reverse()
        host = self._buffers[0]
        host.copy_(loss.float(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (host, event)
        return ready


def owned_learning_rate(owner: tuple[Any, int] | None) -> float | None:
    """η now of the param group that owns the measured parameters (None: no owner)."""
    if owner is None:
        return None
    optimizer, group = owner
    return float(optimizer.param_groups[group]["lr"])


def max_over_ranks(trainer: pl.Trainer) -> Callable[[int], int] | None:
    """``agree(code)``: the largest ``code`` over ranks (a collective); None on one process."""
    if not distributed(trainer):
        return None

    def agree(code: int) -> int:
        worst = torch.tensor(float(code), device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(worst, reduce_op="max"))

    return agree


def failure_agreement(
    trainer: pl.Trainer,
) -> Callable[[BaseException | None], BaseException | None] | None:
    """This rank's failure (or None) → the one every rank raises; None on one process."""
    if not distributed(trainer):
        return None

    def agree(error: BaseException | None) -> BaseException | None:
        return agree_on_failure(error, trainer.strategy, trainer.world_size, trainer.global_rank)

    return agree
