"""Power iteration: the eigenvalue of largest magnitude.

Power iteration converges to the eigenvalue of largest *magnitude*, which is λmin when the
Hessian has a negative eigenvalue larger in size than λmax. It needs many more matvecs than
Lanczos for the same accuracy (its error shrinks like ``(λ2/λ1)^(2t)``); it is here as the
simple, well-known reference. Use :func:`~lightning_curvature.lanczos` for λmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_curvature.estimators._common import (
    ACCELERATOR_CHECK_EVERY,
    LinearOperator,
    check_every,
    check_operator,
    check_positive_float,
    check_positive_int,
    inner,
    make_generator,
    norms,
    raise_if_not_finite,
    random_unit_vectors,
)

# Convergence compares the Rayleigh quotient with its value this many iterations earlier,
# on every device; checks run every iteration on the CPU and every few on accelerators
# (the same period as Lanczos), so results do not depend on the device.
CHECK_SPAN = ACCELERATOR_CHECK_EVERY


@dataclass(frozen=True, eq=False)
class PowerIterationResult:
    """The dominant eigenpair found by power iteration.

    Attributes:
        eigenvalue: the Rayleigh quotient of the final vector: the eigenvalue of largest
            magnitude (it can be negative).
        eigenvector: the final unit vector, on the operator's device.
        residual: ``‖A v - λ v‖`` of the final vector.
        kind: always ``"largest_magnitude"``, to say what was estimated.
        num_iters: iterations run; num_matvecs: operator applications (one per iteration).
        converged: the Rayleigh quotient changed by at most ``tol`` (relative) over the
            last ``CHECK_SPAN`` iterations.
    """

    eigenvalue: float
    eigenvector: torch.Tensor
    residual: float
    kind: str
    num_iters: int
    num_matvecs: int
    converged: bool


def power_iteration(
    op: LinearOperator,
    num_iters: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    *,
    init: torch.Tensor | None = None,
) -> PowerIterationResult:
    """Estimate the eigenvalue of largest magnitude of a symmetric operator.

    Args:
        op: anything with ``matvec(v)``, ``dim``, ``device`` and ``dtype``.
        num_iters: the most iterations (one matvec each).
        tol: stop when the Rayleigh quotient's relative change between checks is below it.
        seed: seeds the random start vector; the global RNG is never touched.
        init: an optional start vector (a warm start).
    """
    check_operator(op)
    check_positive_int("num_iters", num_iters)
    tol = check_positive_float("tol", tol)
    if init is None:
        v = random_unit_vectors(op, 1, make_generator(op, seed))[:, 0]
    else:
        if not isinstance(init, torch.Tensor) or tuple(init.shape) != (op.dim,):
            raise ValueError(f"init must be a vector of shape ({op.dim},)")
        v = init.to(device=op.device, dtype=op.dtype)
        v = v / norms(op, v)

    period = check_every(op.device)
    history: dict[int, float] = {}
    converged, iters = False, 0
    for iters in range(1, num_iters + 1):
        w = op.matvec(v)
        rayleigh = inner(op, v, w)
        if iters % period == 0 or iters == num_iters:
            raise_if_not_finite(w, "power iteration")
            current = history[iters] = float(rayleigh)  # the one host sync of this check
            earlier = history.get(iters - CHECK_SPAN)
            converged = earlier is not None and abs(current - earlier) <= tol * abs(current)
        if converged or iters == num_iters:
            break
        v = w / norms(op, w)
    residual = float(norms(op, w - rayleigh * v))
    return PowerIterationResult(
        eigenvalue=float(rayleigh),
        eigenvector=v,
        residual=residual,
        kind="largest_magnitude",
        num_iters=iters,
        num_matvecs=iters,
        converged=converged,
    )
