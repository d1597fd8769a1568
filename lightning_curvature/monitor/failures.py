"""What happens when a measurement fails: its cause in words, the fix to suggest, and, under
data parallelism, one decision for all ranks with the real cause.

A failure never stops training by default: the monitor warns once per cause (naming the
cause and the fix), skips the step, and switches itself off after ``max_failures`` in a row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from lightning_curvature._checks import check_choice, check_int
from lightning_curvature.measure.module import RankFailure
from lightning_curvature.measure.objective import NoLossError
from lightning_curvature.operators.sharded import OtherRankFailed

OnError = Literal["warn", "raise"]


class FailurePolicy:
    """Counts failures in a row, warns once per cause, and says when to switch off.

    Args:
        on_error: ``"warn"``: a failure is warned about and skipped; ``"raise"``: re-raised.
        max_failures: failures in a row after which the monitor switches itself off.
        warn: shows a message to the user (``rank_zero_warn``).
    """

    def __init__(self, on_error: OnError, max_failures: int, warn: Callable[[str], Any]) -> None:
        self.on_error: OnError = check_choice("on_error", on_error, ("warn", "raise"))  # type: ignore[assignment]
        self.max_failures = check_int("max_failures", max_failures, 1)
        self.failures_in_a_row = 0
        self._warn = warn
        self._warned: set[str] = set()

    def succeeded(self) -> None:
        self.failures_in_a_row = 0

    def failed(self, error: BaseException) -> str | None:
        """Warn about ``error`` (once per cause) or re-raise it; return why the monitor
        must now switch off, or None."""
        if self.on_error == "raise":
            raise error
        if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.failures_in_a_row += 1
        cause = type(error.__cause__ if isinstance(error, RankFailure) else error).__name__
        self.warn_once(
            cause,
            "CurvatureMonitor: a measurement failed and was skipped; training goes on. "
            f"Cause: {describe(error)}. {fix_for(error)}",
        )
        if self.failures_in_a_row >= self.max_failures:
            return f"{self.failures_in_a_row} measurements in a row failed (last: {cause})"
        return None

    def warn_once(self, key: str, message: str) -> None:
        """Show ``message`` the first time ``key`` comes up in this run."""
        if key not in self._warned:
            self._warned.add(key)
            self._warn(message)


def agree_on_failure(
    error: BaseException | None, strategy: Any, world_size: int, rank: int
) -> BaseException | None:
    """Under DDP every rank skips when any rank failed, and every rank reports the real
    cause: the failure of the rank where it happened, not the non-finite products the
    all-reduce carried to the others."""
    if not strategy.reduce_boolean_decision(error is not None, all=False):
        return None
    report = None if error is None else (_own_cause_rank(error), describe(error))
    reports: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(reports, report)
    failed = [(index, r) for index, r in enumerate(reports) if r is not None]
    # Prefer a rank that failed by itself over one that only received its NaN products
    # (DDP) or heard that another rank failed (a sharded model's agreed loss).
    failed_rank, (_, text) = max(failed, key=lambda entry: (entry[1][0], -entry[0]))
    if error is not None and failed_rank == rank:
        return error
    return RuntimeError(f"on rank {failed_rank}: {text}")


def _own_cause_rank(error: BaseException) -> int:
    """How directly ``error`` names the cause: 2 a rank's own failure under DDP, 0 the news
    that another rank failed, 1 anything else."""
    if isinstance(error, RankFailure):
        return 2
    return 0 if isinstance(error, OtherRankFailed) else 1


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
