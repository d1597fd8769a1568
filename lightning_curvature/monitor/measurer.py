"""What one measurement hands the next over a run: warm starts, the last update, the product
method, and whether the products were checked.

:class:`Measurer` wraps :func:`~lightning_curvature.measure.module.measure_module` for a
monitor: it keeps the run's Ritz vectors for the next warm start, θ before a measured step
(for the sharpness along the update), and falls back to finite-difference products for good
once a check found the exact ones wrong. It knows torch, not Lightning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from lightning_curvature.measure.module import Context, LastUpdate, Outcome, measure_module
from lightning_curvature.measure.tiers import MeasureSettings, Tier, WarmStart


class Measurer:
    """Measures one module over a run (see the module docstring).

    Args:
        context: what is measured; its ``optimizers``, ``lr_schedulers`` and ``distributed``
            are given again at each :meth:`measure`.
        settings: what to estimate and how hard to try.
        warm_start: start each Lanczos run from the previous Ritz vectors.
        hvp_method: ``"auto"``, or ``"finite_difference"`` after a failed check (resumed).
    """

    def __init__(
        self,
        context: Context,
        settings: MeasureSettings,
        warm_start: bool = True,
        hvp_method: str = "auto",
    ) -> None:
        self.context = context
        self.settings = settings
        self.warm_start = warm_start
        self.hvp_method = hvp_method
        self.ratio_trusted = True
        self._warm: WarmStart | None = None
        self._checked = False
        self._last_update = LastUpdate()

    def before_measured_step(self, step: int) -> None:
        """Call just before the optimizer step that produces a measured step (``step``
        is ``global_step`` before it): θ is copied for the sharpness along the update."""
        self._last_update.keep_before(self.context.module, self.context.param_names, step)

    def measure(
        self,
        batches: list[Any],
        step: int,
        tier: Tier,
        *,
        optimizers: Sequence[Any],
        lr_schedulers: Sequence[Any],
        distributed: bool = False,
        agree_on_failure: Callable[[BaseException | None], BaseException | None] | None = None,
    ) -> Outcome:
        """Measure at ``step``; raise the failure every rank agrees on (``agree_on_failure``
        maps this rank's failure, or None, to the one all ranks raise) so that every rank
        counts the same measurements."""
        context = dataclasses.replace(
            self.context,
            optimizers=optimizers,
            lr_schedulers=lr_schedulers,
            distributed=distributed,
        )
        module: nn.Module = context.module
        error: BaseException | None = None
        try:
            outcome = measure_module(
                context,
                batches,
                step,
                tier,
                self.settings,
                warm=self._warm if self.warm_start else None,
                update=self._last_update.take(module, context.param_names, step),
                hvp_method=self.hvp_method,
                verify=not self._checked or tier == "full",
            )
        except Exception as caught:
            error = caught
        if agree_on_failure is not None:
            error = agree_on_failure(error)
        if error is not None:
            self._warm = None
            raise error
        self._absorb(outcome)
        return outcome

    def _absorb(self, outcome: Outcome) -> None:
        self._warm = outcome.warm
        self._checked = True
        self.ratio_trusted = outcome.ratio_trusted
        if outcome.fallback_reason:
            self.hvp_method = "finite_difference"
