"""lightning_curvature: the curvature of your loss while you train.

The engine: :class:`HessianOperator` applies the Hessian of a model's loss to flat vectors,
and the estimators (:func:`lanczos`, :func:`power_iteration`, :func:`hutchinson_trace`,
:func:`hutchinson_diagonal`, :func:`spectral_density`) turn those products into λmax, the
top of the spectrum, the trace and the spectral density.
"""

from lightning_curvature import optim
from lightning_curvature.estimators import (
    DiagonalResult,
    LanczosResult,
    LinearOperator,
    PowerIterationResult,
    SpectralDensity,
    TraceResult,
    hutchinson_diagonal,
    hutchinson_trace,
    lanczos,
    power_iteration,
    smoothed_density,
    spectral_density,
)
from lightning_curvature.operators import (
    DenseOperator,
    GradientGraphOperator,
    HessianOperator,
    HvpCheck,
    UnreliableProductError,
)
from lightning_curvature.operators.blocks import BlockDiagonalOperator, parameter_blocks
from lightning_curvature.operators.fisher import FisherOperator
from lightning_curvature.operators.ggn import GGNOperator
from lightning_curvature.solvers.chain import ChainSolveResult, mlp_chain_solve
from lightning_curvature.solvers.krylov import SolveResult, solve

__version__ = "0.1.0"


def __getattr__(name: str):
    # The callback imports Lightning (seconds); the engine alone should not pay for that.
    if name == "CurvatureMonitor":
        from lightning_curvature.callback import CurvatureMonitor

        return CurvatureMonitor
    raise AttributeError(f"module 'lightning_curvature' has no attribute {name!r}")


__all__ = [
    "BlockDiagonalOperator",
    "ChainSolveResult",
    "CurvatureMonitor",
    "DenseOperator",
    "DiagonalResult",
    "FisherOperator",
    "GGNOperator",
    "GradientGraphOperator",
    "HessianOperator",
    "HvpCheck",
    "LanczosResult",
    "LinearOperator",
    "PowerIterationResult",
    "SolveResult",
    "SpectralDensity",
    "TraceResult",
    "UnreliableProductError",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "lanczos",
    "mlp_chain_solve",
    "optim",
    "parameter_blocks",
    "power_iteration",
    "smoothed_density",
    "solve",
    "spectral_density",
]
