r"""Lanczos with full re-orthogonalisation: the extreme eigenvalues of a symmetric operator.

For a symmetric operator :math:`A`, ``m`` Lanczos steps build an orthonormal basis
:math:`Q_m` of a Krylov space and :math:`H_m = Q_m^\top A Q_m`. The eigenvalues of
:math:`H_m` (Ritz values) converge to the extreme eigenvalues of :math:`A` far faster than
power iteration. Each Ritz pair has an exact residual norm :math:`r = \|Ay - \theta y\|`
for free (see :mod:`._krylov`); :math:`r` bounds the distance from :math:`\theta` to the
nearest eigenvalue, and with the products' rounding floor it is the reported error bound
(see :func:`~._certificate.error_bounds`).

Everything runs on the operator's device; the only host transfers are the small projected
matrix and Gram matrix, at each convergence check.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lightning_curvature._checks import check_int
from lightning_curvature.estimators._certificate import (
    Convergence,
    Which,
    evidence,
    guard_ritz_values,
    wanted_indices,
)
from lightning_curvature.estimators._common import (
    LinearOperator,
    check_operator,
    check_positive_int,
    is_real,
    make_generator,
    random_unit_vectors,
    total_dim,
)
from lightning_curvature.estimators._krylov import KrylovRun, krylov_projection

# The low end of a network Hessian is a dense cluster around zero: below this many steps a
# Ritz value there can look converged while the Krylov space has not explored the cluster.
SMALLEST_MIN_STEPS = 20


@dataclass(frozen=True, eq=False)
class LanczosResult:
    """Extreme eigenvalues of a symmetric operator, with their convergence evidence.

    Attributes:
        eigenvalues: the ``k`` wanted Ritz values (float64, on the CPU): descending for
            ``which="largest"`` (``eigenvalues[0]`` is λmax), ascending for ``"smallest"``.
        eigenvectors: (dim, k) Ritz vectors on the operator's device, or None when not asked.
        residuals: ``‖A y - θ y‖`` for each returned Ritz pair (exact, float64).
        error_bounds: a bound on each eigenvalue's absolute error: the residual norm,
            which bounds the distance to the nearest eigenvalue, plus the rounding floor of
            the products, which no residual sees; honest unless an eigenvalue at that end
            was missed altogether (see :func:`~._certificate.error_bounds`).
        ritz_values: every Ritz value of the final projection, ascending (for histograms).
        which: which end of the spectrum was asked for.
        num_iters: the size of the final basis (warm-start vectors included).
        num_matvecs: operator applications spent, including any discarded after a breakdown.
        converged: every error bound is within ``tol`` times the spectral scale (the largest
            Ritz value in magnitude), or its residual is below the rounding floor (no step
            can improve it: the bound then says how accurate the products allow), after
            enough steps for the end asked for.
        basis: (dim, num_iters) orthonormal basis on the device, when asked; its Rayleigh
            quotients are ``basis_rayleigh`` (so ``tr(QᵀAQ) = basis_rayleigh.sum()``).
        basis_rayleigh: ``qᵢᵀ A qᵢ`` for each basis column (float64, CPU), when asked.
        init_rayleigh: ``sᵀAs / sᵀs`` for each column ``s`` of ``init`` as given (float64,
            CPU; NaN for a zero column), from the warm start's first block product at no
            extra product; ``None`` without ``init``. A column dropped as dependent on the
            earlier ones (within 1e-3 of its norm) is read through its projection, off by
            at most 2e-3 of the spectral scale; the others are exact to rounding. Computed
            when first read (a property).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    error_bounds: torch.Tensor
    ritz_values: torch.Tensor
    which: str
    num_iters: int
    num_matvecs: int
    converged: bool
    basis: torch.Tensor | None = None
    basis_rayleigh: torch.Tensor | None = None
    # Computes init_rayleigh when first read (a measurement never reads it).
    _init_rayleigh: Callable[[], np.ndarray] | None = field(default=None, repr=False)

    @functools.cached_property
    def init_rayleigh(self) -> torch.Tensor | None:
        """See the class docstring."""
        return None if self._init_rayleigh is None else torch.from_numpy(self._init_rayleigh())


def default_num_iters(k: int, which: Which = "largest") -> int:
    """Enough steps for ``k`` extreme eigenvalues of a typical network Hessian; convergence
    stops earlier. The clustered low end needs more than the top."""
    return 30 + 10 * k if which == "largest" else 60 + 10 * k


