"""An explicit matrix as an operator, for tests and small exact checks."""

from __future__ import annotations

import torch

from lightning_curvature.operators.base import CurvatureOperator


class DenseOperator(CurvatureOperator):
    """An explicit symmetric matrix as an operator: for tests and small exact checks."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2:
            raise ValueError("matrix must be a square 2-D tensor")
        if matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.device, matrix.dtype)
        self.matrix = matrix

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        return self.matrix @ block
