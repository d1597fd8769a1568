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

import torch
from torch import nn

from lightning_curvature._shards import holds_shards, local_part, sharded_parameters
from lightning_curvature.estimators.lanczos import default_num_iters
from lightning_curvature.measure.module import (
    Context,
    LastUpdate,
    Objective,
    Outcome,
    measure_module,
)
from lightning_curvature.measure.tiers import MeasureSettings, Tier, WarmStart
from lightning_curvature.monitor.probes import select_parameters

# Vectors a measurement holds besides its Krylov basis: the product, residual, update and
# gradient, the deflation block (k), and, with the trace, a block of 8 Hutchinson probes
# and their products.
WORKING_VECTORS = 4
TRACE_VECTORS = 2 * 8


def working_vectors(settings: MeasureSettings) -> int:
    """The vectors a measurement holds besides its Krylov basis."""
    return WORKING_VECTORS + settings.k + (TRACE_VECTORS if settings.trace else 0)


def bounded(
    settings: MeasureSettings,
    dim: int,
    itemsize: int,
    budget_mb: float | None,
    name: str = "memory_budget_mb",
) -> tuple[MeasureSettings, str | None]:
    """``settings`` with every Krylov basis capped so that the estimators' vectors (basis
    and working vectors, ``dim`` entries of ``itemsize`` bytes each: this rank's shard
    under FSDP2) fit in ``budget_mb``; or, when even a basis of k + 2 vectors does not fit,
    the reason to refuse (naming the bound as ``name``). The products' own memory (a
    forward and backward pass, as in a training step) is not in the bound. λmax (track
    points, Adam's preconditioned λmax) restarts from its Ritz vector when the cap ends it
    unconverged, within the products an unbounded run would spend; the top k of a full
    point do not (a restart from one vector loses the others): where they need more steps
    than the cap they come back unconverged, and are not logged."""
    if budget_mb is None:
        return settings, None
    vector_mb = dim * itemsize / 2**20
    vectors = int(budget_mb // vector_mb)
    reserve = working_vectors(settings)
    cap = vectors - reserve
    if cap < settings.k + 2:
        need = (settings.k + 2 + reserve) * vector_mb
        return settings, (
            f"{name}={budget_mb:g} holds {vectors} vectors of {dim} entries "
            f"({vector_mb:.3g} MB each); measuring needs at least {settings.k + 2 + reserve} "
            f"({need:.3g} MB: a Krylov basis of k + 2 and {reserve} working vectors): raise "
            f"{name}, lower k, or measure fewer parameters"
        )
    unbounded = settings.num_iters or default_num_iters(settings.k)
    num_iters, density_iters = min(unbounded, cap), min(settings.density_iters, cap)
    # λmax restarts from its Ritz vector as often as needed to spend what unbounded would.
    restarts = -(-unbounded // num_iters) - 1
    bounded_settings = dataclasses.replace(
        settings, num_iters=num_iters, density_iters=density_iters, restarts=restarts
    )
    return bounded_settings, None


def measurer_for(
    module: nn.Module,
    params: Any,
    objective: Objective,
    settings: MeasureSettings,
    hvp_method: str,
) -> tuple[Measurer | None, str | None]:
    """The run's measurer for ``module`` (its parameters as they are once
    ``configure_model`` ran: shards under FSDP2) and ``params`` (the monitor's selection),
    or why it cannot be measured: shards it cannot read, or a memory bound too small."""
    reason = _cannot_measure_shards(module, params)
    if reason is not None:
        return None, reason
    context = objective.context(module, select_parameters(module, params))
    measurer = Measurer(context, settings, hvp_method)
    return (None, measurer.refusal) if measurer.refusal else (measurer, None)


def _cannot_measure_shards(module: nn.Module, params: Any) -> str | None:
    """Why a module whose parameters are sharded (seen once ``configure_model`` has run)
    cannot be measured; None when it can, or holds no shards."""
    if not holds_shards(module.parameters()):
        return None
    if params is not None:
        return (
            "a sharded model is measured whole: CurvatureMonitor(params=...) selects part of "
            "it, which the sharded operator does not support; pass params=None"
        )
    try:
        sharded_parameters(module)
    except ValueError as error:
        return f"{error}; CurvatureMonitor is switched off for this run"
    return None


class Measurer:
    """Measures one module over a run (see the module docstring).

    Args:
        context: what is measured; its ``optimizers``, ``lr_schedulers`` and ``distributed``
            are given again at each :meth:`measure`.
        settings: what to estimate and how hard to try.
        hvp_method: ``"auto"``, or ``"finite_difference"`` after a failed check (resumed).

    ``settings.memory_budget_mb`` caps the estimators' vectors (see :func:`bounded`); when
    even the smallest basis does not fit, :attr:`refusal` says why.
    """

    def __init__(
        self,
        context: Context,
        settings: MeasureSettings,
        hvp_method: str = "auto",
    ) -> None:
        self.context = context
        named = dict(context.module.named_parameters())
        measured = [local_part(named[name]) for name in context.param_names]
        itemsize = 8 if any(p.dtype == torch.float64 for p in measured) else 4  # float32 at least
        dim = sum(p.numel() for p in measured)
        self.settings, self.refusal = bounded(settings, dim, itemsize, settings.memory_budget_mb)
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
                warm=self._warm if self.settings.warm_start else None,
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
