r"""P, the diagonal preconditioner of an adaptive optimizer's last update, read from its
state without changing it.

For Adam, AdamW, RMSprop, Adagrad and AdaHessian the sharpness their threshold bounds is
λmax(P⁻¹H) (:mod:`lightning_curvature.optim.stability` holds the thresholds).
P is the diagonal the adaptive optimizer divides its step by, so that its last update was
``x ← x − η·P⁻¹·u`` (u the gradient, or the momentum buffer/first moment):

* Adam/AdamW: ``P = (1−β1ᵗ)·(√v̂ + ε)``, ``v̂ = v/(1−β2ᵗ)``, v = ``exp_avg_sq`` (or
  ``max_exp_avg_sq`` with ``amsgrad=True``);
* RMSprop: ``P = √v + ε`` with v = ``square_avg``, or ``square_avg − grad_avg²`` when
  ``centered=True``;
* Adagrad: ``P = (1 + (t−1)·lr_decay)·(√Σg² + ε)``: the learning-rate decay is folded
  into P, as Adam's first bias correction is, so η stays the group's ``lr``.

t is the ``step`` in the optimizer's state: P is exactly the preconditioner of the
optimizer's most recent update. Everything here reads optimizers without changing them.

* AdaHessian: ``P = (1−β1ᵗ)·((√v̂)^k + ε)`` with its own Hessian power k, as
  ``AdaHessian.preconditioner_diagonal`` reads it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_curvature._shards import local_part
from lightning_curvature.optim.stability import (
    ADAM_LIKE,
    PRECONDITIONED,
    StabilityRule,
    as_float,
    optimizer_family,
    owning_optimizer,
    param_group_of,
    stability_rule,
    unwrap_optimizer,
)

__all__ = ["OptimizerView", "first_moment_settled", "optimizer_view", "preconditioner_diagonal"]


@dataclass(frozen=True, eq=False)
class OptimizerView:
    """What the optimizer that updates some parameters says about their curvature: which
    optimizer (and param group) it is, its stability rule, and, for adaptive optimizers,
    P's diagonal over those parameters (∞ where it has no state yet). All None when no
    optimizer updates them."""

    optimizer: Optimizer | None = None
    param_group: int = 0
    rule: StabilityRule | None = None
    preconditioner: torch.Tensor | None = None


def optimizer_view(optimizers: Sequence[Any], params: Sequence[torch.Tensor]) -> OptimizerView:
    """The chain owning optimizer → stability rule → preconditioner, in one place for the
    monitor and ``analyze``. Reads the optimizer's state without changing it."""
    owner = owning_optimizer(list(optimizers), list(params))
    if owner is None:
        return OptimizerView()
    optimizer, group = owner
    rule = stability_rule(optimizer, group)
    preconditioner = (
        preconditioner_diagonal(optimizer, list(params), group, missing="exclude")
        if rule.preconditioned
        else None
    )
    return OptimizerView(optimizer, group, rule, preconditioner)


def preconditioner_diagonal(
    optimizer: Optimizer,
    params: list[torch.Tensor],
    param_group: int = 0,
    *,
    missing: str = "raise",
) -> torch.Tensor | None:
    r"""The diagonal of P, the preconditioner of an adaptive optimizer's last update.

    λmax(P⁻¹H)·η, compared with :func:`stability_rule`'s threshold, is the stability ratio of
    Adam, AdamW, RMSprop and Adagrad; P is defined in the module docstring. Each
    parameter's ε, betas and lr_decay come from the param group that owns it. When groups
    have different learning rates, P is also scaled by ``η_ref/η_group`` (η_ref the ``lr``
    of ``param_group``), so that λmax(P⁻¹H)·η_ref is the sharpness·lr every update feels;
    with a single learning rate (the usual case) that factor is 1, and a group with lr 0
    gets P = inf (it does not move).

    The state is only read: no state is created and no state tensor is changed.

    Args:
        optimizer: a ``torch.optim.Optimizer``.
        params: the parameters of the Hessian, in the order of its flat vectors.
        param_group: the group whose ``lr`` is η_ref (as in :func:`stability_rule`).
        missing: what to do with a parameter the optimizer has no state for (unused so
            far, frozen late, just added, or owned by another optimizer): ``"raise"`` a
            ValueError, or ``"exclude"`` it by giving it P = inf, which removes its rows and
            columns from P⁻¹ᐟ²HP⁻¹ᐟ² (this optimizer does not move it).

    Returns:
        P's diagonal, flat (``params`` concatenated in order), float32, on the device of
        ``params[0]``; ``None`` when the optimizer is not preconditioned (SGD, unknown) or
        has not stepped yet.

    Raises:
        ValueError: a parameter in ``params`` that the optimizer does not update or has no
            state for (frozen, no gradient yet), or bad arguments.
    """
    optimizer = unwrap_optimizer(optimizer)
    reference = param_group_of(optimizer, param_group)
    params = _check_params(params)
    if missing not in ("raise", "exclude"):
        raise ValueError(f"missing must be 'raise' or 'exclude', got {missing!r}")
    family = optimizer_family(optimizer)
    if family not in PRECONDITIONED:
        return None
    owners = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    if not any(_stepped(optimizer.state.get(p)) for p in _all_params(optimizer)):
        return None
    lr_ref = as_float(reference.get("lr", 1.0))
    device = params[0].device
    pieces = []
    for index, p in enumerate(params):
        group = owners.get(id(p))
        state = optimizer.state.get(p)
        if missing == "exclude" and (group is None or not _stepped(state)):
            pieces.append(torch.full((local_part(p).numel(),), math.inf, device=device))
            continue
        if group is None:
            raise ValueError(
                f"params[{index}] (shape {tuple(p.shape)}) is not in any param group of the "
                f"{type(optimizer).__name__} optimizer: pass only the parameters it updates"
            )
        if not _stepped(state):
            raise ValueError(
                f"params[{index}] (shape {tuple(p.shape)}) has no {family} state: it has not "
                "been updated yet (frozen, or no gradient so far); pass only the parameters "
                "the optimizer has stepped"
            )
        own_diagonal = getattr(optimizer, "preconditioner_diagonal", None)
        if own_diagonal is not None:  # an optimizer that knows its own P (AdaHessian)
            diagonal = own_diagonal([p])
        else:
            assert state is not None  # _stepped(state) held
            diagonal = _diagonal(family, group, state)
        lr = as_float(group.get("lr", lr_ref))
        if lr != lr_ref and lr_ref != 0.0:
            diagonal = (
                diagonal * (lr_ref / lr) if lr != 0.0 else torch.full_like(diagonal, math.inf)
            )
        pieces.append(diagonal.reshape(-1).to(device=device, dtype=torch.float32))
    return torch.cat(pieces)


