"""Curvature operators on the protocol of :mod:`lightning_curvature.linear_operator`: one base
(:mod:`.base`), the Hessian (:mod:`.hessian`), the generalized Gauss-Newton matrix and the
Fisher (:mod:`.ggn`, :mod:`.fisher`), per-layer blocks (:mod:`.blocks`), wrappers that compose
(:mod:`.wrappers`), explicit matrices for tests (:mod:`.dense`), and the choice among them by
name (:mod:`.choice`, the names in :mod:`.names`)."""

from lightning_curvature.operators.base import CurvatureOperator, OperatorWrapper
from lightning_curvature.operators.blocks import BlockDiagonalOperator, parameter_blocks
from lightning_curvature.operators.checks import HvpCheck, UnreliableProductError
from lightning_curvature.operators.choice import curvature_operator
from lightning_curvature.operators.dense import DenseOperator
from lightning_curvature.operators.fisher import FisherOperator
from lightning_curvature.operators.ggn import GGNOperator
from lightning_curvature.operators.hessian import GradientGraphOperator, HessianOperator
from lightning_curvature.operators.loss import resolve_params, scalar_loss
from lightning_curvature.operators.wrappers import AllReduceOperator, PreconditionedOperator

__all__ = [
    "AllReduceOperator",
    "BlockDiagonalOperator",
    "CurvatureOperator",
    "DenseOperator",
    "FisherOperator",
    "GGNOperator",
    "GradientGraphOperator",
    "HessianOperator",
    "HvpCheck",
    "OperatorWrapper",
    "PreconditionedOperator",
    "UnreliableProductError",
    "curvature_operator",
    "parameter_blocks",
    "resolve_params",
    "scalar_loss",
]
