r"""``analyze --solve``: the damped Newton step :math:`x = (A + \varepsilon I)^{-1} g` for
the mean gradient :math:`g` of the analyzed batches, an influence-function style solve.

The step is solved matrix-free with MINRES (:func:`lightning_curvature.solve`), which
allows an indefinite Hessian. The predicted loss decrease of the step :math:`-x` is that of
the local quadratic model :math:`L(\theta - x) \approx L - g^\top x + \tfrac12 x^\top A x`,

.. math:: \Delta = g^\top x - \tfrac12 x^\top A x ,

a prediction of the model, not a measured loss: it can be far off for a large step, and is
negative when the step climbs along negative curvature.

Example::

    lightning-curvature analyze last.ckpt --model mypkg.Classifier --demo-data \
        --curvature ggn --loss cross_entropy --solve --damping 0.01
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from lightning_curvature.cli._shared import fraction, int_at_least, non_negative


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this module's flags to ``analyze``."""
    parser.add_argument(
        "--solve",
        action="store_true",
        help="also the damped Newton step x = (A + εI)⁻¹g for the mean gradient g of the "
        "batches (MINRES; A the analyzed matrix): ‖x‖, the true relative residual, the "
        "iterations and the decrease gᵀx − ½xᵀAx a quadratic model predicts; x is saved "
        "as newton_step.pt",
    )
    parser.add_argument(
        "--damping",
        type=non_negative,
        default=1e-3,
        help="ε of --solve (default 1e-3)",
    )
    parser.add_argument(
        "--solve-tol",
        type=fraction,
        default=1e-5,
        help="target true relative residual of --solve (default 1e-5)",
    )
    parser.add_argument(
        "--solve-max-iters",
        type=int_at_least(1),
        default=1000,
        help="the most MINRES iterations of --solve (default 1000)",
    )


def newton_step(
    op: Any, gradient: torch.Tensor, *, damping: float, tol: float, max_iters: int
) -> tuple[dict[str, Any], torch.Tensor]:
    r"""Solve ``(op + damping·I) x = gradient``; return its summary and ``x``.

    The summary holds ``norm_x``, ``norm_gradient``, ``relative_residual`` (the true
    ``‖(A + εI)x − g‖/‖g‖`` recomputed from ``x``), ``iterations``, ``num_matvecs``,
    ``converged``, ``damping`` and ``predicted_decrease`` (:math:`g^\top x - \tfrac12
    x^\top A x`, one more product).
    """
    from lightning_curvature.solvers.krylov import solve

    result = solve(op, gradient, damping=damping, tol=tol, max_iters=max_iters, method="minres")
    x = result.x
    curvature = float(x @ op.matvec(x))
    descent = float(gradient @ x)
    return {
        "method": result.method,
        "damping": damping,
        "norm_gradient": float(torch.linalg.vector_norm(gradient)),
        "norm_x": float(torch.linalg.vector_norm(x)),
        "relative_residual": result.relative_residual,
        "iterations": result.iterations,
        "num_matvecs": result.num_matvecs + 1,
        "converged": result.converged,
        "tol": tol,
        "predicted_decrease": descent - 0.5 * curvature,
        "message": result.message,
    }, x


def table(step: dict[str, Any], matrix: str) -> str:
    """The solve as a few plain-text lines."""
    status = "converged"
    if not step["converged"]:
        status = "NOT converged (raise --damping or --solve-max-iters?)"
    return "\n".join(
        [
            f"Newton step x = (A + εI)⁻¹g, A the {matrix}, ε = {step['damping']:g}, g the mean "
            f"gradient (‖g‖ = {step['norm_gradient']:.6g}):",
            f"  ‖x‖                 {step['norm_x']:.6g}",
            f"  relative residual   {step['relative_residual']:.3g}  true ‖(A + εI)x − g‖/‖g‖, "
            f"{status}",
            f"  iterations          {step['iterations']}  MINRES, {step['num_matvecs']} products",
            f"  predicted decrease  {step['predicted_decrease']:.6g}  gᵀx − ½xᵀAx of the step "
            "−x: a quadratic model's prediction, not a measured loss",
        ]
    )
