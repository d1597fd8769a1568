r"""Lanczos with full re-orthogonalisation: extreme eigenvalues and SLQ spectral densities.

For a symmetric operator :math:`A` and a start vector :math:`q_1`, ``m`` Lanczos steps build
an orthonormal basis :math:`Q_m` of the Krylov space and a tridiagonal
:math:`T_m = Q_m^\top A Q_m`. The eigenvalues of :math:`T_m` (Ritz values) converge to the
extreme eigenvalues of :math:`A` far faster than power iteration. Each Ritz pair
:math:`(\theta_i, Q_m s_i)` has the residual norm :math:`\beta_m |e_m^\top s_i|` for free,
which is how convergence is judged.

Everything runs on the operator's device. The only host transfers are the tridiagonal
coefficients, pulled every few iterations to test convergence with
``scipy.linalg.eigh_tridiagonal``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from lightning_curvature.estimators._common import (
    LinearOperator,
    check_operator,
    check_positive_float,
    check_positive_int,
    make_generator,
    raise_if_not_finite,
    random_unit_vectors,
)

# Iterations between convergence checks: each check costs one small host sync.
CHECK_EVERY = 3

Which = Literal["largest", "smallest"]


@dataclass(frozen=True, eq=False)
class LanczosResult:
    """Extreme eigenvalues of a symmetric operator, with their convergence evidence.

    Attributes:
        eigenvalues: the ``k`` wanted Ritz values (float64, on the CPU): descending for
            ``which="largest"`` (``eigenvalues[0]`` is λmax), ascending for ``"smallest"``.
        eigenvectors: (dim, k) Ritz vectors on the operator's device, or None when not asked.
        residuals: ``‖A y - θ y‖`` for each returned Ritz pair.
        error_bounds: a-posteriori bound on each eigenvalue's absolute error,
            ``min(r, r²/gap)`` with the gap to the nearest other Ritz value.
        ritz_values: every Ritz value of the final tridiagonal, ascending (for histograms).
        which: which end of the spectrum was asked for.
        num_iters: Lanczos steps taken (the size of the Krylov basis).
        num_matvecs: operator applications spent, including any discarded after a breakdown.
        converged: every error bound is within ``tol`` times the spectral scale.
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


