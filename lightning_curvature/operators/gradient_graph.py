"""Hessian-vector products from gradients the caller already holds with their graph."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_curvature.operators.base import CurvatureOperator
from lightning_curvature.operators.products import batch_columns_by_default, products_from_graph


class GradientGraphOperator(CurvatureOperator):
    r"""The Hessian behind gradients that already carry their graph, as an operator.

    An optimizer that called ``loss.backward(create_graph=True)`` (AdaHessian, for its
    Hutchinson diagonal) holds :math:`g = \nabla_\theta L` with the graph that made it; each
    product differentiates :math:`g^\top v` once more, :math:`Hv = \nabla_\theta(g^\top v)`,
    without a new forward pass. A block of columns is one batched backward pass
    (``is_grads_batched``) on accelerators where autograd allows it, and one pass per column
    otherwise.
    This is the same code path as :class:`HessianOperator`'s (``reuse_graph``).

    Args:
        params: the parameters :math:`\theta` (tensors that require grad), in flat-vector
            order.
        grads: one gradient per parameter, computed with ``create_graph=True`` (for
            example ``[p.grad for p in params]`` after ``loss.backward(create_graph=True)``);
            ``None`` for a parameter the loss does not use.

    Raises:
        ValueError: if ``params`` is empty, the lengths or shapes differ, a parameter does
            not require grad, or no gradient carries a graph (``create_graph`` was not set).

    Attributes:
        batch_columns: whether a block is one batched backward pass (``is_grads_batched``);
            by default on accelerators, not on a CPU (measured no faster there). Settable.
        batching_failure: why the last batched block fell back to one backward pass per
            column, or ``None``.

    Example::

        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> loss = (w**3).sum()                        # H = diag(6 w)
        >>> loss.backward(create_graph=True)
        >>> op = GradientGraphOperator([w], [w.grad])
        >>> op.matvec(torch.ones(2))
        tensor([ 6., 12.])
    """

    def __init__(
        self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]
    ) -> None:
        params, grads = list(params), list(grads)
        if not params:
            raise ValueError("params must hold at least one tensor, got an empty sequence")
        if len(grads) != len(params):
            raise ValueError(
                f"grads must hold one gradient per parameter: got {len(grads)} for "
                f"{len(params)} params"
            )
        for index, (p, g) in enumerate(zip(params, grads, strict=True)):
            if not isinstance(p, torch.Tensor) or not p.requires_grad:
                raise ValueError(f"params[{index}] must be a tensor that requires grad")
            if g is not None and (not isinstance(g, torch.Tensor) or g.shape != p.shape):
                shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise ValueError(
                    f"grads[{index}] must be None or a tensor of shape {tuple(p.shape)} "
                    f"(the shape of params[{index}]), got {shape}"
                )
        if not any(g is not None and g.requires_grad for g in grads):
            raise ValueError(
                "grads carry no graph: compute them with loss.backward(create_graph=True) "
                "or torch.autograd.grad(..., create_graph=True) (or the Hessian is zero)"
            )
        super().__init__(sum(p.numel() for p in params), params[0].device, params[0].dtype)
        self.params = params
        self.grads: list[torch.Tensor | None] | None = grads
        self.batching_failure: str | None = None
        self.batch_columns = batch_columns_by_default(self.device)

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        if self.grads is None:
            raise RuntimeError(
                "GradientGraphOperator was released: build a new one from fresh gradients"
            )
        product, self.batching_failure = products_from_graph(
            self.grads, self.params, block, self.batch_columns
        )
        return product

    def release(self) -> None:
        """Drop the gradients and so their graph (the operator cannot be used after)."""
        self.grads = None
