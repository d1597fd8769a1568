r"""Stability thresholds per optimizer, read from torch optimizers.

On a quadratic with curvature λ the iteration of an optimizer with step size η is linear,
and it converges exactly while sharpness·η stays below a threshold that depends only on the
optimizer's momentum. This module is the one home of that table (DESIGN.md, "Stability
thresholds"):

==================================  ======================  ==============================
optimizer                           sharpness               bound on sharpness·η
==================================  ======================  ==============================
SGD                                 λmax(H)                 2
SGD, heavy-ball momentum β          λmax(H)                 2(1+β)
SGD, momentum β, dampening d        λmax(H)                 2(1+β)/(1−d)
SGD, Nesterov momentum β            λmax(H)                 2(1+β)/(1+2β)
Adam / AdamW (β1)                   λmax(P⁻¹H)              2(1+β1)/(1−β1)  (38 at β1=0.9)
RMSprop (momentum μ, 0 by default)  λmax(P⁻¹H)              2(1+μ)
Adagrad                             λmax(P⁻¹H)              2
anything else                       λmax(H), known=False    2 (the plain-SGD rule)
==================================  ======================  ==============================

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

Not modelled: L2 ``weight_decay`` (adds wd to every eigenvalue the update feels, usually
negligible against λmax), ``maximize=True``, and the first, undamped SGD step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop

__all__ = [
    "StabilityRule",
    "adaptive_threshold",
    "first_moment_settled",
    "owning_optimizer",
    "preconditioner_diagonal",
    "sgd_threshold",
    "stability_ratio",
    "stability_rule",
]

# Most derived first: AdamW subclasses Adam. A subclass of one of these is assumed to keep
# its base class's update.
_FAMILIES: dict[type, str] = {
    AdamW: "AdamW",
    Adam: "Adam",
    RMSprop: "RMSprop",
    Adagrad: "Adagrad",
    SGD: "SGD",
}
_PRECONDITIONED = frozenset({"Adam", "AdamW", "AdaHessian", "RMSprop", "Adagrad"})
# Adam's update with a first moment and its bias correction: the same rule and threshold.
_ADAM_LIKE = ("Adam", "AdamW", "AdaHessian")


@dataclass(frozen=True)
class StabilityRule:
    """The stability edge of one optimizer's param group.

    Training on a quadratic converges while ``sharpness·learning_rate < threshold``, with
    sharpness λmax(H) for SGD-like optimizers and λmax(P⁻¹H) when ``preconditioned``.

    Attributes:
        optimizer: what was read, e.g. ``"SGD"``, ``"SGD(momentum=0.9)"``,
            ``"SGD(nesterov, momentum=0.9)"``, ``"Adam"``, ``"AdamW"``, ``"RMSprop"``,
            ``"Adagrad"``, or the class name of an optimizer that is not known.
        threshold: the bound on sharpness·η (may be ``inf`` for SGD with dampening 1).
        learning_rate: η, the ``lr`` of the param group read.
        preconditioned: True for Adam/AdamW/RMSprop/Adagrad, whose sharpness is λmax(P⁻¹H)
            with P from :func:`preconditioner_diagonal`.
        known: False when the optimizer is not known and the plain-SGD rule stands in.
        note: one line for a user, e.g. ``"Adam: λmax(P⁻¹H)·η < 2(1+β1)/(1−β1) = 38"``.
    """

    optimizer: str
    threshold: float
    learning_rate: float
    preconditioned: bool
    known: bool
    note: str


def sgd_threshold(momentum: float = 0.0, nesterov: bool = False, dampening: float = 0.0) -> float:
    r"""The bound on λ·η under which torch's SGD converges on a quadratic of curvature λ.

    With a = λη and PyTorch's update ``b ← βb + (1−d)g``, ``x ← x − η(g + βb)`` (Nesterov)
    or ``x ← x − ηb`` (heavy ball), the iteration matrix has the characteristic polynomial
    ``z² − Tz + D`` and the Jury conditions give:

    * β = 0: a < 2 (torch then uses neither momentum nor dampening);
    * heavy ball: a(1−d) < 2(1+β), i.e. heavy ball with step (1−d)η; 2(1+β) when d = 0;
    * Nesterov: a < 2(1+β)/(1+β(2−d)), which is 2(1+β)/(1+2β) for torch (d must be 0).

    Args:
        momentum: β, in [0, 1).
        nesterov: Nesterov momentum instead of heavy ball.
        dampening: d, in [0, 1]; d = 1 without Nesterov never moves after the first step
            (threshold ``inf``).
    """
    momentum, dampening = _scalar(momentum), _scalar(dampening)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1) for a stable iteration, got {momentum}")
    if not 0.0 <= dampening <= 1.0:
        raise ValueError(f"dampening must be in [0, 1], got {dampening}")
    if momentum == 0.0:
        return 2.0
    if nesterov:
        return 2.0 * (1.0 + momentum) / (1.0 + momentum * (2.0 - dampening))
    if dampening == 1.0:
        return math.inf
    return 2.0 * (1.0 + momentum) / (1.0 - dampening)


def adaptive_threshold(beta1: float) -> float:
    r"""The bound on λmax(P⁻¹H)·η for Adam-like optimizers with first-moment decay β1.

    With P frozen, Adam's ``m ← β1·m + (1−β1)g``, ``x ← x − ηP⁻¹m`` is heavy ball with
    momentum β1 and step (1−β1)η on P⁻¹H, so it converges while
    ``λ(P⁻¹H)·η < 2(1+β1)/(1−β1)``: 38 at β1 = 0.9, 2 at β1 = 0 (RMSprop, Adagrad).

    Args:
        beta1: β1, in [0, 1).
    """
    beta1 = _scalar(beta1)
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"beta1 must be in [0, 1), got {beta1}")
    return 2.0 * (1.0 + beta1) / (1.0 - beta1)


def stability_rule(optimizer: Optimizer, param_group: int = 0) -> StabilityRule:
    """The stability rule of ``optimizer``, read from the hyper-parameters of one param group.

    Known: ``torch.optim.SGD`` (momentum, dampening, Nesterov), ``Adam``, ``AdamW``,
    ``RMSprop`` (momentum), ``Adagrad`` and their subclasses. Any other optimizer gets the
    plain-SGD rule (λmax·η < 2) with ``known=False``; the caller should warn once. A
    Lightning ``LightningOptimizer`` wrapper is read through to the optimizer it wraps.

    Args:
        optimizer: a ``torch.optim.Optimizer``; it is not changed.
        param_group: index of the param group whose ``lr`` and momentum are read.
    """
    optimizer = _unwrap(optimizer)
    group = _group(optimizer, param_group)
    lr = _scalar(group.get("lr", math.nan))
    family = _family(optimizer)
    if family is None:
        name = type(optimizer).__name__
        return StabilityRule(
            optimizer=name,
            threshold=2.0,
            learning_rate=lr,
            preconditioned=False,
            known=False,
            note=(
                f"{name} is not an optimizer with a known stability threshold; using the "
                "plain-SGD rule λmax·η < 2, which may not be its edge of stability"
            ),
        )
    if family == "SGD":
        name, threshold, bound = _sgd_rule(group)
        sharpness = "λmax·η"
    elif family == "Adagrad":
        name, threshold, bound = "Adagrad", 2.0, "2"
        sharpness = "λmax(P⁻¹H)·η"
    elif family == "RMSprop":
        mu = _scalar(group.get("momentum", 0.0))
        flags = (["centered"] if group.get("centered", False) else []) + (
            [f"momentum={mu:g}"] if mu else []
        )
        name = "RMSprop" + (f"({', '.join(flags)})" if flags else "")
        threshold = sgd_threshold(mu)
        bound = "2(1+μ)" if mu else "2"
        sharpness = "λmax(P⁻¹H)·η"
    else:  # Adam, AdamW, AdaHessian
        beta1 = _scalar(group["betas"][0])
        name = family + ("(amsgrad)" if group.get("amsgrad", False) else "")
        threshold = adaptive_threshold(beta1)
        bound = "2(1+β1)/(1−β1)"
        sharpness = "λmax(P⁻¹H)·η"
    if bound != "2":
        bound = f"{bound} = {threshold:.4g}"
    return StabilityRule(
        optimizer=name,
        threshold=threshold,
        learning_rate=lr,
        preconditioned=family in _PRECONDITIONED,
        known=True,
        note=f"{name}: {sharpness} < {bound}",
    )


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
    optimizer = _unwrap(optimizer)
    reference = _group(optimizer, param_group)
    params = _check_params(params)
    if missing not in ("raise", "exclude"):
        raise ValueError(f"missing must be 'raise' or 'exclude', got {missing!r}")
    family = _family(optimizer)
    if family not in _PRECONDITIONED:
        return None
    owners = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    if not any(_stepped(optimizer.state.get(p)) for p in _all_params(optimizer)):
        return None
    lr_ref = _scalar(reference.get("lr", 1.0))
    device = params[0].device
    pieces = []
    for index, p in enumerate(params):
        group = owners.get(id(p))
        state = optimizer.state.get(p)
        if missing == "exclude" and (group is None or not _stepped(state)):
            pieces.append(torch.full((p.numel(),), math.inf, device=device))
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
        if family == "AdaHessian":  # P = (1−β1ᵗ)((√v̂)^k + ε), its own Hessian power k
            diagonal = optimizer.preconditioner_diagonal([p])  # type: ignore[attr-defined]
        else:
            assert state is not None  # _stepped(state) held
            diagonal = _diagonal(family, group, state)
        lr = _scalar(group.get("lr", lr_ref))
        if lr != lr_ref and lr_ref != 0.0:
            diagonal = (
                diagonal * (lr_ref / lr) if lr != 0.0 else torch.full_like(diagonal, math.inf)
            )
        pieces.append(diagonal.reshape(-1).to(device=device, dtype=torch.float32))
    return torch.cat(pieces)


def owning_optimizer(
    optimizers: list[Any], params: list[torch.Tensor]
) -> tuple[Optimizer, int] | None:
    """The optimizer, and the index of its param group, that updates the first parameter of
    ``params`` that any of ``optimizers`` updates: its learning rate and rule are the ones
    that apply to those parameters (GAN-style training has one optimizer per network).
    None when no optimizer updates any of them."""
    unwrapped = [_unwrap(optimizer) for optimizer in optimizers]
    for p in params:
        for optimizer in unwrapped:
            for index, group in enumerate(optimizer.param_groups):
                if any(q is p for q in group["params"]):
                    return optimizer, index
    return None


def first_moment_settled(optimizer: Optimizer, tolerance: float = 0.1) -> bool:
    r"""Whether an Adam-family optimizer's first-moment bias correction has settled.

    Adam's P carries the factor :math:`1-\beta_1^t`, which is 0.1 at its first step (β1 =
    0.9): there P⁻¹H, and so the stability ratio, is inflated ten-fold, although the step
    itself is not (m is just as small). The frozen-P quadratic model behind the threshold
    holds once :math:`\beta_1^t \le` ``tolerance`` (t ≥ 22 at β1 = 0.9); before that the
    ratio is logged but should not raise an alert. Optimizers without a first-moment bias
    correction (SGD, RMSprop, Adagrad, unknown ones) are always settled.
    """
    optimizer = _unwrap(optimizer)
    if _family(optimizer) not in _ADAM_LIKE:
        return True
    # One read of each state's step count (a tensor, on the device for capturable Adam).
    steps = [_scalar(state["step"]) for state in optimizer.state.values() if "step" in state]
    if not steps or max(steps) <= 0:
        return False
    beta1 = _scalar(optimizer.param_groups[0]["betas"][0])
    return beta1 ** max(steps) <= tolerance


def stability_ratio(sharpness: float, rule: StabilityRule) -> float:
    """``sharpness·η / threshold``: 1 is the edge of stability, above 1 a quadratic diverges.

    ``sharpness`` is λmax(H), or λmax(P⁻¹H) when ``rule.preconditioned``.
    """
    if not isinstance(rule, StabilityRule):
        raise ValueError(f"rule must be a StabilityRule, got {type(rule).__name__}")
    return float(sharpness) * rule.learning_rate / rule.threshold


# --------------------------------------------------------------------------- helpers
def _scalar(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().item())
    return float(value)


def _unwrap(optimizer: Any) -> Optimizer:
    inner = getattr(optimizer, "_optimizer", None)  # Lightning's LightningOptimizer
    if isinstance(inner, Optimizer):
        optimizer = inner
    if not isinstance(optimizer, Optimizer):
        raise ValueError(
            f"optimizer must be a torch.optim.Optimizer (e.g. SGD, Adam, AdamW, RMSprop, "
            f"Adagrad), got {type(optimizer).__name__}"
        )
    return optimizer


def _group(optimizer: Optimizer, param_group: Any) -> dict:
    count = len(optimizer.param_groups)
    if (
        isinstance(param_group, bool)
        or not isinstance(param_group, int)
        or not 0 <= param_group < count
    ):
        raise ValueError(
            f"param_group must be an int from 0 to {count - 1} (the optimizer has {count} "
            f"param group{'s' if count != 1 else ''}), got {param_group!r}"
        )
    return optimizer.param_groups[param_group]


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


def _family(optimizer: Optimizer) -> str | None:
    from lightning_curvature.optim.adahessian import AdaHessian  # a layer above: import late

    if isinstance(optimizer, AdaHessian):
        return "AdaHessian"
    for cls in type(optimizer).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls]
    return None


def _sgd_rule(group: dict) -> tuple[str, float, str]:
    beta = _scalar(group.get("momentum", 0.0))
    damp = _scalar(group.get("dampening", 0.0))
    nesterov = bool(group.get("nesterov", False))
    threshold = sgd_threshold(beta, nesterov, damp)
    if beta == 0.0:
        return "SGD", threshold, "2"
    flags = (["nesterov"] if nesterov else []) + [f"momentum={beta:g}"]
    if damp:
        flags.append(f"dampening={damp:g}")
    if nesterov:
        bound = "2(1+β)/(1+2β)" if not damp else "2(1+β)/(1+β(2−d))"
    else:
        bound = "2(1+β)" if not damp else "2(1+β)/(1−d)"
    return f"SGD({', '.join(flags)})", threshold, bound


def _all_params(optimizer: Optimizer):
    for group in optimizer.param_groups:
        yield from group["params"]


def _stepped(state: Any) -> bool:
    return bool(state) and "step" in state and _scalar(state["step"]) > 0


def _diagonal(family: str, group: dict, state: dict) -> torch.Tensor:
    """P for one parameter, out of place (the state tensors are only read)."""
    eps = _scalar(group.get("eps", 0.0))
    t = _scalar(state["step"])
    if family in ("Adam", "AdamW"):
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        v = _real(state[key])
        return (1.0 - beta1**t) * (torch.sqrt(v / (1.0 - beta2**t)) + eps)
    if family == "RMSprop":
        v = _real(state["square_avg"])
        if group.get("centered", False):
            v = torch.clamp_min(v - _real(state["grad_avg"]) ** 2, 0.0)
        return torch.sqrt(v) + eps
    # Adagrad
    decay = 1.0 + (t - 1.0) * _scalar(group.get("lr_decay", 0.0))
    return decay * (torch.sqrt(_real(state["sum"])) + eps)


def _real(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    return tensor.to(torch.float32)
