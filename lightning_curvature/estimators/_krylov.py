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
measured from the run itself (see :func:`rounding_floor`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from lightning_curvature.estimators._common import (
    LinearOperator,
    apply_block,
    check_every,
    raise_if_not_finite,
    random_unit_vectors,
)

# Daniel-Gragg-Kaufman-Stewart: a second Gram-Schmidt pass is needed when the first one
# removed more than this share of the vector's norm (cancellation magnifies rounding).
DGKS_RATIO = 2**-0.5

# The rounding floor's margin over the products' measured asymmetry. The symmetric part of
# their error is invisible to any product: against float64 truth, float32 eigenvalue errors
# reached up to 6.6 times the measured asymmetry on networks and logistic regressions near
# a minimum (the loss's second derivatives come out of cancellations there), and stayed
# below 0.5 times on dense matrices.
ROUNDING_MARGIN = 10.0


def rounding_floor(products: np.ndarray, scale: float, eps: float) -> float:
    r"""What the products' rounding can hide below a residual norm.

    ``products`` is :math:`G = Q^\top \tilde A Q` as the run computed it, :math:`\tilde A`
    the products in finite precision. For a symmetric :math:`A`, :math:`G` is symmetric in
    exact arithmetic, so :math:`\|G - G^\top\|_2` measures the products' error in the
    run's own units: the HVP's rounding, a finite-difference product's truncation, a
    float32 model's cancellations. The floor is ``ROUNDING_MARGIN · (‖G − Gᵀ‖₂ +
    eps·scale)``, the second term for the representation of ``A`` itself, ``scale`` the
    largest Ritz magnitude. It is a measured estimate with a margin, not a certificate: no
    product reveals an error that is exactly symmetric. It does not grow with the
    dimension, as the products' error on an eigenvalue does not either (float32 dense
    matrices up to 3000 × 3000 stay within 0.6·eps·scale; an a-priori ``eps·√dim`` would
    exceed ``tol=1e-4`` past 7e5 parameters, yet miss a network near a minimum whose
    float32 error is 1e-4 at 700). A run converges when its bound is within ``tol`` or its
    residual is below the floor (more steps cannot help), so float32 runs of any size
    converge, and where the products are less accurate than ``tol`` the bound says so.
    """
    asymmetry = float(np.linalg.norm(products - products.T, 2)) if products.size > 1 else 0.0
    return ROUNDING_MARGIN * (asymmetry + eps * scale)


@dataclass(frozen=True)
class Projection:
    """Rayleigh–Ritz data on the host.

    Attributes:
        matrix: (m, m) float64 symmetric ``QᵀAQ``.
        outside_gram: Gram matrix of ``E``, the columns carrying ``AQ``'s part outside the
            basis: the ``num_seeds`` seed residuals, then ``β_m q_{m+1}`` when ``m > num_seeds``.
        num_seeds: how many leading basis vectors came from a warm start.
        products: ``QᵀÃQ`` as computed, before it was made symmetric (for the floor).
        eps: the machine epsilon of the products' dtype.
        breakdowns: ``(column, β)`` for each coupling a breakdown cut: ``A q_column`` had
            a part ``β`` outside the basis then, which a later restart covers only in part.
    """

    matrix: np.ndarray
    outside_gram: np.ndarray
    num_seeds: int
    products: np.ndarray | None = None
    eps: float = 0.0
    breakdowns: tuple[tuple[int, float], ...] = ()

    @property
    def size(self) -> int:
        return int(self.matrix.shape[0])

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), their coefficient vectors, and exact residual norms."""
        if self.num_seeds == 0 and self.size > 1:
            theta, vectors = eigh_tridiagonal(
                np.diag(self.matrix).copy(), np.diag(self.matrix, 1).copy()
            )
        else:
            theta, vectors = np.linalg.eigh(self.matrix)
        rows = vectors[: self.num_seeds]
        if self.size > self.num_seeds:
            rows = np.vstack([rows, vectors[-1:]])
        squared = np.einsum("ij,ij->j", rows, self.outside_gram @ rows)
        return theta, vectors, np.sqrt(np.clip(squared, 0.0, None))

    def rounding_floor(self, theta: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """The floor under the error bound of each Ritz pair (see :func:`rounding_floor`),
        plus what a breakdown's cut coupling ``β`` adds to its residual: at most
        ``β·|s_column|``, ``s`` its coefficient vector."""
        products = self.matrix if self.products is None else self.products
        scale = float(np.max(np.abs(theta), initial=0.0))
        floor = np.full(theta.size, rounding_floor(products, scale, self.eps))
        for column, beta in self.breakdowns:
            floor += beta * np.abs(vectors[column])
        return floor


class _Basis:
    """The orthonormal vectors, one per row of one contiguous device buffer.

    The buffer starts at ``INITIAL_ROWS`` rows and doubles as steps come, so memory follows
    the steps taken (often 10-30), not the most allowed, and every Gram-Schmidt pass is one
    matrix-vector product over a contiguous block.
    """

    INITIAL_ROWS = 16

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype, capacity: int):
        self.capacity = capacity
        self.rows = torch.empty((min(self.INITIAL_ROWS, capacity), dim), device=device, dtype=dtype)
        self.size = 0

    @property
    def active(self) -> torch.Tensor:
        return self.rows[: self.size]

    def append(self, vector: torch.Tensor) -> None:
        if self.size == self.rows.shape[0]:
            grown = self.rows.new_empty((min(2 * self.size, self.capacity), self.rows.shape[1]))
            grown[: self.size] = self.rows[: self.size]
            self.rows = grown
        self.rows[self.size] = vector
        self.size += 1

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``Qᵀ c``: a vector for a (size,) ``c``, a block for a (size, k) one."""
        return self.active.mT @ coefficients.to(self.rows.dtype)

    def project_out(
        self, vector: torch.Tensor, *, adaptive: bool, reference: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``vector`` minus its components on the basis, and those components (float64).

        One classical Gram-Schmidt pass is one product with the contiguous basis each way.
        A second pass follows when the DGKS test says the first lost accuracy to
        cancellation (``adaptive``, where reading a norm costs no device sync), or always.
        ``reference`` is the norm the test compares against (default: the input's norm).
        """
        rows = self.active
        coefficients = rows @ vector
        before = torch.linalg.vector_norm(vector) if reference is None else reference
        vector = torch.addmv(vector, rows.mT, coefficients, alpha=-1)
        total = coefficients.double()
        if not adaptive or float(torch.linalg.vector_norm(vector)) < DGKS_RATIO * float(before):
            coefficients = rows @ vector
            vector = torch.addmv(vector, rows.mT, coefficients, alpha=-1)
            total = total + coefficients.double()
        return vector, total


@dataclass(frozen=True)
class KrylovRun:
    """The basis on the device, the projection on the host, and the products spent;
    ``seed_rayleigh``: ``sᵀAs / sᵀs`` for each seed column ``s`` as given (float64, host),
    when there were seeds."""

    basis: _Basis
    projection: Projection
    num_matvecs: int
    seed_rayleigh: np.ndarray | None = None


def krylov_projection(
    op: LinearOperator,
    start: torch.Tensor,
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
    dim, device, dtype = op.dim, op.device, op.dtype
    max_iters = min(max_iters, dim)
    period = check_every(device)
    adaptive = period == 1  # a host sync per step is free only where checks are
    basis = _Basis(dim, device, dtype, capacity=max_iters)
    # QᵀÃQ as computed: column j's coefficients above the diagonal; below it, the seeds'
    # rows (a seed's product is known on every later basis vector). The projection mirrors
    # the upper triangle; the rest measures the products' asymmetry.
    upper = torch.zeros((max_iters, max_iters), device=device, dtype=torch.float64)
    betas = torch.zeros(max_iters, device=device, dtype=torch.float64)
    eps = torch.finfo(dtype).eps
    tiny_relative = 1e3 * eps  # a breakdown: a coupling this small against the scale
    num_matvecs = 0
    breakdowns: list[tuple[int, float]] = []  # (column, the coupling cut there)

    outside: torch.Tensor | None = None  # (dim, r) seed residuals, kept orthogonal to Q
    seed_rayleigh: np.ndarray | None = None
    if seeds is not None:
        seeds = seeds.to(device=device, dtype=dtype)
        for candidate in seeds.unbind(dim=1)[:max_iters]:
            norm = torch.linalg.vector_norm(candidate)
            if basis.size:
                candidate, _ = basis.project_out(candidate, adaptive=False)
            if float(torch.linalg.vector_norm(candidate)) > 1e-3 * float(norm):
                basis.append(candidate / torch.linalg.vector_norm(candidate))
    num_seeds = basis.size
    next_vector = start / torch.linalg.vector_norm(start)
    residual: torch.Tensor | None = None  # the last Krylov column's part outside Q
    known_product: torch.Tensor | None = None  # A·next_vector when a warm start knows it

    def projection(size: int, host: np.ndarray | None = None) -> Projection:
        """The projection after ``size`` steps; ``host`` is the check's one transfer."""
        if host is None:
            host = _to_host(upper, betas, size)
        computed = host[: size * size].reshape(size, size).copy()
        matrix = np.triu(computed) + np.triu(computed, 1).T
        lanczos_columns = np.arange(num_seeds, size - 1)
        computed[lanczos_columns + 1, lanczos_columns] = host[size * size + lanczos_columns]
        for column, _ in breakdowns:
            # A restart's vectors pick up the cut coupling: q_jᵀAq_column is no longer 0,
            # and only its mirror was computed, so it measures nothing.
            computed[column + 1 :, column] = computed[column, column + 1 :]
        if num_seeds == 0:
            gram = np.array([[host[-1] ** 2]])
        else:
            assert outside is not None
            block = outside
            if size > num_seeds and residual is not None:
                block = torch.cat([outside, residual[:, None]], dim=1)
            gram = (block.mT @ block).double().cpu().numpy()
        raise_if_not_finite(torch.from_numpy(matrix), "Lanczos")
        return Projection(
            matrix=matrix,
            outside_gram=gram,
            num_seeds=num_seeds,
            products=computed,
            eps=eps,
            breakdowns=tuple(breakdowns),
        )

    if num_seeds:
        products = apply_block(op, basis.active.mT.contiguous())
        num_matvecs += num_seeds
        rows = basis.active
        coefficients = rows @ products
        outside = products - rows.mT @ coefficients
        second = rows @ outside
        outside = outside - rows.mT @ second
        block = (coefficients + second).double()
        upper[:num_seeds, :num_seeds] = block
        assert seeds is not None  # num_seeds > 0 only from seeds
        seed_rayleigh = _seed_rayleigh(rows, products, seeds)
        seeded = projection(num_seeds)
        if (
            is_converged is not None and num_seeds >= min_steps and is_converged(seeded)
        ) or num_seeds == max_iters:
            return KrylovRun(basis, seeded, num_matvecs, seed_rayleigh)
        weights = np.ones(num_seeds) if seed_weights is None else seed_weights(seeded.matrix)
        weights_t = torch.from_numpy(weights).to(device=device, dtype=dtype)
        if num_seeds == 1:
            # Lanczos from the seed: continue from its residual, keeping its product. The
            # residual becomes the next basis vector whole, so nothing stays outside.
            direction = outside[:, 0]
            if float(torch.linalg.vector_norm(direction)) <= tiny_relative * float(
                upper[0, 0].abs()
            ):
                direction = next_vector  # the seed is an eigenvector: go on anywhere
            direction, _ = basis.project_out(direction, adaptive=False)
            next_vector = direction / torch.linalg.vector_norm(direction)
        else:
            # One continuation cannot absorb r independent seed residuals (they would stay
            # outside the basis and the residual norms would stall): restart Lanczos from
            # the wanted Ritz vectors of the block, whose product is already known.
            norm = torch.linalg.vector_norm(basis.combine(weights_t))
            next_vector = basis.combine(weights_t) / norm
            known_product = products @ weights_t / norm
            basis.size, outside, num_seeds = 0, None, 0
            upper.zero_()

    checked = num_seeds
    next_check = max(min_steps, num_seeds + 1)
    # ``max_iters`` bounds the products too: a block restart must not spend them twice.
    while basis.size < max_iters and (num_matvecs < max_iters or known_product is not None):
        column = basis.size
        basis.append(next_vector)
        if outside is not None:
            seed_rows = next_vector @ outside  # this vector's row of the seeds' products
            upper[column, :num_seeds] = seed_rows
            outside = torch.addr(outside, next_vector, seed_rows, alpha=-1)
        if known_product is None:
            w = op.matvec(next_vector)
            num_matvecs += 1
        else:
            w, known_product = known_product, None
        w, coefficients = _lanczos_orthogonalise(basis, w, adaptive)
        upper[: column + 1, column] = coefficients
        beta = torch.linalg.vector_norm(w)
        betas[column] = beta
        residual, next_vector = w, w / beta.clamp_min(torch.finfo(dtype).tiny)
        size = basis.size
        last = size >= max_iters or (num_matvecs >= max_iters and known_product is None)
        if size < next_check and not last:
            continue

        # One host transfer: the projected matrix and the couplings, for breakdowns.
        next_check = size + period
        host = _to_host(upper, betas, size)
        recent = host[size * size + checked :]
        scale = float(np.nanmax(np.abs(host), initial=0.0))
        broken = np.flatnonzero(~(recent > tiny_relative * scale))
        if broken.size:
            cut = checked + int(broken[0]) + 1
            if not np.isfinite(recent[: int(broken[0]) + 1]).all():
                raise_if_not_finite(torch.from_numpy(recent), "Lanczos")
            breakdowns.append((cut - 1, float(recent[int(broken[0])])))
            basis.size = size = cut
            betas[cut - 1] = 0.0
            residual = torch.zeros_like(w)
            if not restart_on_breakdown or size >= max_iters:
                break
            fresh = random_unit_vectors(op, 1, generator)[:, 0]
            fresh, _ = basis.project_out(fresh, adaptive=False)
            next_vector = fresh / torch.linalg.vector_norm(fresh)
            checked, next_check = size, size + period
            continue
        checked = size
        if is_converged is not None and size >= min_steps and is_converged(projection(size, host)):
            break
    return KrylovRun(basis, projection(basis.size), num_matvecs, seed_rayleigh)


def _seed_rayleigh(rows: torch.Tensor, products: torch.Tensor, seeds: torch.Tensor) -> np.ndarray:
    """``sᵀAs / sᵀs`` for each seed column ``s``, from the block product ``A Qᵀ`` of the
    orthonormalised seeds ``rows`` alone: ``s = Qᵀc + e`` with ``c = Q s``, and
    ``sᵀAs = (Qᵀc)ᵀ A (Qᵀc)`` plus terms in ``e``, the part of ``s`` that was dropped as
    dependent (under 1e-3 of its norm), which add at most ``(2‖e‖‖s‖ + ‖e‖²)·‖A‖``.
    Columns kept in the basis have ``e`` at rounding level; a zero column gets NaN. The
    few reductions run in float64: in float32 an inner product over 85k entries rounds at
    about 2e-5: on the 85k-parameter MLP the quotients came 4e-5 off float64 truth with
    float32 reductions and 8e-6 with float64 ones (a direct float32 product: 5e-7)."""
    rows, products, seeds = rows.double(), products.double(), seeds.double()
    coefficients = rows @ seeds  # (r_kept, r_given)
    image = products @ coefficients  # A Qᵀ c, (dim, r_given)
    numerators = torch.einsum("ij,ij->j", (rows.mT @ coefficients), image)
    squares = torch.einsum("ij,ij->j", seeds, seeds)
    values = (numerators / squares).cpu().numpy()
    return np.where(squares.cpu().numpy() > 0, values, np.nan)


def _to_host(upper: torch.Tensor, betas: torch.Tensor, size: int) -> np.ndarray:
    """``H``'s leading block and the couplings, flattened, in one device-to-host copy."""
    return torch.cat([upper[:size, :size].reshape(-1), betas[:size]]).cpu().numpy()


def _lanczos_orthogonalise(
    basis: _Basis, w: torch.Tensor, adaptive: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w = A q_j`` made orthogonal to the basis, with its coefficients ``Qᵀ A q_j``.

    The three-term recurrence puts nearly all of ``w`` on ``q_j`` and ``q_{j-1}``; removing
    those first leaves only rounding for the global pass, which then rarely needs a second
    (the DGKS test, where reading a norm costs no device sync). Where it would cost one
    (accelerators) both global passes always run, and the second cleans up what the first
    leaves whatever ``w`` was, so the local pass is skipped: one fused pass over the whole
    basis, then the second.
    """
    if not adaptive:
        return basis.project_out(w, adaptive=False)
    size = basis.size
    tail = basis.rows[max(size - 2, 0) : size]
    local = tail @ w
    w = torch.addmv(w, tail.mT, local, alpha=-1)
    w, coefficients = basis.project_out(w, adaptive=adaptive)
    coefficients[max(size - 2, 0) :] += local.double()
    return w, coefficients
