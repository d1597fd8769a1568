r"""Inverse-curvature products: solve :math:`(A + \varepsilon I)\,x = b` matrix-free.

The damped system is solved with Krylov methods that see only products with ``A`` (an
operator with ``dim``, ``device``, ``dtype`` and ``matvec``; ``matmat`` is used for several
right-hand sides at once, as one block product per iteration):

- **MINRES** (Paige & Saunders 1975) for a symmetric, possibly *indefinite* ``A + εI``: the
  Hessian away from a minimum. Each iterate minimises ``‖(A + εI)x − b‖`` over the Krylov
  space, so the residual never grows.
- **CG** for a positive-definite ``A + εI``: the GGN or Fisher, or a Hessian damped past
  its most negative eigenvalue. CG needs ``pᵀ(A + εI)p > 0`` for every search direction;
  when it meets ``pᵀ(A + εI)p ≤ 0`` the system is not positive definite, CG stops there
  (its iterate is then not a solution) and the result says so in ``negative_curvature``.

The residual a Krylov recurrence reports drifts from the true one in finite precision, so
the result carries the *true* relative residual ``‖(A + εI)x − b‖/‖b‖``, recomputed with one
extra product at the end. When the recurrence says "converged" but the true residual is
above ``tol``, the solve restarts from ``x`` on the true residual (iterative refinement), at
most :data:`MAX_RESTARTS` times.

All vectors stay on the operator's device. On a GPU convergence is checked every
``check_every`` iterations (one small host sync each time), never per iteration.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from lightning_curvature._checks import check_int, check_number
from lightning_curvature.linear_operator import LinearOperator, apply_block, check_operator

SolveMethod = Literal["minres", "cg"]

# Restarts on the true residual when the recurrence's estimate has drifted below tol.
MAX_RESTARTS = 3
# Iterations between convergence checks on an accelerator: each check is one host sync.
GPU_CHECK_EVERY = 10


@dataclass(frozen=True, eq=False)
class SolveResult:
    """The solution of ``(A + εI) x = b`` with its evidence.

    Attributes:
        x: the solution, shaped like ``b`` ((dim,) or (dim, m)), on the operator's device.
        relative_residual: the largest over right-hand sides of the true relative residual
            ``‖(A + εI)x − b‖/‖b‖``, recomputed from ``x`` (0 for a zero right-hand side).
        relative_residuals: the same, one per right-hand side (a tuple of ``m`` floats).
        iterations: Krylov iterations run (restarts included); one block product each.
        num_matvecs: operator applications, counting each column of a block (the final
            residual check included).
        converged: every true relative residual is at most ``tol``.
        method: ``"minres"`` or ``"cg"``.
        damping: the ε that was added.
        negative_curvature: CG met a direction with ``pᵀ(A + εI)p ≤ 0``: the system is not
            positive definite and ``x`` is not its solution (always False for MINRES).
        message: what happened, in words.
    """

    x: torch.Tensor
    relative_residual: float
    relative_residuals: tuple[float, ...]
    iterations: int
    num_matvecs: int
    converged: bool
    method: str
    damping: float
    negative_curvature: bool
    message: str


def solve(
    op: LinearOperator,
    b: torch.Tensor,
    damping: float = 1e-3,
    tol: float = 1e-6,
    max_iters: int | None = None,
    method: SolveMethod = "minres",
    *,
    check_every: int | None = None,
) -> SolveResult:
    r"""Solve ``(A + εI) x = b`` with MINRES or CG on products with ``A``.

    Args:
        op: a symmetric operator: ``dim``, ``device``, ``dtype``, ``matvec(v)`` and,
            optionally, ``matmat(V)`` (used for several right-hand sides at once).
        b: the right-hand side, shape ``(dim,)`` or ``(dim, m)`` for ``m`` systems that
            share ``A`` (solved together, one block product per iteration).
        damping: ε ≥ 0, added to the diagonal.
        tol: the target true relative residual ``‖(A + εI)x − b‖/‖b‖``, in (0, 1).
        max_iters: the most Krylov iterations in all; ``None`` means ``2·dim`` (exact
            arithmetic needs at most ``dim``). Set it for large models.
        method: ``"minres"`` (symmetric, indefinite allowed) or ``"cg"`` (positive
            definite; reports negative curvature).
        check_every: iterations between convergence checks; ``None`` means every
            iteration on CPU and every :data:`GPU_CHECK_EVERY` on an accelerator.

    Returns:
        A :class:`SolveResult`.

    Raises:
        ValueError: bad arguments (named, with the value and what is allowed).
        FloatingPointError: the operator returned NaN or inf.

    Example::

        >>> import torch, lightning_curvature as lc
        >>> H = torch.tensor([[2.0, 1.0], [1.0, -3.0]], dtype=torch.float64)
        >>> res = lc.solve(lc.DenseOperator(H), torch.ones(2, dtype=torch.float64), damping=0.0)
        >>> torch.allclose(H @ res.x, torch.ones(2, dtype=torch.float64)), res.converged
        (True, True)
    """
    check_operator(op)
    if method not in ("minres", "cg"):
        raise ValueError(f"method must be 'minres' or 'cg', got {method!r}")
    damping = check_number("damping", damping, at_least=0.0)
    tol = check_number("tol", tol, above=0.0)
    if tol >= 1.0:
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    max_iters = 2 * int(op.dim) if max_iters is None else check_int("max_iters", max_iters, 1)
    device = torch.device(op.device)
    if check_every is None:
        check_every = 1 if device.type == "cpu" else GPU_CHECK_EVERY
    check_every = check_int("check_every", check_every, 1)
    rhs = _check_rhs(b, op)

    system = _DampedSystem(op, damping)
    step = _minres if method == "minres" else _cg
    x = torch.zeros_like(rhs)
    residual = rhs
    rhs_norm = torch.linalg.vector_norm(rhs, dim=0)
    iterations, negative = 0, False
    relative = _relative(residual, rhs_norm)
    for _ in range(MAX_RESTARTS + 1):
        budget = max_iters - iterations
        if budget <= 0:
            break
        correction, used, negative = step(system, residual, tol * rhs_norm, budget, check_every)
        iterations += used
        candidate = x + correction
        candidate_residual = rhs - system(candidate)
        candidate_relative = _relative(candidate_residual, rhs_norm)
        # A recurrence that broke down in finite precision can return a worse iterate
        # than it started from: keep the better one, column by column.
        better = ~(candidate_relative > relative)
        x = torch.where(better, candidate, x)
        residual = torch.where(better, candidate_residual, residual)
        relative = torch.where(better, candidate_relative, relative)
        if negative or bool((relative <= tol).all()):
            break
    relative = relative.double().cpu()
    _raise_if_not_finite(relative)
    worst = float(relative.max())
    converged = (not negative) and worst <= tol
    message = _message(method, converged, negative, worst, tol, iterations, max_iters)
    if negative:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return SolveResult(
        x=x[:, 0] if b.ndim == 1 else x,
        relative_residual=worst,
        relative_residuals=tuple(float(r) for r in relative),
        iterations=iterations,
        num_matvecs=system.num_matvecs,
        converged=converged,
        method=method,
        damping=damping,
        negative_curvature=negative,
        message=message,
    )


class _DampedSystem:
    """``V ↦ (A + εI)V`` on (dim, m) blocks, counting operator applications."""

    def __init__(self, op: LinearOperator, damping: float) -> None:
        self.op, self.damping, self.num_matvecs = op, damping, 0

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += block.shape[1]
        product = apply_block(self.op, block)
        return product + self.damping * block if self.damping else product


def _minres(
    system: _DampedSystem,
    b: torch.Tensor,
    stop_at: torch.Tensor,
    max_iters: int,
    check_every: int,
) -> tuple[torch.Tensor, int, bool]:
    """MINRES from x = 0, column by column in lockstep; the recurrence of scipy's minres.

    ``stop_at`` holds each column's absolute residual target. A column whose Krylov space
    is exhausted (β = 0) has φ̄ = 0 from then on, so its iterate no longer moves.
    """
    tiny = torch.finfo(b.dtype).tiny
    beta1 = torch.linalg.vector_norm(b, dim=0)
    x = torch.zeros_like(b)
    if not bool((beta1 > stop_at).any()):
        return x, 0, False
    zeros = torch.zeros_like(beta1)
    r1, r2, y = b, b, b
    beta, old_beta = beta1, zeros
    dbar, epsilon, phibar = zeros, zeros, beta1
    cs, sn = -torch.ones_like(beta1), zeros
    w, w2 = torch.zeros_like(b), torch.zeros_like(b)
    iteration = 0
    while iteration < max_iters:
        iteration += 1
        safe_beta = torch.where(beta > tiny, beta, torch.ones_like(beta))
        v = y / safe_beta
        y = system(v)
        if iteration >= 2:
            y = y - (beta / torch.where(old_beta > tiny, old_beta, 1.0)) * r1
        alpha = (v * y).sum(dim=0)
        y = y - (alpha / safe_beta) * r2
        r1, r2 = r2, y
        old_beta, beta = beta, torch.linalg.vector_norm(r2, dim=0)
        old_epsilon = epsilon
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        epsilon = sn * beta
        dbar = -cs * beta
        gamma = torch.sqrt(gbar**2 + beta**2).clamp_min(tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = (v - old_epsilon * w1 - delta * w2) / gamma
        x = x + phi * w
        if iteration % check_every == 0 or iteration == max_iters:
            if not bool(torch.isfinite(phibar).all()):
                _raise_if_not_finite(phibar)
            if bool((phibar <= stop_at).all()):
                break
    return x, iteration, False


def _cg(
    system: _DampedSystem,
    b: torch.Tensor,
    stop_at: torch.Tensor,
    max_iters: int,
    check_every: int,
) -> tuple[torch.Tensor, int, bool]:
    """Conjugate gradients from x = 0, columns in lockstep; a column that meets
    ``pᵀAp ≤ 0`` (or has converged) is frozen by a mask, without a host sync."""
    x = torch.zeros_like(b)
    r = b
    p = r
    rr = (r * r).sum(dim=0)
    active = rr.sqrt() > stop_at
    negative = torch.zeros_like(active)
    iteration = 0
    if not bool(active.any()):
        return x, 0, False
    while iteration < max_iters:
        iteration += 1
        ap = system(p)
        curvature = (p * ap).sum(dim=0)
        negative = negative | (active & (curvature <= 0))
        active = active & ~negative
        alpha = torch.where(active, rr / torch.where(active, curvature, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = (r * r).sum(dim=0)
        active = active & (rr_new.sqrt() > stop_at)
        p = r + torch.where(active, rr_new / torch.where(rr > 0, rr, 1.0), 0.0) * p
        rr = rr_new
        if iteration % check_every == 0 or iteration == max_iters:
            _raise_if_not_finite(rr)
            if not bool(active.any()):
                break
    return x, iteration, bool(negative.any())


def _check_rhs(b: object, op: LinearOperator) -> torch.Tensor:
    if not isinstance(b, torch.Tensor) or b.ndim not in (1, 2) or b.shape[0] != op.dim:
        shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
        raise ValueError(f"b must be a tensor of shape ({op.dim},) or ({op.dim}, m), got {shape}")
    if b.ndim == 2 and b.shape[1] == 0:
        raise ValueError(f"b must have at least one column, got shape {tuple(b.shape)}")
    if not b.is_floating_point():
        raise ValueError(f"b must be a floating-point tensor, got dtype {b.dtype}")
    if not bool(torch.isfinite(b).all()):
        raise ValueError("b must be finite, got NaN or inf entries")
    b = b.to(device=op.device, dtype=op.dtype)
    return b[:, None] if b.ndim == 1 else b


def _relative(residual: torch.Tensor, rhs_norm: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(residual, dim=0)
    return torch.where(rhs_norm > 0, norm / torch.where(rhs_norm > 0, rhs_norm, 1.0), norm)


def _raise_if_not_finite(values: torch.Tensor) -> None:
    if not bool(torch.isfinite(values).all()):
        raise FloatingPointError(
            "the operator returned NaN or inf during the solve: check the loss and its "
            "Hessian-vector products on these batches, or use float64"
        )


def _message(
    method: str,
    converged: bool,
    negative: bool,
    worst: float,
    tol: float,
    iterations: int,
    max_iters: int,
) -> str:
    if negative:
        return (
            f"CG met negative curvature (pᵀ(A + εI)p ≤ 0) after {iterations} iterations: "
            "A + εI is not positive definite, so x is not its solution (relative residual "
            f"{worst:.3g}); use method='minres' or a damping above -λmin"
        )
    if converged:
        return f"{method} converged in {iterations} iterations (relative residual {worst:.3g})"
    return (
        f"{method} did not reach tol={tol:g} in {iterations} iterations (max_iters="
        f"{max_iters}); true relative residual {worst:.3g}: raise max_iters or the damping"
    )
