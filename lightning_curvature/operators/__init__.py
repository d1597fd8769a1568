"""Curvature operators: one protocol (:mod:`.base`), the Hessian (:mod:`.hessian`),
wrappers that compose (:mod:`.wrappers`) and explicit matrices for tests (:mod:`.dense`)."""

from lightning_curvature.operators.base import CurvatureOperator, OperatorWrapper
from lightning_curvature.operators.checks import HvpCheck, UnreliableProductError
from lightning_curvature.operators.dense import DenseOperator
from lightning_curvature.operators.hessian import GradientGraphOperator, HessianOperator
from lightning_curvature.operators.loss import resolve_params, scalar_loss
from lightning_curvature.operators.wrappers import AllReduceOperator, PreconditionedOperator

__all__ = [
    "AllReduceOperator",
    "CurvatureOperator",
    "DenseOperator",
    "GradientGraphOperator",
    "HessianOperator",
    "HvpCheck",
    "OperatorWrapper",
    "PreconditionedOperator",
    "UnreliableProductError",
    "resolve_params",
    "scalar_loss",
]
