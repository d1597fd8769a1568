"""Curvature operators: one protocol (:mod:`.base`), the Hessian (:mod:`.hessian`),
wrappers that compose (:mod:`.wrappers`) and explicit matrices for tests (:mod:`.dense`)."""

from lightning_curvature.operators.base import CurvatureOperator, OperatorWrapper
from lightning_curvature.operators.dense import DenseOperator
from lightning_curvature.operators.hessian import (
    GradientGraphOperator,
    HessianOperator,
    resolve_params,
    scalar_loss,
)
from lightning_curvature.operators.wrappers import AllReduceOperator, PreconditionedOperator

__all__ = [
    "AllReduceOperator",
    "CurvatureOperator",
    "DenseOperator",
    "GradientGraphOperator",
    "HessianOperator",
    "OperatorWrapper",
    "PreconditionedOperator",
    "resolve_params",
    "scalar_loss",
]
