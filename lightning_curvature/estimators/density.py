r"""Stochastic Lanczos quadrature (SLQ): the spectral density of a symmetric operator.

``m`` Lanczos steps from a start vector :math:`v` give a Gauss quadrature rule for the
measure :math:`\mu_v = \sum_i (u_i^\top v)^2 \delta_{\lambda_i}`: its nodes are the Ritz values
and its weights the squared first components of the Ritz vectors. With Rademacher start
vectors, :math:`\mathbb{E}\,\mu_v / \dim` is the normalised spectral measure
:math:`\frac{1}{\dim}\sum_i \delta_{\lambda_i}`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lightning_curvature.estimators._common import (
    LinearOperator,
    check_operator,
    check_positive_float,
    check_positive_int,
    make_generator,
)
from lightning_curvature.estimators._krylov import krylov_projection


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
    density: torch.Tensor = (kernel * weights[None]).sum(dim=(1, 2)) / nodes.shape[0]
    return density


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
        run = krylov_projection(
            op, (bits * 2 - 1).to(op.dtype), num_iters, generator, restart_on_breakdown=False
        )
        theta, vectors, _ = run.projection.ritz()
        runs.append((theta, vectors[0] ** 2))
        num_matvecs += run.num_matvecs
    width = max(theta.size for theta, _ in runs)
    nodes = np.zeros((num_runs, width))
    weights = np.zeros((num_runs, width))
    for r, (theta, w) in enumerate(runs):
        nodes[r, : theta.size], weights[r, : theta.size] = theta, w
        nodes[r, theta.size :] = theta[-1]
    nodes_t, weights_t = torch.from_numpy(nodes), torch.from_numpy(weights)
    low, high = float(nodes.min()), float(nodes.max())
    # A spectrum without spread (a multiple of the identity) still needs a width: one
    # relative to its value (an absolute one is huge at 1e-8 and nothing at 1e8), wide
    # enough for the float64 grid to resolve (its points 1e4 roundings apart).
    spread = max(high - low, 1e-8 * max(abs(low), abs(high))) or 1.0  # 1.0: the zero map
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
