r"""One curvature measurement, in two tiers, gathered in one record.

- **track** (every scheduled step, a handful of products): the stability-relevant sharpness
  — λmax, or λmax(P⁻¹H) for adaptive optimizers — warm-started from the previous Ritz
  vectors, with its ·η, the stability ratio and the learning rate, plus two directional
  quantities. Under an adaptive optimizer λmax(H) itself waits for the full tier: it is not
  what decides stability there, and a second Lanczos run would double the track tier's
  products.

  * directional sharpness :math:`u^\top H u / u^\top u`, u the last update
    :math:`\theta_s - \theta_{s-1}` (Pan & Li 2023): one product;
  * batch sharpness, the mean over probe batches b of
    :math:`g_b^\top H_b g_b / g_b^\top g_b` at :math:`\theta_s` (Andreyev & Beneventano,
    "Edge of Stochastic Stability", 2024): one product per batch.

- **full** (a sparser cadence): the track tier plus the top k, the trace (Hutchinson on the
  complement of the top Ritz space, the Ritz space itself taken exactly), λmin and the
  spectral density.

Both tiers fill the same :class:`Measurement`, so curves join up. A number is only shown with
its evidence: :meth:`Measurement.scalars` leaves out every eigenvalue whose Lanczos run did
not converge. This module is shared by the training callback and the offline checkpoint
analysis; it knows neither Lightning nor TensorBoard.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lightning_curvature.estimators import hutchinson_trace, lanczos, spectral_density
from lightning_curvature.estimators.blockwise import blockwise_lambda_max, blockwise_trace
from lightning_curvature.linear_operator import inner
from lightning_curvature.measure.record import Measurement
from lightning_curvature.operators import PreconditionedOperator
from lightning_curvature.optim.stability import StabilityRule, stability_ratio

Tier = Literal["track", "full"]


@dataclass(frozen=True)
class MeasureSettings:
    """What to estimate and how hard to try (see :class:`CurvatureMonitor` for each)."""

    k: int = 5
    num_iters: int | None = None
    tol: float = 1e-3
    trace: bool = True
    num_probes: int = 10
    density: bool = False
    density_runs: int = 4
    density_iters: int = 40
    lambda_min: bool = False
    seed: int = 0
    critical_sharpness: bool = False
    memory_budget_mb: float | None = None  # the estimators' vectors, per rank (monitor.measurer)
    restarts: int = 0  # λmax's restarts when its basis is capped (set with the memory bound)
    warm_start: bool = True  # each run starts from the previous measurement's Ritz vectors


@dataclass(frozen=True, eq=False)
class WarmStart:
    """What one measurement hands the next: the top Ritz vectors of H and of P⁻¹ᐟ²HP⁻¹ᐟ²."""

    top: torch.Tensor | None = None
    preconditioned: torch.Tensor | None = None


def measure(
    op: Any,
    step: int,
    settings: MeasureSettings,
    *,
    tier: Tier = "full",
    rule: StabilityRule | None = None,
    preconditioner: torch.Tensor | None = None,
    warm: WarmStart | None = None,
    update: torch.Tensor | None = None,
    batch_ops: Sequence[Any] | None = None,
    mean_over_ranks: Callable[[float], float] | None = None,
    blocks: Sequence[tuple[str, slice]] | None = None,
    curvature: str = "hessian",
) -> tuple[Measurement, WarmStart]:
    """Run one tier of estimators on ``op``; return the record and the next warm start.

    Args:
        op: the curvature operator (e.g. a HessianOperator on the probe batches).
        step: the training step the record is for.
        settings: what to estimate.
        tier: ``"track"`` or ``"full"`` (module docstring).
        rule: the optimizer's stability rule (adds η, λmax·η, the threshold and the ratio).
        preconditioner: P's diagonal for adaptive optimizers (adds the preconditioned λmax).
        warm: the previous measurement's :class:`WarmStart`.
        update: θ_s − θ_{s−1} as a flat vector over the operator's parameters (adds the
            directional sharpness).
        batch_ops: one operator per probe batch, each with ``gradient()`` (adds the batch
            sharpness); ``[op]`` when there is a single probe batch.
        mean_over_ranks: averages a local number across data-parallel ranks (batch
            sharpness is a mean over every rank's probe batches).
        blocks: ``(name, slice)`` blocks of the flat vector (one per layer, from
            :func:`~lightning_curvature.operators.blocks.parameter_blocks`): a full
            measurement then also gives each block's trace, from the very probes of the
            whole trace (which is then plain Hutchinson, so the blocks sum to it), and each
            diagonal block's λmax, from one batched Lanczos over all blocks.
        curvature: what ``op`` is (``"hessian"``, ``"ggn"``, ``"fisher"``), for the record.
    """
    if tier not in ("track", "full"):
        raise ValueError(f"tier must be 'track' or 'full', got {tier!r}")
    warm = warm or WarmStart()
    started = time.perf_counter()
    matvecs_before = op.num_matvecs
    full = tier == "full"
    # The track tier measures the relevant sharpness alone: λmax(H) waits for the full tier
    # under an adaptive optimizer (its P⁻¹H decides stability there).
    top = _top_eigenpairs(op, settings, warm, full) if full or preconditioner is None else None
    lambda_max = math.nan if top is None else float(top.eigenvalues[0])
    loss = getattr(op, "loss", None)
    values: dict[str, Any] = {"probe_loss": math.nan if loss is None else float(loss)}
    if top is not None and full:
        values.update(_full_tier(op, settings, top, blocks))
    sharpness, converged = lambda_max, top is None or top.converged
    preconditioned_vectors = None
    if preconditioner is not None:
        scaled = _preconditioned_top(op, settings, preconditioner, warm)
        sharpness = values["preconditioned_lambda_max"] = float(scaled.eigenvalues[0])
        converged = converged and scaled.converged
        preconditioned_vectors = scaled.eigenvectors
    extra_matvecs = _directional_quantities(values, op, update, batch_ops, mean_over_ranks)
    if rule is not None:
        values.update(_stability(values, rule, lambda_max, sharpness, preconditioner))
    record = Measurement(
        step=step,
        tier=tier,
        lambda_max=lambda_max,
        lambda_max_error_bound=math.nan if top is None else float(top.error_bounds[0]),
        lambda_max_converged=top is not None and top.converged,
        converged=converged,
        num_matvecs=op.num_matvecs - matvecs_before + extra_matvecs,
        seconds=time.perf_counter() - started,
        hvp_method=getattr(op, "method_used", None),
        curvature=curvature,
        **values,
    )
    kept = warm.top if top is None else top.eigenvectors
    return record, WarmStart(top=kept, preconditioned=preconditioned_vectors)


def _top_eigenpairs(op: Any, settings: MeasureSettings, warm: WarmStart, full: bool) -> Any:
    """λmax (track) or the top k (full), warm-started from the previous Ritz vectors."""
    k = min(settings.k if full else 1, op.dim)
    return lanczos(
        op,
        k=k,
        num_iters=_num_iters(settings, k, op.dim),
        tol=settings.tol,
        seed=settings.seed,
        return_eigenvectors=True,
        # A block start costs one product per vector: the track tier starts from the
        # previous top vector alone, the full tier from the whole previous top k.
        init=_usable(warm.top if full or warm.top is None else warm.top[:, :1], op.dim),
        restarts=settings.restarts if k == 1 else 0,  # a capped basis goes on (memory bound)
    )


def _full_tier(
    op: Any, settings: MeasureSettings, top: Any, blocks: Sequence[tuple[str, slice]] | None
) -> dict[str, Any]:
    """What the full tier adds: the top k with their evidence, λmin when asked, the trace
    (per block when ``blocks`` are given: then plain Hutchinson, so the blocks sum to it;
    deflated by the top Ritz space otherwise) and the density when asked."""
    values: dict[str, Any] = {
        "eigenvalues": tuple(float(v) for v in top.eigenvalues),
        "error_bounds": tuple(float(v) for v in top.error_bounds),
        "eigenvalues_converged": top.converged,
        "ritz_values": tuple(float(v) for v in top.ritz_values),
    }
    if settings.lambda_min:
        bottom = lanczos(
            op,
            k=1,
            num_iters=_num_iters(settings, 1, op.dim),
            tol=settings.tol,
            seed=settings.seed + 1,
            which="smallest",
        )
        values.update(
            lambda_min=float(bottom.eigenvalues[0]),
            lambda_min_error_bound=float(bottom.error_bounds[0]),
            lambda_min_converged=bottom.converged,
        )
    if blocks:
        values.update(_per_layer(op, settings, blocks))
    elif settings.trace:
        trace = _deflated_trace(op, settings, top)
        values.update(trace=trace.estimate, trace_stderr=trace.stderr)
    if settings.density:
        sd = spectral_density(
            op,
            num_runs=settings.density_runs,
            num_iters=settings.density_iters,
            seed=settings.seed + 3,
        )
        values.update(density_grid=tuple(sd.grid.tolist()), density=tuple(sd.density.tolist()))
    return values


def _preconditioned_top(
    op: Any, settings: MeasureSettings, preconditioner: torch.Tensor, warm: WarmStart
) -> Any:
    """λmax of P⁻¹ᐟ²HP⁻¹ᐟ², warm-started from its own previous top vector."""
    return lanczos(
        PreconditionedOperator(op, preconditioner),
        k=1,
        num_iters=_num_iters(settings, 1, op.dim),
        tol=settings.tol,
        seed=settings.seed + 4,
        return_eigenvectors=True,
        init=_usable(warm.preconditioned, op.dim),
        restarts=settings.restarts,
    )


def _directional_quantities(
    values: dict[str, Any],
    op: Any,
    update: torch.Tensor | None,
    batch_ops: Sequence[Any] | None,
    mean_over_ranks: Callable[[float], float] | None,
) -> int:
    """Add the directional and batch sharpness to ``values``; return the products spent
    outside ``op``."""
    if update is not None:
        values["directional_sharpness"] = directional_sharpness(op, update)
    if not batch_ops:
        return 0
    local, spent = batch_sharpness(batch_ops, op)
    values["batch_sharpness"] = mean_over_ranks(local) if mean_over_ranks else local
    return spent


def _stability(
    values: dict[str, Any],
    rule: StabilityRule,
    lambda_max: float,
    sharpness: float,
    preconditioner: torch.Tensor | None,
) -> dict[str, Any]:
    """η, the threshold, every sharpness·η, and the stability ratio."""
    lr = rule.learning_rate
    added: dict[str, Any] = {
        "learning_rate": lr,
        "stability_threshold": rule.threshold,
        "lambda_max_x_lr": lambda_max * lr,
    }
    for name in ("directional_sharpness", "batch_sharpness"):
        if values.get(name) is not None:
            added[f"{name}_x_lr"] = values[name] * lr
    # An adaptive optimizer before its first step has no preconditioner yet: its
    # relevant sharpness is unknown, and λmax·η against 38 would mislead.
    if not rule.preconditioned or preconditioner is not None:
        added.update(
            sharpness_x_lr=sharpness * lr, stability_ratio=stability_ratio(sharpness, rule)
        )
    return added


def directional_sharpness(op: Any, update: torch.Tensor) -> float | None:
    """``uᵀHu / uᵀu`` for the last update u (None when the step did not move)."""
    u = update.to(device=op.device, dtype=op.dtype)
    norm_sq = float(inner(op, u, u))
    if norm_sq == 0.0:
        return None
    return float(inner(op, u, op.matvec(u))) / norm_sq


def batch_sharpness(batch_ops: Sequence[Any], op: Any) -> tuple[float, int]:
    """Mean over probe batches of ``g_bᵀH_b g_b / g_bᵀg_b``, and the products it cost
    outside ``op`` (a batch operator that is ``op`` itself counts there already)."""
    ratios, spent = [], 0
    for batch_op in batch_ops:
        before = batch_op.num_matvecs
        g = batch_op.gradient()
        norm_sq = float(inner(batch_op, g, g))
        ratios.append(
            float(inner(batch_op, g, batch_op.matvec(g))) / norm_sq if norm_sq > 0 else 0.0
        )
        if batch_op is not op:
            spent += batch_op.num_matvecs - before
    return sum(ratios) / len(ratios), spent


def _per_layer(
    op: Any, settings: MeasureSettings, blocks: Sequence[tuple[str, slice]]
) -> dict[str, Any]:
    """Per-block traces (0 products beyond the whole trace's probes) and per-block λmax
    (one L-column product per Lanczos step)."""
    traces = blockwise_trace(op, blocks, num_probes=settings.num_probes, seed=settings.seed + 2)
    tops = blockwise_lambda_max(
        op, blocks, tol=settings.tol, num_iters=settings.num_iters, seed=settings.seed + 5
    )
    return {
        "trace": traces.whole.estimate,
        "trace_stderr": traces.whole.stderr,
        "layer_traces": {n: (r.estimate, r.stderr) for n, r in traces.blocks.items()},
        "layer_lambda_max": {
            n: (float(v), float(b), bool(c))
            for n, v, b, c in zip(
                tops.names, tops.eigenvalues, tops.error_bounds, tops.converged, strict=True
            )
        },
    }


def _deflated_trace(op: Any, settings: MeasureSettings, top: Any) -> Any:
    """Hutchinson on the complement of the top Ritz space, whose own trace is exact (the
    Rayleigh quotients of Ritz vectors are their Ritz values): no products beyond the
    probes, and a smaller variance when a few eigenvalues dominate."""
    return hutchinson_trace(
        op,
        num_probes=settings.num_probes,
        seed=settings.seed + 2,
        deflate=top.eigenvectors,
        deflate_values=top.eigenvalues,
    )


def _num_iters(settings: MeasureSettings, k: int, dim: int) -> int | None:
    if settings.num_iters is None:
        return None
    return max(min(settings.num_iters, dim), k)


def _usable(vectors: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    return vectors if vectors is not None and vectors.shape[0] == dim else None
