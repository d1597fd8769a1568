r"""The generalized Gauss-Newton matrix and the Fisher, as matrix-free operators.

Split the loss of a batch into the model's outputs :math:`f = f_\theta(x)` and a loss on
them, :math:`L(\theta) = \ell(f_\theta(x), y)`. With :math:`J = \partial f / \partial\theta`,

.. math::

    \nabla^2_\theta L = \underbrace{J^\top H_\ell J}_{G \text{ (GGN)}}
        + \sum_k \frac{\partial \ell}{\partial f_k} \nabla^2_\theta f_k,
    \qquad H_\ell = \nabla^2_f \ell .

:math:`G` drops the second term, so it is positive semi-definite whenever :math:`\ell` is
convex in :math:`f` (MSE, cross-entropy) while the Hessian can be indefinite. The Fisher
replaces :math:`H_\ell` by an outer product of output gradients of per-term losses
:math:`\ell_p` (:math:`L = \frac1P\sum_p \ell_p`, :math:`r_p = \nabla_{f_p}\ell_p`):

- empirical Fisher, with the labels: :math:`F_{emp} = \frac1P \sum_p J_p^\top r_p r_p^\top J_p`;
- true Fisher, with :math:`\tilde y` drawn from the model's predictive distribution,
  :math:`F = \frac1P \sum_p J_p^\top \mathbb{E}_{\tilde y}[\tilde r_p \tilde r_p^\top] J_p`,
  estimated with ``num_samples`` Monte Carlo draws per term. For cross-entropy
  :math:`\mathbb{E}[\tilde r \tilde r^\top] = \operatorname{diag}(p) - pp^\top = H_\ell`,
  and for MSE (the Gaussian likelihood :math:`\mathcal N(f, \tfrac K2 I)` whose negative
  log is :math:`\tfrac1K\lVert f-y\rVert^2` up to a constant, K outputs per sample) it is
  :math:`\tfrac2K I = H_\ell`: in both cases :math:`\mathbb{E}[F] = G`.

Products are ``Jᵀ (M (J V))`` with ``M`` the output-space curvature (cheap). ``J V`` uses
the double-backward trick on a kept graph: with a dummy ``w``, ``g(w) = Jᵀw`` is linear in
``w`` and ``∂(g(w)·v)/∂w = J v``, so every product is two backward passes and no forward
(``product_method="reuse_graph"``, the default, chosen by ``benchmarks/bench_ggn.py``).
``"forward_mode"`` uses ``torch.func.jvp`` and ``vjp`` instead: it keeps no graph (least
memory) and runs two forward passes per product.

Example (least squares, where :math:`G = H = \tfrac{2}{N} X^\top X`)::

    >>> import torch
    >>> from lightning_curvature.operators.ggn import GGNOperator
    >>> X, y = torch.randn(50, 3, dtype=torch.float64), torch.randn(50, 1, dtype=torch.float64)
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> op = GGNOperator(model, [(X, y)], loss_from_output="mse", dtype=torch.float64)
    >>> v = torch.randn(3, dtype=torch.float64)
    >>> torch.allclose(op.matvec(v), 2 / 50 * X.T @ X @ v)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lightning_curvature.linear_operator import Block
from lightning_curvature.operators.base import CurvatureOperator
from lightning_curvature.operators.context import isolated_evaluation
from lightning_curvature.operators.loss import operator_inputs, scalar_loss
from lightning_curvature.operators.names import LOSS_NAMES, LossName
from lightning_curvature.operators.output_space import (
    AutogradHessian,
    ClosedFormHessian,
    batched_grad,
    builtin_loss,
)
from lightning_curvature.operators.products import parameter_ranges

OutputFn = Callable[[nn.Module, Any], torch.Tensor]
LossFromOutput = LossName | Callable[[torch.Tensor, Any], torch.Tensor]
ProductMethod = Literal["reuse_graph", "forward_mode"]
PRODUCT_METHODS = ("reuse_graph", "forward_mode")


def default_output_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(batch[0])``: the outputs of an ``(inputs, targets)`` batch."""
    outputs: torch.Tensor = model(batch[0])
    return outputs