def min_steps(k: int, which: Which) -> int:
    """Steps before convergence may be declared: the wanted and guard Ritz values must all
    exist, and the low end gets time to explore its cluster."""
    steps = k + guard_ritz_values(k) + 1
    return steps if which == "largest" else max(steps, SMALLEST_MIN_STEPS)


def lanczos(
    op: LinearOperator,
    k: int = 5,
    num_iters: int | None = None,
    tol: float = 1e-4,
    seed: int = 0,
    *,
    which: Which = "largest",
    return_eigenvectors: bool = False,
    init: torch.Tensor | None = None,
    return_basis: bool = False,
    restarts: int = 0,
) -> LanczosResult:
    """The ``k`` largest (or smallest) algebraic eigenvalues of a symmetric operator.

    Args:
        op: anything with ``matvec(v)``, ``dim``, ``device`` and ``dtype``.
        k: how many eigenvalues to return.
        num_iters: the most operator applications (barring breakdowns, warm-start vectors
            included); default ``30 + 10·k`` for the largest, ``60 + 10·k`` for the
            smallest, capped at ``op.dim``. The basis holds up to ``dim × num_iters``
            numbers on the device.
        tol: stop when the error bound of every wanted eigenvalue is below ``tol`` times the
            largest Ritz value in magnitude (a relative accuracy for λmax), and a few guard
            Ritz values beyond them are located
            (:func:`~._certificate.guard_ritz_values`); ``0`` runs all ``num_iters`` steps.
            A residual below the products' rounding floor also counts: where the products
            are less accurate than ``tol`` (float32 near a minimum) more steps cannot help,
            so the run stops and the bound, above ``tol``, says how accurate the value is.
        seed: seeds the random start vector; the global RNG is never touched.
        which: ``"largest"`` (top of the spectrum, λmax first) or ``"smallest"`` (the most
            negative curvature first; needs at least ``SMALLEST_MIN_STEPS`` steps).
        return_eigenvectors: also return the Ritz vectors, (dim, k) on the device.
        init: a warm start: a (dim,) vector or a (dim, r) block of previous eigenvectors.
            The block seeds the basis (one block product, ``r`` matvecs) and its
            Rayleigh–Ritz step may already converge; otherwise one seed stays in the basis
            and Lanczos continues from its residual, while a block restarts Lanczos from
            its wanted Ritz vectors (no guard Ritz values are asked for: the previous run
            had them). For λmax pass the previous top vector alone (a block pays ``r``
            products up front). Every column's Rayleigh quotient comes back in
            ``init_rayleigh`` at no extra product.
        return_basis: also return the whole orthonormal basis and its Rayleigh quotients,
            e.g. to deflate :func:`~lightning_curvature.hutchinson_trace` with it.
        restarts: with ``k=1``, restart an unconverged run from its Ritz vector up to this
            many times: the basis never exceeds ``num_iters`` vectors (bounded memory);
            ``num_matvecs`` counts every run's products.

    Raises:
        ValueError: a bad ``k``, ``num_iters``, ``tol``, ``which`` or ``init``.
        FloatingPointError: the operator produced NaN or inf.

    Example::

        >>> import torch, lightning_curvature as lc
        >>> op = lc.DenseOperator(torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64)))
        >>> result = lc.lanczos(op, k=2)
        >>> [round(v, 3) for v in result.eigenvalues.tolist()], result.converged
        ([100.0, 99.0], True)
        >>> bool(((result.eigenvalues - torch.tensor([100.0, 99.0])).abs()
        ...       <= result.error_bounds).all())
        True
    """
    k, num_iters, tol, restarts = _checked_arguments(op, k, num_iters, tol, which, restarts)
    seeds = _warm_start_block(op, init) if init is not None else None

    generator = make_generator(op, seed)
    # After a warm start a random vector is needed only if a seed is an eigenvector.
    start = None if seeds is not None else random_unit_vectors(op, 1, generator)[:, 0]
    # A warm start comes from a run that had its guards; a block converging on its
    # Rayleigh-Ritz step has no room for more.
    size = total_dim(op)  # over all shards: what counts eigenvalues
    guards = 0 if seeds is not None else min(k + guard_ritz_values(k), size) - k
    first_step = k if seeds is not None and which == "largest" else min_steps(k, which)
    is_converged = Convergence(k, guards, tol, which, size)

    def seed_weights(matrix: np.ndarray) -> np.ndarray:
        _, vectors = np.linalg.eigh(matrix)
        weights: np.ndarray = vectors[:, wanted_indices(matrix.shape[0], k, which)].sum(axis=1)
        return weights

    run = krylov_projection(
        op,
        start,
        num_iters,
        generator,
        restart_on_breakdown=True,
        seeds=seeds,
        seed_weights=seed_weights,
        is_converged=is_converged,
        min_steps=min(first_step, num_iters, size),
    )
    converged_at = min(first_step, size)
    keep_vectors = return_eigenvectors or restarts > 0  # a restart starts from them
    result = _result(op, run, k, which, converged_at, is_converged, keep_vectors, return_basis)
    if restarts:
        result = _restarted(op, result, restarts, num_iters, tol, seed, which, return_basis)
    return result if return_eigenvectors else dataclasses.replace(result, eigenvectors=None)


