r"""Stability thresholds per optimizer, read from torch optimizers without changing them.

On a quadratic with curvature λ, an optimizer with step size η is stable while its relevant
sharpness times η stays below a threshold (Cohen et al., ICLR 2021 and 2022):

=======================  ==========================  =================================
optimizer                relevant sharpness          threshold on sharpness·η
=======================  ==========================  =================================
SGD                      λmax(H)                     2
SGD, momentum β          λmax(H)                     2(1+β)
  (dampening d)          λmax(H)                     2(1+β)/(1−d)
SGD, Nesterov β          λmax(H)                     2(1+β)/(1+2β)
Adam / AdamW, β1         λmax(P⁻¹H)                  2(1+β1)/(1−β1)   (38 at β1 = 0.9)
RMSprop (momentum μ)     λmax(P⁻¹H)                  2(1+μ)
Adagrad                  λmax(P⁻¹H)                  2
=======================  ==========================  =================================

with P the optimizer's diagonal preconditioner: Adam's :math:`(1-β_1^t)(\sqrt{\hat v}+ε)`
(the bias correction of the first moment folded in), RMSprop's :math:`\sqrt{v}+ε` and
Adagrad's :math:`\sqrt{\sum g^2}+ε`. Any other optimizer gets the plain-SGD rule, marked
``known=False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StabilityRule:
    """The stability rule of one optimizer's param group.

    Attributes:
        optimizer: a readable name with the hyper-parameters that matter.
        threshold: the bound on sharpness·learning rate.
        learning_rate: the group's learning rate η.
        preconditioned: the sharpness is λmax(P⁻¹H) rather than λmax(H).
        known: False when the optimizer is unknown and the plain-SGD rule stands in.
        note: one readable line stating the rule.
    """

    optimizer: str
    threshold: float
    learning_rate: float
    preconditioned: bool
    known: bool
    note: str


def sgd_threshold(momentum: float = 0.0, nesterov: bool = False, dampening: float = 0.0) -> float:
    """Threshold on λ·η for PyTorch's SGD.

    PyTorch's heavy ball is ``b ← βb + (1−d)g``, ``x ← x − ηb``: on a quadratic its
    iteration matrix is stable while ``(1−d)λη < 2(1+β)``. Nesterov uses ``g + βb`` as the
    step, which is stable while ``λη < 2(1+β)/(1+2β)`` (for d = 0).
    """
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not 0 <= dampening < 1:
        raise ValueError(f"dampening must be in [0, 1), got {dampening!r}")
    if nesterov:
        return 2 * (1 + momentum) / (1 + 2 * momentum)
    return 2 * (1 + momentum) / (1 - dampening)


def adaptive_threshold(beta1: float) -> float:
    """Threshold on λmax(P⁻¹H)·η for Adam-family optimizers: 2(1+β1)/(1−β1)."""
    if not 0 <= beta1 < 1:
        raise ValueError(f"beta1 must be in [0, 1), got {beta1!r}")
    return 2 * (1 + beta1) / (1 - beta1)


def _group(optimizer: torch.optim.Optimizer, param_group: int) -> dict:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    groups = optimizer.param_groups
    if (
        isinstance(param_group, bool)
        or not isinstance(param_group, int)
        or not (0 <= param_group < len(groups))
    ):
        raise ValueError(f"param_group must be an index in [0, {len(groups)}), got {param_group!r}")
    return groups[param_group]


def _adam_family(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam))


def stability_rule(optimizer: torch.optim.Optimizer, param_group: int = 0) -> StabilityRule:
    """The rule for ``optimizer``'s param group ``param_group``, from its own hyper-parameters."""
    group = _group(optimizer, param_group)
    lr = float(group["lr"])
    name = type(optimizer).__name__
    if type(optimizer) is torch.optim.SGD:
        momentum, nesterov = float(group["momentum"]), bool(group["nesterov"])
        dampening = float(group["dampening"])
        threshold = sgd_threshold(momentum, nesterov, dampening)
        label = (
            "SGD"
            if momentum == 0
            else (
                f"SGD(nesterov, momentum={momentum:g})"
                if nesterov
                else f"SGD(momentum={momentum:g}"
                + (f", dampening={dampening:g})" if dampening else ")")
            )
        )
        return StabilityRule(
            label, threshold, lr, False, True, f"{label}: λmax·η < {threshold:.4g}"
        )
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1 = float(group["betas"][0])
        threshold = adaptive_threshold(beta1)
        return StabilityRule(
            name,
            threshold,
            lr,
            True,
            True,
            f"{name}: λmax(P⁻¹H)·η < 2(1+β1)/(1−β1) = {threshold:.4g}",
        )
    if isinstance(optimizer, torch.optim.RMSprop):
        momentum = float(group["momentum"])
        threshold = 2 * (1 + momentum)
        return StabilityRule(
            name, threshold, lr, True, True, f"{name}: λmax(P⁻¹H)·η < 2(1+μ) = {threshold:.4g}"
        )
    if isinstance(optimizer, torch.optim.Adagrad):
        return StabilityRule(name, 2.0, lr, True, True, f"{name}: λmax(P⁻¹H)·η < 2")
    return StabilityRule(
        name,
        2.0,
        lr,
        False,
        False,
        f"no stability rule is known for {name}: the plain-SGD threshold λmax·η < 2 is shown",
    )


def _preconditioner_of(optimizer: torch.optim.Optimizer, group: dict, state: dict) -> torch.Tensor:
    eps = float(group["eps"])
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1, beta2 = (float(b) for b in group["betas"])
        step = float(state["step"])
        second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        v_hat = second / (1 - beta2**step)
        return (1 - beta1**step) * (v_hat.sqrt() + eps)
    if isinstance(optimizer, torch.optim.RMSprop):
        average = state["square_avg"]
        if group.get("centered"):
            average = average - state["grad_avg"] ** 2
        return average.sqrt() + eps
    return state["sum"].sqrt() + eps  # Adagrad


def preconditioner_diagonal(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor]
) -> torch.Tensor | None:
    """P's diagonal for ``params`` (flat, in their order), read from the optimizer's state.

    None when the optimizer has no preconditioner or has not stepped yet. The state is only
    read: nothing is created or modified.
    """
    if not stability_rule(optimizer).preconditioned:
        return None
    owner = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    pieces = []
    for p in params:
        if id(p) not in owner:
            raise ValueError(
                "params must be parameters of the optimizer; one is not in any of its param groups"
            )
        state = optimizer.state.get(p)
        if not state:
            return None  # before the first step
        with torch.no_grad():
            pieces.append(_preconditioner_of(optimizer, owner[id(p)], state).reshape(-1).float())
    return torch.cat(pieces)


def stability_ratio(sharpness: float, rule: StabilityRule) -> float:
    """Sharpness·η over the threshold: 1 is the edge of stability."""
    return sharpness * rule.learning_rate / rule.threshold