class GGNOperator(CurvatureOperator):
    r"""The generalized Gauss-Newton matrix :math:`G = \frac1n\sum_b J_b^\top H_{\ell,b} J_b`
    of the mean loss over probe batches (see the module docstring for the maths).

    Args:
        model: the network; its parameters, buffers, ``.grad``, mode and the global RNG are
            left exactly as they were (as with :class:`HessianOperator`).
        batches: a non-empty list of batches; tensors are moved to the parameters' device.
        params: ``None`` for every parameter with ``requires_grad``; a name→parameter dict
            or an iterable of parameters for one block.
        output_fn: ``output_fn(model, batch) -> outputs``, a tensor whose first dimension is
            the batch; default ``model(batch[0])``.
        loss_from_output: how the loss is computed from the outputs, with torch's default
            mean reduction. ``"mse"`` (``mse_loss(outputs, batch[1])``; targets of another
            shape but the same size are reshaped to the outputs') and ``"cross_entropy"``
            (``cross_entropy(outputs, batch[1])``, classes on dimension 1, targets class
            indices or probabilities) give :math:`H_\ell` in closed form; a callable
            ``(outputs, batch) -> scalar`` gets it by autograd. The loss must depend on the
            parameters only through ``outputs``, or the split is not the model's loss.
        dtype: ``torch.float32`` (default) or ``torch.float64``; a model in another
            precision is evaluated on a cast copy.
        product_method: ``"reuse_graph"`` (default, fastest: keeps each batch's graph) or
            ``"forward_mode"`` (``torch.func``; keeps no graph, needs a model without
            in-place buffer updates, so BatchNorm in eval mode).

    Raises:
        ValueError: for a bad argument, or outputs the chosen loss cannot be split over
            (not a tensor, no class dimension for cross-entropy, targets of another size).

    Attributes: ``dim``, ``device``, ``dtype``, ``num_matvecs``, ``params``,
    ``param_names`` (flat-vector order), ``loss`` (mean loss over the batches).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Any],
        params: Mapping[str, nn.Parameter] | Iterable[nn.Parameter] | None = None,
        *,
        output_fn: OutputFn | None = None,
        loss_from_output: LossFromOutput,
        dtype: torch.dtype | None = None,
        product_method: ProductMethod = "reuse_graph",
    ) -> None:
        if output_fn is not None and not callable(output_fn):
            raise ValueError("output_fn must be callable as output_fn(model, batch) or None")
        if not callable(loss_from_output) and loss_from_output not in LOSS_NAMES:
            raise ValueError(
                f"loss_from_output must be one of {LOSS_NAMES} or a callable "
                f"(outputs, batch) -> scalar, got {loss_from_output!r}"
            )
        if product_method not in PRODUCT_METHODS:
            raise ValueError(
                f"product_method must be one of {PRODUCT_METHODS}, got {product_method!r}"
            )
        inputs = operator_inputs(model, batches, params, dtype)
        super().__init__(sum(p.numel() for p in inputs.params), inputs.device, inputs.dtype)
        self.model = inputs.model
        self.params = inputs.params
        self.param_names = inputs.param_names
        self.batches = inputs.batches
        self.output_fn = output_fn or default_output_fn
        self.loss_from_output = loss_from_output
        self.product_method: str = product_method
        self._prepared: list[tuple[Any, ...]] | None = None
        self._loss: float | None = None
        self._batched_ok = True

    # ------------------------------------------------------------------ public API
    @property
    def loss(self) -> float:
        """The mean loss over the probe batches (computed on first use)."""
        self._ensure_ready()
        assert self._loss is not None
        return self._loss

    def release(self) -> None:
        """Free the kept graphs (rebuilt, identically, if the operator is used again)."""
        self._prepared = None

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        self._ensure_ready()
        assert self._prepared is not None
        total = torch.zeros_like(block)
        for index, prepared in enumerate(self._prepared):
            if self.product_method == "reuse_graph":
                total += self._products_from_graph(prepared, block)
            else:
                total += self._products_forward_mode(index, prepared, block)
        return total / len(self.batches)

    # ------------------------------------------------------------------ output side
    def _outputs_and_loss(self, index: int) -> tuple[torch.Tensor, Callable[[Any], Any]]:
        batch = self.batches[index]
        outputs = self.output_fn(self.model, batch)
        if not isinstance(outputs, torch.Tensor) or not outputs.is_floating_point():
            raise ValueError(
                "output_fn must return a floating-point tensor (the model's outputs), got "
                f"{type(outputs).__name__}"
                + (f" of dtype {outputs.dtype}" if isinstance(outputs, torch.Tensor) else "")
            )
        if outputs.ndim == 0:
            raise ValueError("output_fn must return outputs with a batch dimension, got a scalar")
        return outputs, lambda f: self._loss_on(f, batch)

    def _loss_on(self, outputs: torch.Tensor, batch: Any) -> Any:
        if callable(self.loss_from_output):
            return self.loss_from_output(outputs, batch)
        return builtin_loss(self.loss_from_output, outputs, batch)

    def _output_curvature(
        self, outputs: torch.Tensor, loss_on: Callable[[Any], Any], generator: Any
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``M`` for one batch: the GGN's ``H_ℓ``; the Fisher overrides it."""
        if callable(self.loss_from_output):
            return AutogradHessian(outputs, loss_on)
        return ClosedFormHessian(outputs, self.loss_from_output)

    def _make_generator(self) -> Any:
        return None

    # ------------------------------------------------------------------ products
    def _ensure_ready(self) -> None:
        """One forward pass per batch: the loss, ``M``, and (reuse_graph) the kept graph."""
        if self._prepared is not None:
            return
        prepared: list[tuple[Any, ...]] = []
        total: Any = 0.0
        generator = self._make_generator()
        for index in range(len(self.batches)):
            keep = self.product_method == "reuse_graph"
            with isolated_evaluation(self.model, self.device, index):
                with torch.set_grad_enabled(keep):
                    outputs, loss_on = self._outputs_and_loss(index)
                with torch.no_grad():
                    total += scalar_loss(loss_on(outputs.detach())).detach()
                curvature = self._output_curvature(outputs.detach(), loss_on, generator)
                if keep:
                    prepared.append((outputs, curvature, *self._transpose_graph(outputs)))
                else:
                    prepared.append((curvature,))
        self._prepared = prepared
        if self._loss is None:
            mean = float(total) / len(self.batches)  # one host sync per operator
            if not math.isfinite(mean):
                raise FloatingPointError(
                    f"the loss on the probe batches is {mean}: curvature is undefined there "
                    "(lower the learning rate, or measure on other batches)"
                )
            self._loss = mean

    def _transpose_graph(self, outputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A dummy ``w`` and ``Jᵀw`` with its graph, for ``J v = ∂(Jᵀw · v)/∂w``."""
        dummy = torch.zeros_like(outputs, requires_grad=True)
        if not outputs.requires_grad:  # the outputs do not depend on the parameters
            return dummy, [torch.zeros_like(p) for p in self.params]
        pieces = torch.autograd.grad(
            outputs,
            self.params,
            dummy,
            create_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        return dummy, list(pieces)

    def diagonal_block_products(
        self, blocks: Sequence[Block], packed: torch.Tensor, active: Sequence[int]
    ) -> torch.Tensor | None:
        """Each active block's ``G_ll x_l`` (:func:`~..linear_operator.block_products`):
        ``J_l x_l`` and ``J_lᵀ`` differentiated towards that block's parameters alone, so
        autograd walks only the graph between them and the outputs. ``None`` (the caller
        masks full products) under ``forward_mode`` or when a block cuts through a
        parameter."""
        pieces = [blocks[index][1] for index in active]
        ranges = parameter_ranges(self.params, pieces)
        if ranges is None or self.product_method != "reuse_graph":
            return None
        self._ensure_ready()
        assert self._prepared is not None
        result = torch.zeros_like(packed)
        for piece, (first, stop) in zip(pieces, ranges, strict=True):
            for prepared in self._prepared:
                result[piece] += self._products_from_graph(prepared, packed[piece], first, stop)
        self.num_matvecs += len(pieces) * packed.shape[1]
        return result / len(self.batches)

    def _products_from_graph(
        self,
        prepared: tuple[Any, ...],
        block: torch.Tensor,
        first: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """``Jᵀ M J V`` on one batch's kept graph, for the parameters ``first..stop``
        (rows and columns of that block alone; all of them by default)."""
        outputs, curvature, dummy, transposed = prepared
        params, transposed = self.params[first:stop], transposed[first:stop]
        live = [j for j, piece in enumerate(transposed) if piece.requires_grad]
        if not live:
            return torch.zeros_like(block)
        columns = self._unflatten_columns(block, params)
        (jv,) = self._grad(
            [transposed[j] for j in live], [dummy], [columns[j] for j in live], block.shape[1]
        )
        jt = self._grad([outputs], params, [curvature(jv)], block.shape[1])
        return torch.cat([g.reshape(block.shape[1], -1) for g in jt], dim=1).mT

    def _grad(
        self,
        outputs: Sequence[torch.Tensor],
        inputs: Sequence[torch.Tensor],
        cotangents: Sequence[torch.Tensor],
        m: int,
    ) -> list[torch.Tensor]:
        """Batched vector-Jacobian products over the leading (column) axis, looping over
        columns where an op has no batching rule."""
        if m > 1 and self._batched_ok:
            try:
                return batched_grad(outputs, inputs, cotangents)
            except RuntimeError:
                self._batched_ok = False
        per_column = [
            torch.autograd.grad(
                outputs,
                inputs,
                [c[j] for c in cotangents],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            for j in range(m)
        ]
        return [torch.stack(parts) for parts in zip(*per_column, strict=True)]

    def _products_forward_mode(
        self, index: int, prepared: tuple[Any, ...], block: torch.Tensor
    ) -> torch.Tensor:
        (curvature,) = prepared
        wrapper = _OutputModule(self.model, self.output_fn)
        names = ["model." + name for name in self.param_names]
        primals = tuple(p.detach() for p in self.params)
        batch = self.batches[index]

        def outputs_at(*values: torch.Tensor) -> torch.Tensor:
            outputs: torch.Tensor = torch.func.functional_call(
                wrapper, dict(zip(names, values, strict=True)), (batch,), strict=False
            )
            return outputs

        def jvp(*tangents: torch.Tensor) -> torch.Tensor:
            tangent_out: torch.Tensor = torch.func.jvp(outputs_at, primals, tangents)[1]
            return tangent_out

        with isolated_evaluation(self.model, self.device, index):
            jv = torch.func.vmap(jvp, randomness="same")(*self._unflatten_columns(block))
        with isolated_evaluation(self.model, self.device, index):
            vjp_fn = torch.func.vjp(outputs_at, *primals)[1]
            jt = torch.func.vmap(vjp_fn)(curvature(jv))
        return torch.cat([g.reshape(block.shape[1], -1) for g in jt], dim=1).mT

    def _unflatten_columns(
        self, block: torch.Tensor, params: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """A (dim, m) block as per-parameter stacks of shape (m, *p.shape), over
        ``params`` (default: all of the operator's, whose rows ``block`` holds)."""
        pieces, offset, m = [], 0, block.shape[1]
        for p in self.params if params is None else params:
            pieces.append(block[offset : offset + p.numel()].mT.reshape(m, *p.shape))
            offset += p.numel()
        return pieces


class _OutputModule(nn.Module):
    """``output_fn(model, batch)`` as a module, so ``torch.func.functional_call`` can swap
    the parameters it is evaluated at."""

    def __init__(self, model: nn.Module, output_fn: OutputFn) -> None:
        super().__init__()
        self.model = model
        self.output_fn = output_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.output_fn(self.model, batch)
