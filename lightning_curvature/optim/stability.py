r"""Stability thresholds per optimizer, read from torch optimizers.

On a quadratic with curvature λ the iteration of an optimizer with step size η is linear,
and it converges exactly while sharpness·η stays below a threshold that depends only on the
optimizer's momentum. This module is the one home of that table (each rule is tested by
running the real optimizer on a quadratic, in tests/test_stability.py):

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

P, the diagonal an adaptive optimizer divides its step by, is read from its state by
:mod:`lightning_curvature.optim.preconditioners`.

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
    "owning_optimizer",
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
PRECONDITIONED = frozenset({"Adam", "AdamW", "AdaHessian", "RMSprop", "Adagrad"})
# Adam's update with a first moment and its bias correction: the same rule and threshold.
ADAM_LIKE = ("Adam", "AdamW", "AdaHessian")


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
            with P from :func:`~lightning_curvature.optim.preconditioners.preconditioner_diagonal`.
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
    momentum, dampening = as_float(momentum), as_float(dampening)
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
    beta1 = as_float(beta1)
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
    optimizer = unwrap_optimizer(optimizer)
    group = param_group_of(optimizer, param_group)
    lr = as_float(group.get("lr", math.nan))
    family = optimizer_family(optimizer)
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
        mu = as_float(group.get("momentum", 0.0))
        flags = (["centered"] if group.get("centered", False) else []) + (
            [f"momentum={mu:g}"] if mu else []
        )
        name = "RMSprop" + (f"({', '.join(flags)})" if flags else "")
        threshold = sgd_threshold(mu)
        bound = "2(1+μ)" if mu else "2"
        sharpness = "λmax(P⁻¹H)·η"
    else:  # Adam, AdamW, AdaHessian
        beta1 = as_float(group["betas"][0])
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
        preconditioned=family in PRECONDITIONED,
        known=True,
        note=f"{name}: {sharpness} < {bound}",
    )


def owning_optimizer(
    optimizers: list[Any], params: list[torch.Tensor]
) -> tuple[Optimizer, int] | None:
    """The optimizer, and the index of its param group, that updates the first parameter of
    ``params`` that any of ``optimizers`` updates: its learning rate and rule are the ones
    that apply to those parameters (GAN-style training has one optimizer per network).
    None when no optimizer updates any of them."""
    unwrapped = [unwrap_optimizer(optimizer) for optimizer in optimizers]
    for p in params:
        for optimizer in unwrapped:
            for index, group in enumerate(optimizer.param_groups):
                if any(q is p for q in group["params"]):
                    return optimizer, index
    return None


def stability_ratio(sharpness: float, rule: StabilityRule) -> float:
    """``sharpness·η / threshold``: 1 is the edge of stability, above 1 a quadratic diverges.

    ``sharpness`` is λmax(H), or λmax(P⁻¹H) when ``rule.preconditioned``.
    """
    if not isinstance(rule, StabilityRule):
        raise ValueError(f"rule must be a StabilityRule, got {type(rule).__name__}")
    return float(sharpness) * rule.learning_rate / rule.threshold


# ------------------------------------------------- reading optimizers (also for preconditioners)
def as_float(value: Any) -> float:
    """A hyper-parameter or step count (a number, or a tensor for capturable optimizers)."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().item())
    return float(value)


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer itself, through Lightning's ``LightningOptimizer`` wrapper."""
    inner = getattr(optimizer, "_optimizer", None)  # Lightning's LightningOptimizer
    if isinstance(inner, Optimizer):
        optimizer = inner
    if not isinstance(optimizer, Optimizer):
        raise ValueError(
            f"optimizer must be a torch.optim.Optimizer (e.g. SGD, Adam, AdamW, RMSprop, "
            f"Adagrad), got {type(optimizer).__name__}"
        )
    return optimizer


def param_group_of(optimizer: Optimizer, param_group: Any) -> dict:
    """The param group at index ``param_group``, or a ValueError naming it."""
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


def optimizer_family(optimizer: Optimizer) -> str | None:
    """``"SGD"``, ``"Adam"``, ``"AdamW"``, ``"RMSprop"``, ``"Adagrad"``, ``"AdaHessian"``, or
    None for an optimizer without a known rule. An optimizer outside torch declares its own
    family as a ``stability_family`` class attribute (AdaHessian does)."""
    declared = getattr(optimizer, "stability_family", None)
    if declared is not None:
        return str(declared)
    for cls in type(optimizer).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls]
    return None


def _sgd_rule(group: dict) -> tuple[str, float, str]:
    beta = as_float(group.get("momentum", 0.0))
    damp = as_float(group.get("dampening", 0.0))
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