def _restarted(
    op: LinearOperator,
    result: LanczosResult,
    restarts: int,
    num_iters: int,
    tol: float,
    seed: int,
    which: Which,
    return_basis: bool,
) -> LanczosResult:
    """``result`` (k = 1), run again as a warm start from its own Ritz vector while it is
    unconverged, up to ``restarts`` times; the products of every run counted, the init's
    Rayleigh quotients those of the first."""
    spent, first_rayleigh = result.num_matvecs, result._init_rayleigh
    for attempt in range(restarts):
        if result.converged:
            break
        result = lanczos(
            op,
            k=1,
            num_iters=num_iters,
            tol=tol,
            seed=seed + attempt + 1,
            which=which,
            return_eigenvectors=True,
            init=result.eigenvectors,
            return_basis=return_basis,
        )
        spent += result.num_matvecs
    return dataclasses.replace(result, num_matvecs=spent, _init_rayleigh=first_rayleigh)


def _result(
    op: LinearOperator,
    run: KrylovRun,
    k: int,
    which: Which,
    first_step: int,
    is_converged: Convergence,
    return_eigenvectors: bool,
    return_basis: bool,
) -> LanczosResult:
    """The run's wanted Ritz pairs with their evidence, as a :class:`LanczosResult`."""
    projection = run.projection
    theta, vectors, residuals, wanted, bounds, _ = evidence(projection, k, which)
    exhausted = projection.size == total_dim(op)
    converged = exhausted or (projection.size >= first_step and is_converged(projection))
    eigenvectors = None
    if return_eigenvectors:
        eigenvectors = run.basis.combine(
            torch.from_numpy(np.ascontiguousarray(vectors[:, wanted])).to(op.device)
        )
    return LanczosResult(
        eigenvalues=torch.from_numpy(theta[wanted].copy()),
        eigenvectors=eigenvectors,
        residuals=torch.from_numpy(residuals[wanted].copy()),
        error_bounds=torch.from_numpy(bounds),
        ritz_values=torch.from_numpy(theta.copy()),
        which=which,
        num_iters=projection.size,
        num_matvecs=run.num_matvecs,
        converged=converged,
        basis=run.basis.active.mT if return_basis else None,
        basis_rayleigh=torch.from_numpy(np.diag(projection.matrix).copy())
        if return_basis
        else None,
        _init_rayleigh=run.seed_rayleigh,
    )


def _checked_arguments(
    op: LinearOperator, k: Any, num_iters: Any, tol: Any, which: Any, restarts: Any
) -> tuple[int, int, float, int]:
    """``k``, ``num_iters`` (its default filled in), ``tol`` and ``restarts``, or a
    ValueError naming the first that is outside its allowed values."""
    check_operator(op)
    check_positive_int("k", k)
    if k > total_dim(op):
        raise ValueError(f"k must be at most the operator's dimension {total_dim(op)}, got {k}")
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if num_iters is None:
        num_iters = default_num_iters(int(k), which)
    check_positive_int("num_iters", num_iters)
    if num_iters < k:
        raise ValueError(f"num_iters must be at least k={k}, got {num_iters}")
    if not is_real(tol) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if check_int("restarts", restarts, 0) and k != 1:
        raise ValueError(
            f"restarts needs k=1, got k={k}: a restart goes on from one vector, and the other "
            "wanted eigenvalues' directions are lost with the discarded basis"
        )
    return int(k), int(num_iters), float(tol), int(restarts)


def _warm_start_block(op: LinearOperator, init: object) -> torch.Tensor:
    if (
        not isinstance(init, torch.Tensor)
        or init.ndim not in (1, 2)
        or init.shape[0] != op.dim
        or (init.ndim == 2 and not 1 <= init.shape[1] <= total_dim(op))
    ):
        shape = tuple(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__
        raise ValueError(
            f"init must be a ({op.dim},) vector or a ({op.dim}, r) block with "
            f"1 <= r <= {total_dim(op)}, got {shape}"
        )
    return init.detach().reshape(op.dim, -1)
