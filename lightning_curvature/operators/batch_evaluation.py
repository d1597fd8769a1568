"""The loss and gradients of a :class:`~lightning_curvature.operators.hessian.HessianOperator`
on its probe batches: each batch evaluated in isolation (its own RNG state, cuDNN switched off
where double backward needs it), the first-order graphs a product reuses, plain gradients at
shifted parameters for finite differences, and forward-over-reverse products.

:class:`BatchEvaluation` is a mixin: it reads the operator's ``model``, ``loss_fn``,
``batches``, ``params``, ``device`` and the private state the operator sets up.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from lightning_curvature.operators.checks import UnreliableProductError, custom_functions
from lightning_curvature.operators.context import isolated_evaluation
from lightning_curvature.operators.loss import scalar_loss
from lightning_curvature.operators.products import flatten, forward_over_reverse_products

Gradients = list[torch.Tensor | None]


class BatchEvaluation:
    """Loss, gradients and forward-over-reverse products over the probe batches."""

    # Set by the operator (typed there): the model, its loss and probe batches, the covered
    # parameters.
    model: Any
    loss_fn: Any
    batches: Any
    params: Any
    device: torch.device
    dtype: torch.dtype
    _disable_cudnn: bool
    _loss: float | None
    _loss_total: torch.Tensor
    _loss_module: Any
    _method: str
    _gradients: Gradients | None

    def _isolated(self, batch_index: int) -> AbstractContextManager[None]:
        return isolated_evaluation(
            self.model, self.device, batch_index, disable_cudnn=self._disable_cudnn
        )

    def _batch_loss(self, index: int) -> torch.Tensor:
        return scalar_loss(self.loss_fn(self.model, self.batches[index]))

    def _batch_gradient(self, index: int) -> Gradients:
        """One batch's gradient (``None`` for unused parameters), with the graph needed to
        differentiate it again."""
        with self._isolated(index):
            loss = self._batch_loss(index)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self._record_loss(index, loss)
        return list(grads)

    def _record_loss(self, index: int, loss: torch.Tensor) -> None:
        if self._loss is not None:
            return
        if index == 0:
            self._loss_total = torch.zeros((), device=self.device, dtype=self.dtype)
        self._loss_total = self._loss_total + loss.detach()
        if index == len(self.batches) - 1:
            mean = float(self._loss_total) / len(self.batches)  # one host sync per operator
            if mean != mean or mean in (float("inf"), float("-inf")):
                raise FloatingPointError(
                    f"the loss on the probe batches is {mean}: curvature is undefined there "
                    "(lower the learning rate, or measure on other batches)"
                )
            self._loss = mean

    def _mean_gradient(self) -> Gradients:
        total = self._batch_gradient(0)
        for index in range(1, len(self.batches)):
            total = [
                a if b is None else b if a is None else a + b
                for a, b in zip(total, self._batch_gradient(index), strict=True)
            ]
        return [None if g is None else g / len(self.batches) for g in total]

    def _gradient_at(self, values: Sequence[torch.Tensor]) -> Gradients:
        """The mean gradient with the covered parameters set to ``values``, first-order only
        (a plain backward pass, so reentrant checkpoints work)."""
        total: Gradients = [None] * len(values)
        for index, batch in enumerate(self.batches):
            leaves = [value.detach().requires_grad_() for value in values]
            with self._isolated(index):
                self._loss_module.at(self.params, leaves, batch, backward=True)
            total = [
                t if leaf.grad is None else leaf.grad if t is None else t + leaf.grad
                for t, leaf in zip(total, leaves, strict=True)
            ]
        return [None if t is None else t / len(self.batches) for t in total]

    def _forward_over_reverse(self, block: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(block)
        for index, batch in enumerate(self.batches):

            def loss_at(*values: torch.Tensor, batch: Any = batch) -> torch.Tensor:
                loss: torch.Tensor = self._loss_module.at(self.params, values, batch)
                return loss

            try:
                for j in range(block.shape[1]):
                    with self._isolated(index):  # the same dropout mask for every column
                        column = block[:, j : j + 1]
                        total[:, j : j + 1] += forward_over_reverse_products(
                            loss_at, self.params, column
                        )
            except RuntimeError as error:
                if "mutate a captured Tensor" not in str(error):
                    raise
                raise UnreliableProductError(
                    "hvp_method='forward_over_reverse' cannot run a model whose forward "
                    "mutates its buffers (BatchNorm in train mode); use "
                    "hvp_method='reuse_graph', or put the model in eval mode"
                ) from error
        return total / len(self.batches)

    def _custom_functions(self) -> list[str]:
        """The custom autograd Functions on the first batch's loss graph (for messages)."""
        try:
            with self._isolated(0):
                return custom_functions(self._batch_loss(0))
        except Exception:  # only a hint for a message: never let it hide the real failure
            return []

    def _held_gradient(self) -> torch.Tensor | None:
        """The flat gradient at θ from the kept graph, when there is one."""
        if self._method != "reuse_graph" or self._gradients is None:
            return None
        return flatten([None if g is None else g.detach() for g in self._gradients], self.params)