class _Basis:
    """The orthonormal Lanczos vectors, one per row, kept on the device in blocks of
    ``BLOCK_ROWS`` rows allocated as the process reaches them: memory follows the steps
    actually taken (often 15-30), not the most allowed (80 for k = 5 by default)."""

    BLOCK_ROWS = 16

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype, capacity: int):
        self.dim, self.device, self.dtype, self.capacity = dim, device, dtype, capacity
        self.blocks: list[torch.Tensor] = []

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.blocks[index // self.BLOCK_ROWS][index % self.BLOCK_ROWS]

    def __setitem__(self, index: int, vector: torch.Tensor) -> None:
        while index >= len(self.blocks) * self.BLOCK_ROWS:
            rows = min(self.BLOCK_ROWS, self.capacity - len(self.blocks) * self.BLOCK_ROWS)
            self.blocks.append(torch.empty((rows, self.dim), device=self.device, dtype=self.dtype))
        self[index].copy_(vector)

    def _leading(self, size: int) -> list[torch.Tensor]:
        """The first ``size`` rows, as contiguous views of the blocks."""
        return [
            block[: min(self.BLOCK_ROWS, size - start)]
            for start, block in zip(range(0, size, self.BLOCK_ROWS), self.blocks, strict=False)
        ]

    def combine(self, size: int, coefficients: torch.Tensor) -> torch.Tensor:
        """``Qᵀ c`` over the first ``size`` rows: a vector, or a block for a (size, k) c."""
        total, offset = None, 0
        for rows in self._leading(size):
            part = rows.mT @ coefficients[offset : offset + rows.shape[0]]
            total = part if total is None else total + part
            offset += rows.shape[0]
        assert total is not None
        return total

    def project_out(self, size: int, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``vector`` minus its components on the first ``size`` rows, and those components.

        Classical Gram-Schmidt applied twice ("twice is enough"): one matrix-vector product
        per block and pass keeps it fast on a GPU, and the second pass restores
        orthogonality to working precision.
        """
        total = None
        for _ in range(2):
            coefficients = torch.cat([rows @ vector for rows in self._leading(size)])
            vector = vector - self.combine(size, coefficients)
            total = coefficients if total is None else total + coefficients
        assert total is not None
        return vector, total


@dataclass(frozen=True)
class _Tridiagonal:
    """The output of the Lanczos process: the basis and T's coefficients on the host."""

    basis: _Basis  # its first m rows are the Lanczos vectors, on the device
    alpha: np.ndarray  # (m,) diagonal of T
    beta: np.ndarray  # (m,) beta[i] couples q_i and q_{i+1}; beta[m-1] is the residual norm
    num_matvecs: int


def lanczos_tridiagonal(
    op: LinearOperator,
    start: torch.Tensor,
    max_iters: int,
    generator: torch.Generator,
    *,
    restart_on_breakdown: bool,
    is_converged: Callable[[np.ndarray, np.ndarray], bool] | None = None,
    first_check: int = CHECK_EVERY,
) -> _Tridiagonal:
    """Run up to ``max_iters`` Lanczos steps with full re-orthogonalisation.

    Without re-orthogonalisation, rounding errors make converged Ritz vectors reappear in
    the basis and Lanczos reports "ghost" copies of λmax. Keeping the whole basis and
    orthogonalising each new vector against it costs ``O(dim·m)`` per step, negligible next
    to a Hessian-vector product.

    A breakdown (``beta`` ≈ 0) means the Krylov space is invariant. For eigenvalues
    (``restart_on_breakdown=True``) the process continues from a fresh random vector
    orthogonal to the basis, with a zero coupling, so repeated eigenvalues are still found;
    for quadrature it stops, because the quadrature measure belongs to the start vector.
    Breakdowns are detected at the periodic host checks and the steps after one are
    discarded, so the loop itself never waits on the host.
    """
    dim, device, dtype = op.dim, op.device, op.dtype
    max_iters = min(max_iters, dim)
    basis = _Basis(dim, device, dtype, capacity=max_iters)
    alpha = torch.zeros(max_iters, device=device, dtype=dtype)
    beta = torch.zeros(max_iters, device=device, dtype=dtype)
    basis[0] = start / torch.linalg.vector_norm(start)
    breakdown_threshold = 1e3 * torch.finfo(dtype).eps

    size, num_matvecs, next_check, checked = 0, 0, first_check, 0
    while size < max_iters:
        q = basis[size]
        w = op.matvec(q)
        num_matvecs += 1
        w, coefficients = basis.project_out(size + 1, w)
        alpha[size] = coefficients[size]
        norm = torch.linalg.vector_norm(w)
        beta[size] = norm
        size += 1
        if size < max_iters:
            basis[size] = w / norm
        if size < next_check and size < max_iters:
            continue

        # One host sync: the tridiagonal so far.
        next_check = size + CHECK_EVERY
        a = alpha[:size].double().cpu().numpy()
        b = beta[:size].double().cpu().numpy()
        scale = max(
            np.nanmax(np.abs(a[np.isfinite(a)]), initial=0.0),
            np.nanmax(np.abs(b[np.isfinite(b)]), initial=0.0),
        )
        tiny = breakdown_threshold * max(scale, np.finfo(np.float64).tiny)
        broken = np.flatnonzero(~(b[checked:] > tiny))  # NaN counts as broken too
        if broken.size:
            cut = checked + int(broken[0]) + 1
            raise_if_not_finite(
                torch.from_numpy(np.concatenate([a[:cut], b[: cut - 1]])), "Lanczos"
            )
            size = cut
            beta[size - 1] = 0.0
            if not restart_on_breakdown or size >= max_iters:
                break
            fresh = random_unit_vectors(op, 1, generator)[:, 0]
            fresh, _ = basis.project_out(size, fresh)
            basis[size] = fresh / torch.linalg.vector_norm(fresh)
            checked = size
            next_check = size + CHECK_EVERY
            continue
        raise_if_not_finite(torch.from_numpy(np.concatenate([a, b])), "Lanczos")
        checked = size
        if is_converged is not None and is_converged(a, b):
            break

    a = alpha[:size].double().cpu().numpy()
    b = beta[:size].double().cpu().numpy()
    return _Tridiagonal(basis=basis, alpha=a, beta=b, num_matvecs=num_matvecs)


def _ritz(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of the tridiagonal, ascending."""
    if alpha.size == 1:
        return alpha.copy(), np.ones((1, 1))
    return eigh_tridiagonal(alpha, beta[:-1])


def _wanted(num_ritz: int, k: int, which: Which) -> np.ndarray:
    k = min(k, num_ritz)
    if which == "largest":
        return np.arange(num_ritz - 1, num_ritz - 1 - k, -1)
    return np.arange(k)


def _evidence(
    theta: np.ndarray, vectors: np.ndarray, residual_norm: float, wanted: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Residuals and error bounds ``min(r, r²/gap)`` of the wanted Ritz pairs."""
    residuals = np.abs(residual_norm * vectors[-1, wanted])
    gaps = np.full(wanted.shape, np.inf)
    for slot, index in enumerate(wanted):
        others = np.delete(theta, index)
        if others.size:
            gaps[slot] = np.min(np.abs(others - theta[index]))
    with np.errstate(divide="ignore", invalid="ignore"):
        bounds = np.minimum(residuals, np.where(gaps > 0, residuals**2 / gaps, np.inf))
    return residuals, bounds


def _spectral_scale(theta: np.ndarray) -> float:
    return max(float(np.max(np.abs(theta))), np.finfo(np.float64).tiny)


def guard_ritz_values(k: int) -> int:
    """Extra Ritz values that must converge before the top ``k`` are trusted.

    By interlacing, the i-th Ritz value never exceeds the i-th eigenvalue, but an
    eigenvalue inside the top ``k`` whose direction the Krylov space has not picked up yet
    is simply missing, while its neighbours already look converged (seen on a small CNN:
    the 4th of the top 5 was absent after 18 steps). Waiting until a few Ritz values beyond
    the ``k``-th have converged too gives it time to appear. λmax alone (``k == 1``) needs
    no guard: it is the first to converge from any random start.
    """
    return 0 if k == 1 else max(2, k // 2)


def default_num_iters(k: int) -> int:
    """Enough steps for the top ``k`` of a typical network Hessian; convergence stops earlier."""
    return 30 + 10 * k


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
) -> LanczosResult:
    """The ``k`` largest (or smallest) algebraic eigenvalues of a symmetric operator.

    Args:
        op: anything with ``matvec(v)``, ``dim``, ``device`` and ``dtype``.
        k: how many eigenvalues to return.
        num_iters: the most Lanczos steps (operator applications, barring breakdowns); the
            default ``30 + 10·k`` is capped at ``op.dim``. The basis holds ``dim × num_iters``
            numbers on the device.
        tol: stop when the error bound of every wanted eigenvalue (and of a few guard Ritz
            values beyond them, see :func:`guard_ritz_values`) is below ``tol`` times the
            largest Ritz value in magnitude (a relative accuracy for λmax); ``0`` runs all
            ``num_iters`` steps.
        seed: seeds the random start vector; the global RNG is never touched.
        which: ``"largest"`` (top of the spectrum, λmax first) or ``"smallest"`` (the most
            negative curvature first).
        return_eigenvectors: also return the Ritz vectors, (dim, k) on the device.
        init: a warm start: a vector, or a (dim, r) block of previous eigenvectors whose
            span is mixed into the start vector, so a slowly moving eigenspace converges
            in fewer steps.

    Returns:
        A :class:`LanczosResult`. ``converged`` is False when ``num_iters`` ran out first.
    """
    check_operator(op)
    check_positive_int("k", k)
    if k > op.dim:
        raise ValueError(f"k must be at most op.dim={op.dim}, got {k}")
    if num_iters is None:
        num_iters = default_num_iters(k)
    check_positive_int("num_iters", num_iters)
    if num_iters < k:
        raise ValueError(f"num_iters must be at least k={k}, got {num_iters}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")

    generator = make_generator(op, seed)
    start = random_unit_vectors(op, 1, generator)[:, 0]
    if init is not None:
        start = _warm_start(op, init, start)

    guards = min(k + guard_ritz_values(k), op.dim) - k
    # Guards need only be located, not resolved: a looser bound keeps the cost low when
    # they sit in a continuous bulk.
    guard_tol = max(tol, tol**0.5)

    def is_converged(alpha: np.ndarray, beta: np.ndarray) -> bool:
        if alpha.size < k + guards:
            return False
        theta, vectors = _ritz(alpha, beta)
        scale = _spectral_scale(theta)
        indices = _wanted(theta.size, k + guards, which)
        _, bounds = _evidence(theta, vectors, beta[-1], indices)
        return bool(np.all(bounds[:k] <= tol * scale) and np.all(bounds[k:] <= guard_tol * scale))

    tri = lanczos_tridiagonal(
        op,
        start,
        num_iters,
        generator,
        restart_on_breakdown=True,
        is_converged=is_converged,
        first_check=max(k + 1, CHECK_EVERY),
    )
    theta, vectors = _ritz(tri.alpha, tri.beta)
    wanted = _wanted(theta.size, k, which)
    residuals, bounds = _evidence(theta, vectors, tri.beta[-1], wanted)
    converged = tri.alpha.size == op.dim or is_converged(tri.alpha, tri.beta)
    eigenvectors = None
    if return_eigenvectors:
        coefficients = torch.from_numpy(np.ascontiguousarray(vectors[:, wanted]))
        eigenvectors = tri.basis.combine(
            tri.alpha.size, coefficients.to(device=op.device, dtype=op.dtype)
        )
    return LanczosResult(
        eigenvalues=torch.from_numpy(theta[wanted].copy()),
        eigenvectors=eigenvectors,
        residuals=torch.from_numpy(residuals),
        error_bounds=torch.from_numpy(bounds),
        ritz_values=torch.from_numpy(theta.copy()),
        which=which,
        num_iters=int(tri.alpha.size),
        num_matvecs=tri.num_matvecs,
        converged=converged,
    )


def _warm_start(op: LinearOperator, init: torch.Tensor, random_start: torch.Tensor) -> torch.Tensor:
    if not isinstance(init, torch.Tensor) or init.shape[0] != op.dim or init.ndim not in (1, 2):
        shape = tuple(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__
        raise ValueError(f"init must be a ({op.dim},) vector or ({op.dim}, r) block, got {shape}")
    block = init.to(device=op.device, dtype=op.dtype).reshape(op.dim, -1)
    block = block / torch.linalg.vector_norm(block, dim=0, keepdim=True).clamp_min(1e-30)
    combined = block.sum(dim=1)
    combined = combined / torch.linalg.vector_norm(combined).clamp_min(1e-30)
    # A little of a random direction keeps every eigenvector reachable, in case the
    # previous eigenspace is (nearly) invariant and misses a newly grown direction.
    return combined + 0.1 * random_start


@dataclass(frozen=True, eq=False)
class SpectralDensity:
    """Stochastic Lanczos quadrature of the Hessian's spectral density.

    Each run ``r`` gives Gauss quadrature nodes ``nodes[r]`` (Ritz values) and weights
    ``weights[r]`` (squared first components of the Ritz vectors, summing to 1); padding
    slots, after an early breakdown, have weight 0. Averaged over runs, the weighted nodes
    approximate the normalised spectral measure ``(1/dim)·Σ δ(λ - λ_i)``. ``density`` is
    that measure smoothed by a Gaussian of width ``sigma`` on ``grid``; it integrates to 1.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    grid: torch.Tensor
    density: torch.Tensor
    sigma: float
    num_runs: int
    num_iters: int
    num_matvecs: int

    @property
    def lambda_max(self) -> float:
        """The largest quadrature node: an estimate of λmax."""
        return float(self.nodes[self.weights > 0].max())

    @property
    def lambda_min(self) -> float:
        return float(self.nodes[self.weights > 0].min())


def smoothed_density(
    nodes: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor, sigma: float
) -> torch.Tensor:
    """Gaussian-smoothed mixture of the quadrature rules, averaged over runs."""
    kernel = torch.exp(-0.5 * ((grid[:, None, None] - nodes[None]) / sigma) ** 2)
    kernel = kernel / (sigma * np.sqrt(2 * np.pi))
    return (kernel * weights[None]).sum(dim=(1, 2)) / nodes.shape[0]


def spectral_density(
    op: LinearOperator,
    num_runs: int = 10,
    num_iters: int = 80,
    seed: int = 0,
    *,
    grid_size: int = 512,
    sigma: float | None = None,
) -> SpectralDensity:
    """Spectral density by stochastic Lanczos quadrature (SLQ).

    Args:
        op: the operator.
        num_runs: independent Rademacher start vectors; more runs average out the
            start-vector noise in the weights.
        num_iters: Lanczos steps per run (quadrature nodes per run), capped at ``op.dim``.
        seed: seeds the start vectors.
        grid_size: points of the smoothed density's grid.
        sigma: width of the Gaussian smoothing; by default 1% of the spectral range.
    """
    check_operator(op)
    check_positive_int("num_runs", num_runs)
    check_positive_int("num_iters", num_iters)
    check_positive_int("grid_size", grid_size, minimum=2)
    if sigma is not None:
        sigma = check_positive_float("sigma", sigma)
    generator = make_generator(op, seed)
    runs, num_matvecs = [], 0
    for _ in range(num_runs):
        bits = torch.randint(0, 2, (op.dim,), generator=generator, device=op.device)
        tri = lanczos_tridiagonal(
            op,
            (bits * 2 - 1).to(op.dtype),
            num_iters,
            generator,
            restart_on_breakdown=False,
        )
        theta, vectors = _ritz(tri.alpha, tri.beta)
        runs.append((theta, vectors[0] ** 2))
        num_matvecs += tri.num_matvecs
    width = max(theta.size for theta, _ in runs)
    nodes = np.zeros((num_runs, width))
    weights = np.zeros((num_runs, width))
    for r, (theta, w) in enumerate(runs):
        nodes[r, : theta.size], weights[r, : theta.size] = theta, w
        nodes[r, theta.size :] = theta[-1]
    nodes_t, weights_t = torch.from_numpy(nodes), torch.from_numpy(weights)
    low, high = float(nodes.min()), float(nodes.max())
    spread = max(high - low, 1e-12 * max(abs(low), abs(high), 1.0))
    if sigma is None:
        sigma = 0.01 * spread
    grid = torch.linspace(low - 5 * sigma, high + 5 * sigma, grid_size, dtype=torch.float64)
    return SpectralDensity(
        nodes=nodes_t,
        weights=weights_t,
        grid=grid,
        density=smoothed_density(nodes_t, weights_t, grid, sigma),
        sigma=float(sigma),
        num_runs=num_runs,
        num_iters=width,
        num_matvecs=num_matvecs,
    )
