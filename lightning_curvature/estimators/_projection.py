"""What a Krylov run's projected matrix says, on the host: the Ritz pairs, their exact
residual norms, and the rounding floor below which a residual certifies nothing (see
:mod:`~lightning_curvature.estimators._krylov` for the process that builds it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh_tridiagonal

# A breakdown: a Lanczos coupling below this many eps of the spectral scale (the Krylov
# space is invariant to rounding); the single and the blockwise process use it alike.
BREAKDOWN_EPS = 1e3

# The rounding floor's margin over the products' measured asymmetry. The symmetric part of
# their error is invisible to any product: against float64 truth, float32 eigenvalue errors
# reached up to 6.6 times the measured asymmetry on networks and logistic regressions near
# a minimum (the loss's second derivatives come out of cancellations there), and stayed
# below 0.5 times on dense matrices.
ROUNDING_MARGIN = 10.0


def rounding_floor(products: np.ndarray, scale: float, eps: float, ceiling: bool = False) -> float:
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
    With ``ceiling`` the 2-norm is bounded by the Frobenius norm: a ceiling over the floor
    at a fraction of its cost (no singular values), enough to rule a residual out.
    """
    asymmetry = 0.0
    if products.size > 1:
        asymmetry = float(np.linalg.norm(products - products.T, "fro" if ceiling else 2))
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

    def rounding_floor(
        self, theta: np.ndarray, vectors: np.ndarray, ceiling: bool = False
    ) -> np.ndarray:
        """The floor under the error bound of each Ritz pair (see :func:`rounding_floor`;
        ``ceiling``: a cheaper bound above it), plus what a breakdown's cut coupling ``β``
        adds to its residual: at most ``β·|s_column|``, ``s`` its coefficient vector."""
        products = self.matrix if self.products is None else self.products
        scale = float(np.max(np.abs(theta), initial=0.0))
        floor = np.full(theta.size, rounding_floor(products, scale, self.eps, ceiling))
        for column, beta in self.breakdowns:
            floor += beta * np.abs(vectors[column])
        return floor
