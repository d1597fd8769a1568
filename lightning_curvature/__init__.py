"""lightning_curvature: the curvature of your loss while you train.

The engine: :class:`HessianOperator` applies the Hessian of a model's loss to flat vectors,
and the estimators (:func:`lanczos`, :func:`power_iteration`, :func:`hutchinson_trace`,
:func:`hutchinson_diagonal`, :func:`spectral_density`) turn those products into λmax, the
top of the spectrum, the trace and the spectral density. :class:`CurvatureMonitor` logs them
while a Lightning ``Trainer`` trains; ``lightning-curvature analyze`` measures a checkpoint.

The map (imports run downward only, from the adapters at the top to the protocol below)::

    callback.py         CurvatureMonitor: a thin adapter from Lightning's hooks onto monitor/
    cli/  demo/         the command line (analyze, demo, fit) and the demo's model and data
    _trainer.py         what the callback reads off a Trainer (facts, not decisions)
    monitor/            Lightning-free: schedule and cadence (when), early_warning (the risk
                        between measurements: triggers, alerts with lead time), measurer
                        (what one measurement hands the next), probes (on what), alerts,
                        publish (where), the TensorBoard layout, failures, arguments
    measure/            the two tiers and the Measurement record; the objective the optimizer
                        descends; a training module measured without being disturbed
    optim/              stability thresholds, preconditioners read from optimizer state,
                        AdaHessian
    solvers/            (H + εI)⁻¹b: CG and MINRES, and the exact linear-in-depth chain solve
    estimators/         algorithms that only see an operator: one Krylov process (Lanczos,
                        top-k, bottom, SLQ, blockwise), power iteration, Hutchinson
    operators/          curvature operators: Hessian, GGN, Fisher, blocks, wrappers; names.py
                        holds the names users choose by, choice.py builds the one named
    linear_operator.py  the operator protocol and the block helpers operators and
                        estimators share
    _checks.py  batches.py  _lightning.py
                        argument checks, batch copying, which Lightning package is used
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
from lightning_curvature.monitor.alerts import AlertRules
from lightning_curvature.monitor.triggers import Triggers
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
    "AlertRules",
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
    "Triggers",
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
