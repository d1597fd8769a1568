"""When a Lanczos run's Ritz values are trusted: which Ritz values are wanted, their error
bounds (the residual plus the products' rounding floor), the guard Ritz values that must be
located too, and the convergence test built on them (see :mod:`.lanczos` for the run)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from lightning_curvature.estimators._projection import Projection

Which = Literal["largest", "smallest"]


def wanted_indices(num_ritz: int, count: int, which: Which) -> np.ndarray:
    """Positions of the ``count`` wanted Ritz values in the ascending order, best first."""
    count = min(count, num_ritz)
    if which == "largest":
        return np.arange(num_ritz - 1, num_ritz - 1 - count, -1)
    return np.arange(count)


def error_bounds(
    theta: np.ndarray,
    residuals: np.ndarray,
    indices: np.ndarray,
    floor: float | np.ndarray = 0.0,
) -> np.ndarray:
    """The error bound of each Ritz value at ``indices``: its residual norm ``r`` plus the
    products' rounding ``floor`` (:meth:`~._projection.Projection.rounding_floor`): below the
    rounding, a residual certifies nothing (a float32 run can read 1e-20 while its Ritz
    value is off by 1e-7 of the scale, or by 1e-4 near a minimum).

    ``r`` bounds the distance to the nearest eigenvalue whatever the rest of the spectrum.
    The sharper Kato–Temple bound ``r²/gap`` needs a gap to the *other eigenvalues*, and
    the Ritz values cannot certify one: they under-represent clusters (a Ritz value inside
    a dense cluster has neighbours far away while eigenvalues sit right next to it), and an
    eigenvalue between two Ritz values can be missing altogether (seen with 4 steps: a
    neighbour at 39 with a small residual while the eigenvalue 60 was not yet found; and
    after 6 steps, Ritz values converged near 10 and 8 with the eigenvalue 9 missing, so
    even a resolved neighbour certifies nothing).
    """
    bounds: np.ndarray = residuals[indices].astype(np.float64) + floor
    return bounds


def spectral_scale(theta: np.ndarray) -> float:
    return max(float(np.max(np.abs(theta))), float(np.finfo(np.float64).tiny))


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


def evidence(projection: Projection, count: int, which: Which) -> tuple[np.ndarray, ...]:
    """Ritz values, vectors and residuals; the ``count`` wanted positions, their error
    bounds and rounding floors."""
    theta, vectors, residuals = projection.ritz()
    indices = wanted_indices(theta.size, count, which)
    floor = projection.rounding_floor(theta, vectors)[indices]
    bounds = error_bounds(theta, residuals, indices, floor)
    return theta, vectors, residuals, indices, bounds, floor


class Convergence:
    """Whether a projection has the ``k`` wanted eigenvalues to ``tol`` (of the spectral
    scale), with ``guards`` more located, not resolved: a looser bound keeps the cost low
    when they sit in a continuous bulk."""

    def __init__(self, k: int, guards: int, tol: float, which: Which, dim: int) -> None:
        self.k, self.guards, self.tol, self.which, self.dim = k, guards, tol, which, dim
        self.guard_tol = max(tol, tol**0.5)
        self._last: tuple[Projection, bool] | None = None  # the result asks again

    def __call__(self, projection: Projection) -> bool:
        if self._last is None or self._last[0] is not projection:
            self._last = (projection, self._judge(projection))
        return self._last[1]

    def _judge(self, projection: Projection) -> bool:
        k, tol = self.k, self.tol
        if projection.size < min(k + self.guards, self.dim):
            return False
        theta, vectors, residuals = projection.ritz()
        indices = wanted_indices(theta.size, k + self.guards, self.which)
        limit = np.where(np.arange(indices.size) < k, tol, self.guard_tol) * spectral_scale(theta)
        # The usual verdict before convergence needs no exact floor: a residual above its
        # limit and above a ceiling over any floor leaves its Ritz value unresolved.
        ceiling = projection.rounding_floor(theta, vectors, ceiling=True)[indices]
        if np.any((residuals[indices] > limit) & (residuals[indices] > ceiling)):
            return False
        floor = projection.rounding_floor(theta, vectors)[indices]
        bounds = error_bounds(theta, residuals, indices, floor)
        # A residual under the rounding floor is as resolved as the products allow (unless
        # tol=0 asks for every step).
        resolved = (bounds <= limit) | ((residuals[indices] <= floor) & (tol > 0))
        # The i-th Ritz value estimates the i-th eigenvalue only if the wanted ones stand
        # for distinct eigenvalues: their residual intervals must not overlap (rounding
        # moves copies of a repeated eigenvalue together, so the floor is left out here).
        order = np.argsort(theta[indices[:k]])
        ends, radii = theta[indices[:k]][order], residuals[indices[:k]][order]
        distinct = np.all(np.diff(ends) > radii[1:] + radii[:-1])
        return bool(np.all(resolved) and distinct)
