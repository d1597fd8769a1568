r"""Hessian-vector products of a model's loss, on flat vectors.

For parameters :math:`\theta \in \mathbb{R}^d` and probe batches :math:`B_1..B_n`,
:class:`HessianOperator` represents

.. math:: H = \nabla^2_\theta \; \frac{1}{n} \sum_{b=1}^{n} \ell(\theta; B_b)

and applies it to flat vectors without ever forming it. By default the first-order graph of
each batch is built once (``create_graph``) and every product is one extra backward pass
through it; the first product is checked (symmetry and finite differences, :mod:`.checks`)
at the price of one extra product column and two gradients, once per model, loss function
and method (re-checked every ``RECHECK_EVERY``-th operator), and a model that autograd cannot
differentiate twice correctly is measured by central differences of its gradient instead.

Example (least squares, whose Hessian is :math:`\tfrac{2}{N} X^\top X`)::

    >>> import torch
    >>> from lightning_curvature import HessianOperator
    >>> X, y = torch.randn(50, 3, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> loss_fn = lambda m, b: ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()
    >>> op = HessianOperator(model, loss_fn, [(X, y)])
    >>> v = torch.randn(3, dtype=torch.float64)
    >>> torch.allclose(op.matvec(v), 2 / 50 * X.T @ X @ v), op.method_used
    (True, 'reuse_graph')
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, cast

import torch
from torch import nn

from lightning_curvature.linear_operator import Block
from lightning_curvature.operators.base import CurvatureOperator
from lightning_curvature.operators.batch_evaluation import BatchEvaluation, Gradients
from lightning_curvature.operators.checks import (
    PASSED,
    HvpCheck,
    UnreliableProductError,
    explain_failure,
)
from lightning_curvature.operators.context import eager, empty_cache, holds_rnn
from lightning_curvature.operators.gradient_graph import GradientGraphOperator
from lightning_curvature.operators.loss import (
    LossFn,
    LossModule,
    operator_inputs,
)
from lightning_curvature.operators.product_checks import ProductChecks
from lightning_curvature.operators.products import (
    batch_columns_by_default,
    diagonal_products_from_graph,
    finite_difference_products,
    parameter_ranges,
    products_from_graph,
)

HvpMethod = Literal["auto", "reuse_graph", "recompute", "forward_over_reverse", "finite_difference"]
HVP_METHODS = ("auto", "reuse_graph", "recompute", "forward_over_reverse", "finite_difference")
GRAPH_METHODS = ("reuse_graph", "recompute")  # products by differentiating a graph again
__all__ = ["GradientGraphOperator", "HessianOperator"]


class HessianOperator(ProductChecks, BatchEvaluation, CurvatureOperator):
    r"""The Hessian of the mean loss over probe batches, as a matrix-free operator.

    Args:
        model: the network. Its train/eval mode is used as it is (set it before); its
            parameters, buffers, ``.grad`` fields, mode and the global RNG streams are left
            exactly as they were. ``torch.compile``d modules (the model or its submodules)
            are evaluated eagerly, through the modules they wrap.
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` (a mapping with a ``"loss"`` entry,
            as ``training_step`` may return, also works).
        batches: a non-empty list of batches; the operator is the Hessian of their mean
            loss. Tensors are moved to the model's device, floating ones cast to ``dtype``.
        params: ``None`` for every parameter with ``requires_grad``; a name→parameter dict or
            an iterable of parameters for one block (a layer, the adapters).
        dtype: precision of the products. ``None`` (default): the parameters' own dtype when
            it is float32 or float64 (no copy); float32 for bf16/fp16 parameters, evaluated
            on a cast copy so the caller's model is untouched. ``torch.float32`` or
            ``torch.float64`` force a precision (a copy when it differs).
        hvp_method: what you ask for; :attr:`method_used` says what runs.
            ``"reuse_graph"`` keeps each batch's first-order graph for all products (fastest;
            memory of one training step per batch); ``"recompute"`` rebuilds it per product
            (least memory); ``"forward_over_reverse"`` uses ``torch.func.jvp`` over
            ``torch.func.grad``; ``"finite_difference"`` takes central differences of two
            first-order gradients per product (works wherever training does; relative
            error 1e-8..1e-7 in float64; in float32 2e-4..1e-3 on smooth models, but O(1)
            once the step crosses ReLU kinks, as on large batches). ``"auto"`` (default)
            reuses the graph, recomputes it when keeping it runs out of memory, and falls
            back to finite differences (one warning) when the products fail :meth:`check`
            or double backward raises (no second derivative, reentrant checkpointing,
            compiled functions).
        verify: check the first product block before using it: one extra product column
            (counted in ``num_matvecs``) and two gradients, the gradient at θ coming from
            the kept graph (a third gradient for the other methods). A pass is remembered
            for the model object, ``loss_fn`` (the same function, or a closure of the same
            code over the same objects), method, parameters, dtype and device: later
            operators on them skip the check, except every ``RECHECK_EVERY``-th (16th);
            a new model, loss, method, parameter set or dtype, or a failure, is checked
            again. A failed check switches ``"auto"`` to finite differences and makes any
            other method raise :class:`UnreliableProductError`. Ignored for
            ``"finite_difference"``.

    Raises:
        ValueError: on a bad argument (named, with its value and what is allowed).
        UnreliableProductError: from a product, when an explicitly requested method fails
            its check or cannot run; the message names the cause and the fix.
        FloatingPointError: from a product, when the loss on the probe batches is not finite.

    Attributes:
        dim: number of parameters covered; device, dtype: where and how products run;
        num_matvecs: products computed so far (a block of m counts m);
        param_names: the names of the covered parameters, in flat-vector order;
        last_check: the latest :class:`HvpCheck` (``None`` before one ran);
        batch_columns: whether a block of products is one batched backward pass
            (``is_grads_batched``) rather than one pass per column; by default on
            accelerators, not on a CPU (measured no faster there). Settable.
        batching_failure: why the latest batched block fell back to one pass per column,
            or ``None``.

    The products run with autocast off, with the math scaled-dot-product-attention kernel
    (fused attention kernels have no double backward) and, for models with an RNN, with
    cuDNN off (its RNNs have none either).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        params: Mapping[str, nn.Parameter] | Iterable[nn.Parameter] | None = None,
        *,
        dtype: torch.dtype | None = None,
        hvp_method: HvpMethod = "auto",
        verify: bool = True,
    ) -> None:
        if not callable(loss_fn):
            raise ValueError("loss_fn must be callable as loss_fn(model, batch)")
        if hvp_method not in HVP_METHODS:
            raise ValueError(f"hvp_method must be one of {HVP_METHODS}, got {hvp_method!r}")
        if not isinstance(verify, bool):
            raise ValueError(f"verify must be True or False, got {verify!r}")
        # A compiled model's parameters are those of the module it wraps.
        given = eager(model) if isinstance(model, nn.Module) else model
        inputs = operator_inputs(given, batches, params, dtype)
        model = inputs.model
        super().__init__(sum(p.numel() for p in inputs.params), inputs.device, inputs.dtype)
        self.model = model
        self.loss_fn = loss_fn
        self.params = inputs.params
        self.param_names = inputs.param_names
        self.batches = inputs.batches
        self._requested: str = hvp_method
        self._method: str = "reuse_graph" if hvp_method == "auto" else hvp_method
        self._fallback_reason: str | None = None
        # Finite differences use first-order gradients alone: nothing to verify.
        self._verify_pending = verify and hvp_method != "finite_difference"
        self._disable_cudnn = holds_rnn(model)
        self._loss_module = LossModule(model, loss_fn)
        self._checked_model: nn.Module = given  # the caller's model (not a cast copy)
        self._gradients: Gradients | None = None  # mean gradient, with its graph
        self._loss: float | None = None
        self.last_check: HvpCheck | None = None
        self.batching_failure: str | None = None
        self.batch_columns = batch_columns_by_default(self.device)

    # ------------------------------------------------------------------ public API
    @property
    def hvp_method(self) -> str:
        """The method asked for at construction (never changed; see :attr:`method_used`)."""
        return self._requested

    @property
    def method_used(self) -> str:
        """The method products run with: ``"reuse_graph"``, ``"recompute"``,
        ``"forward_over_reverse"`` or ``"finite_difference"`` (the one planned, before the
        first product)."""
        return self._method

    @property
    def fallback_reason(self) -> str | None:
        """Why ``"auto"`` left reusing the graph (cause and fix), or ``None``."""
        return self._fallback_reason

    @property
    def loss(self) -> float:
        """The mean loss over the probe batches (computed on first use)."""
        if self._loss is None:
            self._ensure_ready()
        assert self._loss is not None
        return self._loss

    def gradient(self) -> torch.Tensor:
        """The mean gradient of the probe loss at θ, as a detached flat vector (zeros for
        parameters the loss does not use): for the batch sharpness gᵀHg / gᵀg."""
        if self._method == "reuse_graph":
            self._ensure_ready()
            gradients = self._gradients
        else:
            gradients = self._gradient_at([p.detach() for p in self.params])
        assert gradients is not None
        return torch.cat(
            [
                (torch.zeros_like(p) if g is None else g.detach()).reshape(-1)
                for p, g in zip(self.params, gradients, strict=True)
            ]
        )

    def release(self) -> None:
        """Free the kept first-order graphs (they are rebuilt if the operator is used again)."""
        self._gradients = None

    # ------------------------------------------------------------------ products
    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        """``H V`` for a (dim, m) block, batched over columns where autograd allows it."""
        if self._verify_pending:
            self._verify_pending = False
            trusted = PASSED.trusted(self._checked_model, self._check_key())
            if trusted is not None:
                self.last_check = trusted
            else:
                checked = self._checked_products(block)
                if checked is not None:
                    return checked
        try:
            return self._products(block)
        except (torch.OutOfMemoryError, UnreliableProductError):
            raise
        except RuntimeError as error:
            if self._method == "finite_difference":
                raise
            PASSED.forget(self._checked_model, self._check_key())
            self._give_up(explain_failure(error, self._method), error)
            return self._products(block)

    def _products(self, block: torch.Tensor) -> torch.Tensor:
        self._ensure_ready()
        if self._method == "reuse_graph":
            assert self._gradients is not None
            return self._from_graph(self._gradients, block)
        if self._method == "recompute":
            total = torch.zeros_like(block)
            for index in range(len(self.batches)):
                total += self._from_graph(self._batch_gradient(index), block)
            return total / len(self.batches)
        if self._method == "finite_difference":
            return finite_difference_products(self._gradient_at, self.params, block)
        return self._forward_over_reverse(block)

    def diagonal_block_products(
        self, blocks: Sequence[Block], packed: torch.Tensor, active: Sequence[int]
    ) -> torch.Tensor | None:
        """Each active block's ``H_ll x_l`` (:func:`~..linear_operator.block_products`),
        differentiated towards that block's parameters alone, on the kept graph. ``None``
        (the caller masks full products) until the first product has been checked, when
        products do not come from a graph, or when a block cuts through a parameter; a
        failure here is left to the masked products, which meet and handle it."""
        pieces = [blocks[index][1] for index in active]
        ranges = parameter_ranges(self.params, pieces)
        if ranges is None or self._verify_pending or self._method not in GRAPH_METHODS:
            return None
        try:
            self._ensure_ready()
            if self._method == "reuse_graph":
                assert self._gradients is not None
                graphs: Iterable[Gradients] = [self._gradients]
            else:
                graphs = (self._batch_gradient(i) for i in range(len(self.batches)))
            paired = list(zip(pieces, ranges, strict=True))
            columns = self.batch_columns
            total = sum(
                diagonal_products_from_graph(g, self.params, paired, packed, columns)
                for g in graphs
            )
        except RuntimeError:
            return None
        self.num_matvecs += len(pieces) * packed.shape[1]
        scale = 1 if self._method == "reuse_graph" else len(self.batches)
        return cast(torch.Tensor, total) / scale

    def _from_graph(self, gradients: Gradients, block: torch.Tensor) -> torch.Tensor:
        product, self.batching_failure = products_from_graph(
            gradients, self.params, block, self.batch_columns
        )
        return product

    # ------------------------------------------------------------------ internals
    def _ensure_ready(self) -> None:
        if self._method == "reuse_graph" and self._gradients is None:
            try:
                self._gradients = self._mean_gradient()
            except torch.OutOfMemoryError:
                if self._requested == "reuse_graph":
                    raise
                self._gradients = None
                empty_cache(self.device)
                self._method = "recompute"
                self._fallback_reason = (
                    "keeping the first-order graphs of all probe batches ran out of memory; "
                    "recomputing them for every product (slower): use fewer or smaller probe "
                    "batches to get the fast path back"
                )
                warnings.warn(f"HessianOperator: {self._fallback_reason}", stacklevel=4)
        if self._loss is None and self._method != "reuse_graph":
            with warnings.catch_warnings():  # a reentrant checkpoint warns under no_grad
                warnings.filterwarnings("ignore", "None of the inputs have requires_grad")
                for index in range(len(self.batches)):
                    with self._isolated(index), torch.no_grad():
                        self._record_loss(index, self._batch_loss(index))
