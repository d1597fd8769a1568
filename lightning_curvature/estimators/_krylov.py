r"""The Krylov process behind Lanczos and SLQ: an orthonormal basis and the projected matrix.

``m`` steps build an orthonormal basis :math:`Q_m` and the projected matrix
:math:`H_m = Q_m^\top A Q_m`. Started from one vector this is Lanczos and :math:`H_m` is
tridiagonal. A warm start may first *seed* the basis with ``r`` orthonormalised vectors (the
previous eigenvectors); the process then continues as Lanczos from the residual of the wanted
Ritz vectors, and :math:`H_m` has a full leading ``r``-block (Rayleigh–Ritz on the union).

Every Ritz pair :math:`(\theta, Q_m s)` has the residual
:math:`A Q_m s - \theta Q_m s = E c`, where the columns of ``E`` carry the part of
:math:`A Q_m` outside the basis (the ``r`` seed residuals, then :math:`\beta_m q_{m+1}`) and
``c`` picks the matching entries of ``s``. The process keeps ``E``'s small Gram matrix, so
every residual norm is exact and free of further products.

Residual norms certify an eigenvalue only down to the rounding of the products: in float32
a Ritz value can be off by 1e-7 of the spectral scale (far more for a network near a
minimum) while its residual reads 1e-20. Every bound therefore carries a rounding floor
measured from the run itself (see
:func:`~lightning_curvature.estimators._projection.rounding_floor`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lightning_curvature.estimators._basis import Basis, lanczos_orthogonalise
from lightning_curvature.estimators._common import (
    LinearOperator,
    apply_block,
    check_every,
    inner,
    norms,
    raise_if_not_finite,
    random_unit_vectors,
    sum_over_shards,
    total_dim,
)
from lightning_curvature.estimators._projection import BREAKDOWN_EPS, Projection
from lightning_curvature.estimators._seed_quotients import seed_rayleigh


@dataclass(frozen=True)
class KrylovRun:
    """The basis on the device, the projection on the host, and the products spent;
    ``seed_rayleigh``: computes ``sᵀAs / sᵀs`` for each seed column ``s`` as given (float64,
    host), when there were seeds."""

    basis: Basis
    projection: Projection
    num_matvecs: int
    seed_rayleigh: Callable[[], np.ndarray] | None = None


def krylov_projection(
    op: LinearOperator,
    start: torch.Tensor | None,
    max_iters: int,
    generator: torch.Generator,
    *,
    restart_on_breakdown: bool,
    seeds: torch.Tensor | None = None,
    seed_weights: Callable[[np.ndarray], np.ndarray] | None = None,
    is_converged: Callable[[Projection], bool] | None = None,
    min_steps: int = 1,
) -> KrylovRun:
    """Run up to ``max_iters`` steps (products) with full re-orthogonalisation.

    Without re-orthogonalisation, rounding makes converged Ritz vectors reappear in the
    basis and Lanczos reports "ghost" copies of λmax. Each step first removes the two
    components of the three-term recurrence, then makes one Gram-Schmidt pass over the
    whole basis, and a second only when the DGKS test asks for it (on the CPU; on an
    accelerator both passes always run, so no step waits on the host).

    ``start`` is the first Lanczos vector; None draws a random one from ``generator`` only
    if it is needed (after seeds, only when a single seed is an eigenvector).

    ``seeds`` (dim, r) start the basis (orthonormalised here, dependent columns dropped):
    one block product and a Rayleigh–Ritz step on them, which may already converge.
    Otherwise one seed keeps its place in the basis and Lanczos continues from its
    residual; a block restarts Lanczos from the combination of its Ritz vectors that
    ``seed_weights(H_r)`` names (the wanted ones).

    A breakdown (``β`` ≈ 0) means the Krylov space is invariant. With
    ``restart_on_breakdown`` the process continues from a fresh random vector orthogonal to
    the basis, so repeated eigenvalues are still found; otherwise it stops (quadrature
    belongs to its start vector). Convergence is checked every step on the CPU and every
    few on accelerators; steps after an unnoticed breakdown are discarded at the check.
    """
    process = _Process(op, max_iters, generator, restart_on_breakdown)
    if seeds is not None:
        process.seed(seeds)
    if start is not None:
        process.next_vector = start / norms(op, start)
    elif not process.num_seeds:
        process.next_vector = process.random_direction()
    if process.num_seeds:
        done = process.seeded(seed_weights, is_converged, min_steps)
        if done is not None:
            return done
    process.iterate(is_converged, min_steps)
    return process.result()


class _Process:
    """The state of one :func:`krylov_projection` run, and its phases: seeding the basis,
    the seed block's product, Lanczos steps, and the periodic check (breakdowns,
    convergence)."""

    def __init__(
        self,
        op: LinearOperator,
        max_iters: int,
        generator: torch.Generator,
        restart_on_breakdown: bool,
    ) -> None:
        self.op, self.generator = op, generator
        self.restart_on_breakdown = restart_on_breakdown
        device = op.device
        self.max_iters = max_iters = min(max_iters, total_dim(op))
        self.period = check_every(device)
        # A norm read per step (the DGKS test) is free only where checks are: on the CPU,
        # and not across shards, where each read is one more all-reduce.
        self.adaptive = self.period == 1 and total_dim(op) == op.dim
        self.basis = Basis(op, capacity=max_iters)
        # QᵀÃQ as computed: column j's coefficients above the diagonal; below it, the
        # seeds' rows (a seed's product is known on every later basis vector). The
        # projection mirrors the upper triangle; the rest measures the products' asymmetry.
        self.upper = torch.zeros((max_iters, max_iters), device=device, dtype=torch.float64)
        self.betas = torch.zeros(max_iters, device=device, dtype=torch.float64)
        self.eps = torch.finfo(op.dtype).eps
        self.tiny_relative = BREAKDOWN_EPS * self.eps  # a coupling this small vs the scale
        self.num_matvecs = 0
        self.breakdowns: list[tuple[int, float]] = []  # (column, the coupling cut there)
        # (r, dim) the seed residuals as rows (products with a row block are fast
        # matrix-vector products), orthogonal to Q.
        self.outside: torch.Tensor | None = None
        self.seed_rayleigh: Callable[[], np.ndarray] | None = None
        self.seeds: torch.Tensor | None = None  # as given, on the device and in the dtype
        self.num_seeds = 0
        self.next_vector: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None  # the last Krylov column's part outside Q
        self.known_product: torch.Tensor | None = None  # A·next_vector when already known
        self.checked = self.next_check = 0
        # The projection the last convergence test read, while no step has changed it since
        # (the result then reuses it, and the test's verdict on it).
        self.last_projection: Projection | None = None

    def seed(self, seeds: torch.Tensor) -> None:
        """Orthonormalise the seed columns into the basis, dropping dependent ones."""
        basis = self.basis
        seeds = self.seeds = seeds.to(device=self.op.device, dtype=self.op.dtype)
        for candidate in seeds.unbind(dim=1)[: self.max_iters]:
            norm = norms(self.op, candidate)
            if basis.size:
                candidate, _ = basis.project_out(candidate, adaptive=False)
            kept = norms(self.op, candidate)
            if float(kept) > 1e-3 * float(norm):
                basis.append(candidate / kept)
        self.num_seeds = basis.size

    def seeded(
        self,
        seed_weights: Callable[[np.ndarray], np.ndarray] | None,
        is_converged: Callable[[Projection], bool] | None,
        min_steps: int,
    ) -> KrylovRun | None:
        """One block product on the seeds and Rayleigh–Ritz on them: the run when that
        already converges (or fills the basis); else set up the Lanczos continuation."""
        basis, num_seeds = self.basis, self.num_seeds
        products = apply_block(self.op, basis.active.mT.contiguous())
        self.num_matvecs += num_seeds
        rows = basis.active
        coefficients = inner(self.op, rows, products)
        outside = products.mT - coefficients.mT @ rows
        second = inner(self.op, outside, rows.mT)
        self.outside = outside - second @ rows
        second = second.mT
        self.upper[:num_seeds, :num_seeds] = (coefficients + second).double()
        assert self.seeds is not None
        self.seed_rayleigh = seed_rayleigh(self.op, rows, products, self.seeds)
        seeded = self.last_projection = self.projection(num_seeds)
        if (
            is_converged is not None and num_seeds >= min_steps and is_converged(seeded)
        ) or num_seeds == self.max_iters:
            return KrylovRun(basis, seeded, self.num_matvecs, self.seed_rayleigh)
        weights = np.ones(num_seeds) if seed_weights is None else seed_weights(seeded.matrix)
        weights_t = torch.from_numpy(weights).to(device=self.op.device, dtype=self.op.dtype)
        if num_seeds == 1:
            # Lanczos from the seed: continue from its residual, keeping its product.
            direction = self.outside[0]
            if float(norms(self.op, direction)) > self.tiny_relative * float(
                self.upper[0, 0].abs()
            ):
                # The residual becomes the next basis vector whole: this is plain Lanczos
                # started at the seed (tridiagonal, nothing outside the basis to track).
                direction, _ = basis.project_out(direction, adaptive=False)
                beta = norms(self.op, direction)
                self.residual, self.betas[0], self.next_vector = direction, beta, direction / beta
                self.outside, self.num_seeds = None, 0
                return None
            # The seed is an eigenvector: go on anywhere.
            anywhere = self.next_vector
            direction = self.random_direction() if anywhere is None else anywhere
            direction, _ = basis.project_out(direction, adaptive=False)
            self.next_vector = direction / norms(self.op, direction)
        else:
            # One continuation cannot absorb r independent seed residuals (they would stay
            # outside the basis and the residual norms would stall): restart Lanczos from
            # the wanted Ritz vectors of the block, whose product is already known.
            norm = norms(self.op, basis.combine(weights_t))
            self.next_vector = basis.combine(weights_t) / norm
            self.known_product = products @ weights_t / norm
            basis.size, self.outside, self.num_seeds = 0, None, 0
            self.upper.zero_()
        return None

    def iterate(self, is_converged: Callable[[Projection], bool] | None, min_steps: int) -> None:
        """Lanczos steps until the basis is full, the products are spent, a breakdown
        stops it, or ``is_converged`` says so at a check."""
        self.checked = self.num_seeds
        self.next_check = max(min_steps, self.num_seeds + 1)
        # ``max_iters`` bounds the products too: a block restart must not spend them twice.
        while self.basis.size < self.max_iters and (
            self.num_matvecs < self.max_iters or self.known_product is not None
        ):
            size, last = self.step()
            if size < self.next_check and not last:
                continue
            if self.check(size, is_converged, min_steps):
                break

    def step(self) -> tuple[int, bool]:
        """One product and its orthogonalisation; the basis size, and whether this was the
        last step allowed."""
        basis, column, vector = self.basis, self.basis.size, self.next_vector
        assert vector is not None
        self.last_projection = None
        basis.append(vector)
        if self.outside is not None:
            seed_rows = inner(self.op, self.outside, vector)  # its row of seed products
            self.upper[column, : self.num_seeds] = seed_rows
            self.outside = torch.addr(self.outside, seed_rows, vector, alpha=-1)
        if self.known_product is None:
            w = self.op.matvec(vector)
            self.num_matvecs += 1
        else:
            w, self.known_product = self.known_product, None
        w, coefficients = lanczos_orthogonalise(basis, w, self.adaptive)
        self.upper[: column + 1, column] = coefficients
        beta = norms(self.op, w)
        self.betas[column] = beta
        self.residual, self.next_vector = w, w / beta.clamp_min(torch.finfo(w.dtype).tiny)
        size = basis.size
        spent = self.num_matvecs >= self.max_iters and self.known_product is None
        return size, size >= self.max_iters or spent

    def check(
        self, size: int, is_converged: Callable[[Projection], bool] | None, min_steps: int
    ) -> bool:
        """The periodic check, with one host transfer: cut at a breakdown (and restart or
        stop), else ask ``is_converged``. Returns whether to stop."""
        self.next_check = size + self.period
        host = _to_host(self.upper, self.betas, size)
        recent = host[size * size + self.checked :]
        scale = float(np.fmax.reduce(np.abs(host), initial=0.0))  # NaN ignored, as nanmax
        broken = np.flatnonzero(~(recent > self.tiny_relative * scale))
        if not broken.size:
            self.checked = size
            if is_converged is None or size < min_steps:
                return False
            self.last_projection = self.projection(size, host)
            return is_converged(self.last_projection)
        first = int(broken[0])
        cut = self.checked + first + 1
        if not np.isfinite(recent[: first + 1]).all():
            raise_if_not_finite(torch.from_numpy(recent), "Lanczos")
        self.breakdowns.append((cut - 1, float(recent[first])))
        self.basis.size = size = cut
        self.betas[cut - 1] = 0.0
        assert self.residual is not None
        self.residual = torch.zeros_like(self.residual)
        if not self.restart_on_breakdown or size >= self.max_iters:
            return True
        fresh, _ = self.basis.project_out(self.random_direction(), adaptive=False)
        self.next_vector = fresh / norms(self.op, fresh)
        self.checked, self.next_check = size, size + self.period
        return False

    def random_direction(self) -> torch.Tensor:
        """A unit Gaussian vector from the run's generator."""
        return random_unit_vectors(self.op, 1, self.generator)[:, 0]

    def projection(self, size: int, host: np.ndarray | None = None) -> Projection:
        """The projection after ``size`` steps; ``host`` is the check's one transfer."""
        if host is None:
            host = _to_host(self.upper, self.betas, size)
        computed = host[: size * size].reshape(size, size).copy()
        lower = _lower_triangle(size)
        matrix = computed.copy()
        matrix[lower] = computed.T[lower]  # the upper triangle, mirrored
        lanczos_columns = np.arange(self.num_seeds, size - 1)
        computed[lanczos_columns + 1, lanczos_columns] = host[size * size + lanczos_columns]
        for column, _ in self.breakdowns:
            # A restart's vectors pick up the cut coupling: q_jᵀAq_column is no longer 0,
            # and only its mirror was computed, so it measures nothing.
            computed[column + 1 :, column] = computed[column, column + 1 :]
        if self.num_seeds == 0:
            gram = np.array([[host[-1] ** 2]])
        else:
            assert self.outside is not None
            residual = self.residual if size > self.num_seeds else None
            gram = _outside_gram(self.op, self.outside, residual)
        if not np.isfinite(matrix).all():
            raise_if_not_finite(torch.from_numpy(matrix), "Lanczos")
        return Projection(
            matrix=matrix,
            outside_gram=gram,
            num_seeds=self.num_seeds,
            products=computed,
            eps=self.eps,
            breakdowns=tuple(self.breakdowns),
        )

    def result(self) -> KrylovRun:
        projection = self.last_projection
        if projection is None or projection.size != self.basis.size:
            projection = self.projection(self.basis.size)
        return KrylovRun(self.basis, projection, self.num_matvecs, self.seed_rayleigh)


def _outside_gram(
    op: LinearOperator, outside: torch.Tensor, residual: torch.Tensor | None
) -> np.ndarray:
    """The Gram matrix of the rows ``outside`` and ``residual`` (float64, host), without
    concatenating them: three small products, one reduction over shards, one transfer."""
    gram = outside @ outside.mT
    if residual is not None:
        side = outside @ residual
        corner = (residual @ residual).reshape(1, 1)
        gram = torch.cat([torch.cat([gram, side[:, None]], 1), torch.cat([side[None], corner], 1)])
    return sum_over_shards(op, gram).double().cpu().numpy()


@functools.cache
def _lower_triangle(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The indices below the diagonal of a (size, size) matrix (made once per size: a check
    reads them at every step)."""
    return np.tril_indices(size, -1)


def _to_host(upper: torch.Tensor, betas: torch.Tensor, size: int) -> np.ndarray:
    """``H``'s leading block and the couplings, flattened, in one device-to-host copy."""
    return torch.cat([upper[:size, :size].reshape(-1), betas[:size]]).cpu().numpy()
