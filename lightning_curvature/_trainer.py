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

# Strategies that shard parameters: a rank does not hold the whole model, so the flat
# Hessian-vector product of one rank is not defined.
SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


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


def scale_learning_rates(trainer: pl.Trainer, factor: float) -> None:
    """Multiply every optimizer's every learning rate by ``factor``."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor


def cannot_measure(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    curvature: str,
    loss_fn: Callable[..., Any] | None,
    output_fn: Callable[..., Any] | None,
) -> str | None:
    """Why this run cannot be measured, in words with the fix; None when it can."""
    strategy = sharded_strategy(trainer)
    if strategy is not None:
        return (
            f"{strategy} shards the parameters across ranks, and CurvatureMonitor needs "
            "the whole model on every rank: it is switched off for this run (use DDP)"
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
