"""Matrix-free estimators: they see only an operator (matvec, dim, device, dtype)."""

from lightning_curvature.estimators.density import (
    SpectralDensity,
    smoothed_density,
    spectral_density,
)
from lightning_curvature.estimators.hutchinson import (
    DiagonalResult,
    TraceResult,
    hutchinson_diagonal,
    hutchinson_trace,
)
from lightning_curvature.estimators.lanczos import LanczosResult, lanczos
from lightning_curvature.estimators.power import PowerIterationResult, power_iteration
from lightning_curvature.linear_operator import LinearOperator

__all__ = [
    "DiagonalResult",
    "LanczosResult",
    "LinearOperator",
    "PowerIterationResult",
    "SpectralDensity",
    "TraceResult",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "lanczos",
    "power_iteration",
    "smoothed_density",
    "spectral_density",
]
