"""What the operators evaluate: the scalar loss of ``loss_fn(model, batch)``, the parameters
the Hessian is taken over, and the loss as a module so ``torch.func.functional_call`` can
evaluate it at other parameter values."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], Any]


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
            chosen.append((names_by_id[id(p)], cast(nn.Parameter, p)))
        if not chosen:
            raise ValueError("params must name at least one parameter, got an empty collection")
    unique = list({id(p): (n, p) for n, p in chosen}.values())  # first place, no repeats
    return [n for n, _ in unique], [p for _, p in unique]


class LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``torch.func.functional_call`` can swap the
    parameters it is evaluated at (for forward-over-reverse products)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any, backward: bool = False) -> torch.Tensor:
        """The loss on ``batch``; with ``backward``, also backpropagated here, inside
        ``functional_call``, so that reentrant checkpoints recompute their forward at the
        substituted parameters (and the result is detached)."""
        loss = scalar_loss(self.loss_fn(self.model, batch))
        if backward:
            if loss.requires_grad:
                torch.autograd.backward(loss)
            return loss.detach()
        return loss

    def at(
        self,
        params: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        batch: Any,
        backward: bool = False,
    ) -> torch.Tensor:
        """The loss on ``batch`` with ``params`` (the model's) replaced by ``values``.

        The other trainable parameters are replaced by detached copies, so a backward pass
        reaches no ``.grad`` of the caller's. Names are read at call time: compiled
        submodules are swapped for the modules they wrap while an operator evaluates."""
        chosen = {id(p): value for p, value in zip(params, values, strict=True)}
        substitutes = {
            name: chosen[id(p)] if id(p) in chosen else p.detach()
            for name, p in self.named_parameters()
            if id(p) in chosen or p.requires_grad
        }
        return torch.func.functional_call(  # type: ignore[no-any-return]
            self, substitutes, (batch, backward), strict=False
        )


def native_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    """The parameters' own dtype when float32 or float64 (shared by all), else float32."""
    dtypes = {p.dtype for p in params}
    if len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64}:
        return next(iter(dtypes))
    return torch.float32


class OperatorInputs(NamedTuple):
    """What an operator over (model, batches, params) works on, checked and prepared."""

    model: nn.Module
    param_names: list[str]
    params: list[nn.Parameter]
    device: torch.device
    dtype: torch.dtype
    batches: list[Any]


def operator_inputs(
    model: object,
    batches: object,
    params: Mapping[str, nn.Parameter] | Iterable[nn.Parameter] | None,
    dtype: torch.dtype | None,
) -> OperatorInputs:
    """Check a curvature operator's common arguments and prepare them: the parameters
    resolved (:func:`resolve_params`) on one device, the dtype (``None``: the parameters'
    own, see :func:`native_dtype`), a cast copy of the model when the dtype differs (the
    caller's model is never cast), and the batches moved to the device, floating tensors
    cast to the dtype.

    Raises:
        ValueError: naming the argument, for a model that is not a module, batches that are
            not a non-empty list, a dtype other than float32/float64, or parameters on
            several devices.
    """
    from lightning_curvature.batches import move_batch

    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(batches, (torch.Tensor, Mapping)) or not isinstance(batches, Sequence):
        raise ValueError("batches must be a list of batches (wrap a single batch in a list)")
    if len(batches) == 0:
        raise ValueError("batches must hold at least one batch, got an empty list")
    if dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"dtype must be None, torch.float32 or torch.float64, got {dtype}")
    names, chosen = resolve_params(model, params)
    devices = {p.device for p in chosen}
    if len(devices) != 1:
        raise ValueError(f"params must all live on one device, found {sorted(map(str, devices))}")
    dtype = dtype or native_dtype(chosen)
    if any(p.dtype != dtype for p in chosen):
        model = copy.deepcopy(model).to(dtype)
        by_name = dict(model.named_parameters())
        chosen = [by_name[name] for name in names]
    device = next(iter(devices))
    moved = [move_batch(batch, device, dtype) for batch in batches]
    return OperatorInputs(model, names, chosen, device, dtype, moved)
