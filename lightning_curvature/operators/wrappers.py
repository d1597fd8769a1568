"""Operators built on another operator: a diagonally preconditioned one, and the mean of
one over the ranks of a process group. Both pass ``release``, ``loss`` and the parameters
through (:class:`~lightning_curvature.operators.base.OperatorWrapper`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_curvature.linear_operator import Block, block_products
from lightning_curvature.operators.base import OperatorWrapper


class PreconditionedOperator(OperatorWrapper):
    r"""The symmetric form :math:`P^{-1/2} H P^{-1/2}` of a diagonally preconditioned Hessian.

    It has the eigenvalues of :math:`P^{-1} H` (the matrices are similar), which is the
    sharpness that adaptive optimizers (Adam, RMSprop, Adagrad) feel, but it stays
    symmetric, so Lanczos applies. ``diagonal`` is P's diagonal as a flat tensor.
    """

    def __init__(self, op: Any, diagonal: torch.Tensor) -> None:
        if diagonal.shape != (op.dim,):
            raise ValueError(f"diagonal must have shape ({op.dim},), got {tuple(diagonal.shape)}")
        if not bool((diagonal > 0).all()):
            raise ValueError("diagonal must be positive: P is a preconditioner")
        super().__init__(op)
        self.scale = diagonal.to(device=op.device, dtype=op.dtype).rsqrt()

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        scale = self.scale[:, None]
        product: torch.Tensor = self.inner.matmat(scale * block)
        return scale * product

    def diagonal_block_products(
        self, blocks: Sequence[Block], packed: torch.Tensor, active: Sequence[int]
    ) -> torch.Tensor:
        """``P_l^{-1/2} H_ll P_l^{-1/2} x_l`` for each active block (P is diagonal): the
        inner operator's diagonal blocks, directly where it can."""
        scale = self.scale[:, None]
        self.num_matvecs += len(active) * packed.shape[1]
        return scale * block_products(self.inner, blocks, scale * packed, active)


class AllReduceOperator(OperatorWrapper):
    """The mean of an operator over the ranks of a process group (data-parallel training).

    Every rank holds the Hessian of its own probe batches; averaging the products gives the
    Hessian of the union of the ranks' batches. A rank whose product fails still joins the
    collective (with NaN), so no rank is left waiting and every rank sees the failure; the
    rank's own error is kept in ``last_error`` for the caller to report.
    """

    def __init__(self, op: Any, group: Any = None) -> None:
        super().__init__(op)
        self.group = group
        self.last_error: BaseException | None = None

    @property
    def loss(self) -> float:
        """The mean loss over every rank's probe batches (a collective: all ranks call it)."""
        import torch.distributed as dist

        try:
            value = torch.tensor(self.inner.loss, device=self.device, dtype=torch.float64)
        except Exception as error:  # joins the collective anyway; reported by the caller
            value = torch.tensor(float("nan"), device=self.device, dtype=torch.float64)
            self.last_error = error
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.group)
        return float(value) / dist.get_world_size(self.group)

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        try:
            product: torch.Tensor = self.inner.matmat(block)
        except Exception as error:  # joins the collective anyway; reported by the caller
            product = torch.full_like(block, float("nan"))
            self.last_error = error
        dist.all_reduce(product, op=dist.ReduceOp.SUM, group=self.group)
        return product / dist.get_world_size(self.group)

    def diagonal_block_products(
        self, blocks: Sequence[Block], packed: torch.Tensor, active: Sequence[int]
    ) -> torch.Tensor:
        """The mean over ranks of each rank's diagonal blocks, one all-reduce of the packed
        products whichever way each rank computes its own (directly or masked)."""
        import torch.distributed as dist

        self.num_matvecs += len(active) * packed.shape[1]
        try:
            product = block_products(self.inner, blocks, packed, active)
        except Exception as error:  # joins the collective anyway; reported by the caller
            product = torch.full_like(packed, float("nan"))
            self.last_error = error
        dist.all_reduce(product, op=dist.ReduceOp.SUM, group=self.group)
        return product / dist.get_world_size(self.group)
