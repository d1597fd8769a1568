"""What happens when a measurement fails: its cause in words, the fix to suggest, and, under
data parallelism, one decision for all ranks with the real cause.

A failure never stops training by default: the monitor warns once per cause (naming the
cause and the fix), skips the step, and switches itself off after ``max_failures`` in a row.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_curvature.measure.module import RankFailure
from lightning_curvature.measure.objective import NoLossError


def agree_on_failure(
    error: BaseException | None, strategy: Any, world_size: int, rank: int
) -> BaseException | None:
    """Under DDP every rank skips when any rank failed, and every rank reports the real
    cause: the failure of the rank where it happened, not the non-finite products the
    all-reduce carried to the others."""
    if not strategy.reduce_boolean_decision(error is not None, all=False):
        return None
    report = None if error is None else (isinstance(error, RankFailure), describe(error))
    reports: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(reports, report)
    failed = [(index, r) for index, r in enumerate(reports) if r is not None]
    # Prefer a rank that failed by itself over one that only received its NaN products.
    failed_rank, (_, text) = next(((index, r) for index, r in failed if r[0]), failed[0])
    if error is not None and failed_rank == rank:
        return error
    return RuntimeError(f"on rank {failed_rank}: {text}")


def describe(error: BaseException) -> str:
    """``Type: message`` of the error that caused a failure."""
    if isinstance(error, RankFailure):
        return str(error)
    return f"{type(error).__name__}: {error}"


def fix_for(error: BaseException) -> str:
    """The fix to suggest for a failure, by its cause."""
    error = error.__cause__ if isinstance(error, RankFailure) and error.__cause__ else error
    text = str(error)
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in text:
        return "Fix: use fewer or smaller probe batches (num_batches, probe_dataloader)."
    if isinstance(error, NoLossError):
        return (
            "Fix: the probe batches are training batches that training_step returned a loss "
            "for, measured with their own batch_idx (a probe_dataloader's: 0, 1, ...); make "
            "training_step return the loss for them, or pass loss_fn(module, batch) -> loss."
        )
    if isinstance(error, FloatingPointError):
        return (
            "Fix: the loss or its curvature is not finite on the probe batches; check the "
            "learning rate, or pass a probe_dataloader with clean data."
        )
    if "derivative for" in text and "not implemented" in text:
        return (
            "Fix: an op in the model has no double backward; replace it, or restrict the "
            "Hessian to parameters that avoid it (params=)."
        )
    return "Fix: pass on_error='raise' to see the full traceback."
