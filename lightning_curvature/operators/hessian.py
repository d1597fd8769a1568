r"""Curvature operators: Hessian-vector products of a model's loss, on flat vectors.

For parameters :math:`\theta \in \mathbb{R}^d` and probe batches :math:`B_1..B_n`,
:class:`HessianOperator` represents

.. math:: H = \nabla^2_\theta \; \frac{1}{n} \sum_{b=1}^{n} \ell(\theta; B_b)

and applies it to flat vectors without ever forming it. One product costs a small constant
times one gradient: the first-order graph of each batch is built once (``create_graph``)
and every product is one extra backward pass through it.

Example (least squares, whose Hessian is :math:`\tfrac{2}{N} X^\top X`)::

    >>> import torch
    >>> from lightning_curvature import HessianOperator
    >>> X, y = torch.randn(50, 3, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> loss_fn = lambda m, b: ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()
    >>> op = HessianOperator(model, loss_fn, [(X, y)], dtype=torch.float64)
    >>> v = torch.randn(3, dtype=torch.float64)
    >>> torch.allclose(op.matvec(v), 2 / 50 * X.T @ X @ v)
    True
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from torch import nn

from lightning_curvature.batches import move_batch
from lightning_curvature.operators.base import CurvatureOperator
from lightning_curvature.operators.context import isolated_evaluation
from lightning_curvature.operators.products import products_from_graph

LossFn = Callable[[nn.Module, Any], Any]
HvpMethod = Literal["auto", "reuse_graph", "recompute", "forward_over_reverse"]
HVP_METHODS = ("auto", "reuse_graph", "recompute", "forward_over_reverse")
Gradients = list[torch.Tensor | None]


def scalar_loss(output: Any) -> torch.Tensor:
    """The loss tensor in what a loss function (or a ``training_step``) returned."""
    if isinstance(output, Mapping) and "loss" in output:
        output = output["loss"]
    if not isinstance(output, torch.Tensor) or output.numel() != 1:
        raise ValueError(
            "loss_fn must return a scalar tensor (or a mapping with a 'loss' entry), got "
            f"{type(output).__name__}"
            + (f" of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else "")
        )
    return output.reshape(())


def resolve_params(
    model: nn.Module,
    params: Mapping[str, nn.Parameter] | Iterable[nn.Parameter] | None,
) -> tuple[list[str], list[nn.Parameter]]:
    """Names and tensors of the parameters the Hessian is taken over.

    ``None`` means every parameter with ``requires_grad`` (so only the adapters of a model
    whose base is frozen); a name→parameter mapping or an iterable of parameters restricts
    the Hessian to that block.
    """
    names_by_id = {id(p): name for name, p in model.named_parameters()}
    if params is None:
        chosen = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not chosen:
            raise ValueError(
                "params=None selects every parameter with requires_grad, but the "
                "model has none: unfreeze some parameters or pass params"
            )
    else:
        items = params.values() if isinstance(params, Mapping) else params
        chosen = []
        for p in items:
            if not isinstance(p, torch.Tensor) or id(p) not in names_by_id:
                raise ValueError(
                    "params must be parameters of model (a name->parameter dict "
                    "or an iterable of them)"
                )
            if not p.requires_grad:
                raise ValueError(
                    f"params includes {names_by_id[id(p)]!r}, which does not "
                    "require grad; the Hessian is taken over trainable parameters"
                )
            chosen.append((names_by_id[id(p)], p))
        if not chosen:
            raise ValueError("params must name at least one parameter, got an empty collection")
    seen: set[int] = set()
    unique = [(n, p) for n, p in chosen if not (id(p) in seen or seen.add(id(p)))]
    return [n for n, _ in unique], [p for _, p in unique]


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``torch.func.functional_call`` can swap the
    parameters it is evaluated at (for forward-over-reverse products)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return scalar_loss(self.loss_fn(self.model, batch))


class HessianOperator(CurvatureOperator):
    r"""The Hessian of the mean loss over probe batches, as a matrix-free operator.

    Args:
        model: the network. Its train/eval mode is used as it is (set it before); its
            parameters, buffers, ``.grad`` fields, mode and the global RNG streams are left
            exactly as they were.
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` (a mapping with a ``"loss"`` entry,
            as ``training_step`` may return, also works).
        batches: a non-empty list of batches; the operator is the Hessian of their mean
            loss. Tensors are moved to the model's device.
        params: ``None`` for every parameter with ``requires_grad``; a name→parameter dict or
            an iterable of parameters for one block (a layer, the adapters).
        dtype: precision of the products, ``torch.float32`` by default; ``torch.float64``
            for validation. A model stored in another precision (bf16, fp16) is evaluated
            on a copy cast to ``dtype``, so its own weights are untouched.
        hvp_method: how products are computed. ``"reuse_graph"`` keeps each batch's
            first-order graph for all products (fastest; memory of one training step per
            batch), ``"recompute"`` rebuilds it per product (least memory),
            ``"forward_over_reverse"`` uses ``torch.func.jvp`` over ``torch.func.grad``.
            ``"auto"`` reuses the graph, and recomputes it per product when keeping it runs
            out of memory.

    Attributes:
        dim: number of parameters covered; device, dtype: where and how products run;
        num_matvecs: products computed so far (a block of m counts m);
        param_names: the names of the covered parameters, in flat-vector order.

    The products run with autocast off, with the math scaled-dot-product-attention kernel
    (fused attention kernels have no double backward) and with cuDNN off (its RNNs have
    none either).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        params: Mapping[str, nn.Parameter] | Iterable[nn.Parameter] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        hvp_method: HvpMethod = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError("loss_fn must be callable as loss_fn(model, batch)")
        if isinstance(batches, (torch.Tensor, Mapping)) or not isinstance(batches, Sequence):
            raise ValueError("batches must be a list of batches (wrap a single batch in a list)")
        if len(batches) == 0:
            raise ValueError("batches must hold at least one batch, got an empty list")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if hvp_method not in HVP_METHODS:
            raise ValueError(f"hvp_method must be one of {HVP_METHODS}, got {hvp_method!r}")

        names, params_list = resolve_params(model, params)
        devices = {p.device for p in params_list}
        if len(devices) != 1:
            raise ValueError(
                f"params must all live on one device, found {sorted(map(str, devices))}"
            )
        if any(p.dtype != dtype for p in params_list):
            # Never cast the caller's model: evaluate a cast copy instead.
            model = copy.deepcopy(model).to(dtype)
            by_name = dict(model.named_parameters())
            params_list = [by_name[name] for name in names]
            batch_dtype: torch.dtype | None = dtype
        else:
            batch_dtype = None
        super().__init__(sum(p.numel() for p in params_list), next(iter(devices)), dtype)
        self.model = model
        self.loss_fn = loss_fn
        self.params = params_list
        self.param_names = names
        self.batches = [move_batch(b, self.device, batch_dtype) for b in batches]
        self.hvp_method: str = hvp_method
        self._gradients: list[torch.Tensor | None] | None = None  # mean gradient, with graph
        self._loss: float | None = None
        self.batching_failure: str | None = None

    # ------------------------------------------------------------------ public API
    @property
    def loss(self) -> float:
        """The mean loss over the probe batches (computed on first use)."""
        if self._loss is None:
            self._ensure_ready()
        assert self._loss is not None
        return self._loss

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        """``H V`` for a (dim, m) block, batched over columns where autograd allows it."""
        self._ensure_ready()
        if self.hvp_method == "reuse_graph":
            assert self._gradients is not None
            return self._from_graph(self._gradients, block)
        if self.hvp_method == "recompute":
            total = torch.zeros_like(block)
            for index in range(len(self.batches)):
                total += self._from_graph(self._batch_gradient(index), block)
            return total / len(self.batches)
        return self._forward_over_reverse(block)

    def _from_graph(self, gradients: Gradients, block: torch.Tensor) -> torch.Tensor:
        product, self.batching_failure = products_from_graph(gradients, self.params, block)
        return product

    def release(self) -> None:
        """Free the kept first-order graphs (they are rebuilt if the operator is used again)."""
        self._gradients = None

    # ------------------------------------------------------------------ internals
    def _isolated(self, batch_index: int) -> AbstractContextManager[None]:
        return isolated_evaluation(self.model, self.device, batch_index)

    def _batch_loss(self, index: int) -> torch.Tensor:
        return scalar_loss(self.loss_fn(self.model, self.batches[index]))

    def _batch_gradient(self, index: int) -> list[torch.Tensor | None]:
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

    def _ensure_ready(self) -> None:
        if self.hvp_method in ("auto", "reuse_graph"):
            if self._gradients is not None:
                return
            try:
                self._gradients = self._mean_gradient()
                self.hvp_method = "reuse_graph"
            except torch.OutOfMemoryError:
                if self.hvp_method == "reuse_graph":
                    raise
                self._gradients = None
                _empty_cache(self.device)
                self.hvp_method = "recompute"
                warnings.warn(
                    "HessianOperator: keeping the first-order graphs of all probe batches ran "
                    "out of memory; recomputing them for every product instead (slower). "
                    "Use fewer or smaller probe batches to get the fast path back.",
                    stacklevel=3,
                )
        if self._loss is None and self.hvp_method == "recompute":
            for index in range(len(self.batches)):
                with self._isolated(index):
                    self._record_loss(index, self._batch_loss(index))
        if self._loss is None and self.hvp_method == "forward_over_reverse":
            for index in range(len(self.batches)):
                with self._isolated(index), torch.no_grad():
                    self._record_loss(index, self._batch_loss(index))

    def _mean_gradient(self) -> list[torch.Tensor | None]:
        total = self._batch_gradient(0)
        for index in range(1, len(self.batches)):
            total = [
                a if b is None else b if a is None else a + b
                for a, b in zip(total, self._batch_gradient(index), strict=True)
            ]
        return [None if g is None else g / len(self.batches) for g in total]

    def _forward_over_reverse(self, block: torch.Tensor) -> torch.Tensor:
        wrapper = _LossModule(self.model, self.loss_fn)
        names = ["model." + name for name in self.param_names]
        primals = tuple(p.detach() for p in self.params)
        total = torch.zeros_like(block)
        for index, batch in enumerate(self.batches):

            def loss_at(*values: torch.Tensor, batch: Any = batch) -> torch.Tensor:
                return torch.func.functional_call(
                    wrapper, dict(zip(names, values, strict=True)), (batch,), strict=False
                )

            gradient = torch.func.grad(loss_at, argnums=tuple(range(len(primals))))
            for j in range(block.shape[1]):
                tangents = self._unflatten(block[:, j])
                with self._isolated(index):
                    try:
                        _, hv = torch.func.jvp(gradient, primals, tangents)
                    except RuntimeError as error:
                        if "mutate a captured Tensor" not in str(error):
                            raise
                        raise RuntimeError(
                            "hvp_method='forward_over_reverse' cannot run a model whose forward "
                            "mutates its buffers (BatchNorm in train mode); use "
                            "hvp_method='reuse_graph', or put the model in eval mode"
                        ) from error
                total[:, j] += torch.cat([h.reshape(-1) for h in hv])
        return total / len(self.batches)

    def _unflatten(self, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pieces, offset = [], 0
        for p in self.params:
            pieces.append(v[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return tuple(pieces)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class GradientGraphOperator(CurvatureOperator):
    r"""The Hessian behind gradients that already carry their graph, as an operator.

    An optimizer that called ``loss.backward(create_graph=True)`` (AdaHessian, for its
    Hutchinson diagonal) holds :math:`g = \nabla_\theta L` with the graph that made it; each
    product differentiates :math:`g^\top v` once more, :math:`Hv = \nabla_\theta(g^\top v)`,
    without a new forward pass. A block of columns is one batched backward pass
    (``is_grads_batched``) where autograd allows it, and one pass per column otherwise.
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
        batching_failure: why the last block fell back to one backward pass per column, or
            ``None``.

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

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        if self.grads is None:
            raise RuntimeError(
                "GradientGraphOperator was released: build a new one from fresh gradients"
            )
        product, self.batching_failure = products_from_graph(self.grads, self.params, block)
        return product

    def release(self) -> None:
        """Drop the gradients and so their graph (the operator cannot be used after)."""
        self.grads = None