def first_moment_settled(optimizer: Optimizer, tolerance: float = 0.1) -> bool:
    r"""Whether an Adam-family optimizer's first-moment bias correction has settled.

    Adam's P carries the factor :math:`1-\beta_1^t`, which is 0.1 at its first step (β1 =
    0.9): there P⁻¹H, and so the stability ratio, is inflated ten-fold, although the step
    itself is not (m is just as small). The frozen-P quadratic model behind the threshold
    holds once :math:`\beta_1^t \le` ``tolerance`` (t ≥ 22 at β1 = 0.9); before that the
    ratio is logged but should not raise an alert. Optimizers without a first-moment bias
    correction (SGD, RMSprop, Adagrad, unknown ones) are always settled.
    """
    optimizer = unwrap_optimizer(optimizer)
    if optimizer_family(optimizer) not in ADAM_LIKE:
        return True
    # One read of each state's step count (a tensor, on the device for capturable Adam).
    steps = [as_float(state["step"]) for state in optimizer.state.values() if "step" in state]
    if not steps or max(steps) <= 0:
        return False
    beta1 = as_float(optimizer.param_groups[0]["betas"][0])
    return beta1 ** max(steps) <= tolerance


def _check_params(params: Any) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        raise ValueError("params must be a list of parameter tensors, got a single tensor")
    try:
        params = list(params)
    except TypeError:
        raise ValueError(
            f"params must be a list of parameter tensors, got {type(params).__name__}"
        ) from None
    if not params:
        raise ValueError("params must be a non-empty list of parameter tensors, got []")
    for index, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise ValueError(
                f"params must be a list of parameter tensors; params[{index}] is a "
                f"{type(p).__name__}"
            )
    return params


def _all_params(optimizer: Optimizer):
    for group in optimizer.param_groups:
        yield from group["params"]


def _stepped(state: Any) -> bool:
    return bool(state) and "step" in state and as_float(state["step"]) > 0


def _diagonal(family: str, group: dict, state: dict) -> torch.Tensor:
    """P for one parameter, out of place (the state tensors are only read)."""
    eps = as_float(group.get("eps", 0.0))
    t = as_float(state["step"])
    if family in ("Adam", "AdamW"):
        beta1, beta2 = (as_float(b) for b in group["betas"])
        key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        v = _real(state[key])
        return (1.0 - beta1**t) * (torch.sqrt(v / (1.0 - beta2**t)) + eps)
    if family == "RMSprop":
        v = _real(state["square_avg"])
        if group.get("centered", False):
            v = torch.clamp_min(v - _real(state["grad_avg"]) ** 2, 0.0)
        return torch.sqrt(v) + eps
    # Adagrad
    decay = 1.0 + (t - 1.0) * as_float(group.get("lr_decay", 0.0))
    return decay * (torch.sqrt(_real(state["sum"])) + eps)


def _real(tensor: torch.Tensor) -> torch.Tensor:
    tensor = local_part(tensor.detach())  # a sharded parameter's state is sharded alike
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    return tensor.to(torch.float32)
