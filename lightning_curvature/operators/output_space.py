r"""Curvature in the space of a model's outputs: the middle factor ``M`` of ``Jᵀ M J``.

For the GGN, ``M`` is the Hessian of the loss with respect to the outputs, :math:`H_\ell`:
in closed form for torch's mean-reduced MSE (:math:`\tfrac{2}{\text{numel}} I`) and
cross-entropy (per position :math:`(\operatorname{diag} p - pp^\top)/P`), by double backward
for any other loss. For the Fisher, ``M`` is a mean of outer products :math:`r r^\top` of
per-term output gradients, from the labels (empirical) or from targets drawn from the
model's predictive distribution (true).

A *term* is one summand of the mean loss: a position (sample × extra dimensions, classes
on dimension 1) for cross-entropy, a row along the batch dimension otherwise. Every ``M``
acts on a stack ``U`` of output-shaped columns, shape ``(m, *outputs.shape)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_curvature.operators.loss import scalar_loss


class TermLayout:
    """How outputs split into the terms of the mean loss: ``(..., *shape) <-> (..., P, K)``."""

    def __init__(self, shape: torch.Size, class_dim: bool) -> None:
        self.shape = shape
        self.class_dim = class_dim
        self.term_size = shape[1] if class_dim else math.prod(shape[1:])
        self.num_terms = math.prod(shape) // max(self.term_size, 1)

    def terms(self, t: torch.Tensor) -> torch.Tensor:
        lead = t.ndim - len(self.shape)
        if self.class_dim:
            t = t.movedim(lead + 1, -1)
        return t.reshape(*t.shape[:lead], self.num_terms, self.term_size)

    def from_terms(self, t: torch.Tensor) -> torch.Tensor:
        lead = t.shape[:-2]
        if not self.class_dim:
            return t.reshape(*lead, *self.shape)
        moved = (self.shape[0], *self.shape[2:], self.shape[1])
        return t.reshape(*lead, *moved).movedim(-1, len(lead) + 1)


class ClosedFormHessian:
    """:math:`H_\\ell` of torch's mean-reduced ``"mse"`` or ``"cross_entropy"``."""

    def __init__(self, outputs: torch.Tensor, loss: str) -> None:
        self.layout = TermLayout(outputs.shape, class_dim=loss == "cross_entropy")
        self.loss = loss
        self.numel = outputs.numel()
        if loss == "cross_entropy":
            self.probs = self.layout.terms(torch.softmax(outputs, dim=1))

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        if self.loss == "mse":
            return u * (2.0 / self.numel)
        ut = self.layout.terms(u)
        w = self.probs * ut - self.probs * (self.probs * ut).sum(-1, keepdim=True)
        return self.layout.from_terms(w / self.layout.num_terms)


class AutogradHessian:
    """:math:`H_\\ell` of any loss on the outputs, by double backward on the small graph
    from a detached copy of the outputs to the loss."""

    def __init__(self, outputs: torch.Tensor, loss_on: Callable[[torch.Tensor], Any]) -> None:
        self.leaf = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = scalar_loss(loss_on(self.leaf))
            (self.gradient,) = torch.autograd.grad(loss, self.leaf, create_graph=True)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        if not self.gradient.requires_grad:  # the loss is linear in the outputs
            return torch.zeros_like(u)
        return batched_grad([self.gradient], [self.leaf], [u])[0]


class OuterProducts:
    """``M u = (1/(P·S)) Σ_s Σ_p r_sp (r_spᵀ u_p)`` for per-term gradients r of shape
    (S, P, K): a Fisher's output-space factor."""

    def __init__(self, layout: TermLayout, gradients: torch.Tensor) -> None:
        self.layout = layout
        self.gradients = gradients

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        r = self.gradients
        coefficients = torch.einsum("mpk,spk->msp", self.layout.terms(u), r)
        w = torch.einsum("msp,spk->mpk", coefficients, r) / (r.shape[1] * r.shape[0])
        return self.layout.from_terms(w)


def empirical_fisher(
    outputs: torch.Tensor, loss_on: Callable[[torch.Tensor], Any], class_dim: bool
) -> OuterProducts:
    """Outer products of each term's gradient at the labels. The mean loss weighs every term
    by ``1/P``, so a term's own gradient is ``P`` times its slice of the mean's gradient."""
    layout = TermLayout(outputs.shape, class_dim)
    leaf = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = scalar_loss(loss_on(leaf))
        (gradient,) = torch.autograd.grad(loss, leaf, allow_unused=True, materialize_grads=True)
    return OuterProducts(layout, layout.terms(gradient)[None] * layout.num_terms)


def true_fisher(
    outputs: torch.Tensor, loss: str, num_samples: int, generator: torch.Generator
) -> OuterProducts:
    """Outer products of each term's gradient at targets drawn from the model.

    Cross-entropy: ``y ~ Categorical(softmax(f))`` per position, ``r = p - onehot(y)``.
    MSE: ``y ~ N(f, K/2·I)`` per sample (the Gaussian whose negative log-likelihood is
    ``‖f - y‖²/K`` up to a constant), ``r = (2/K)(f - y) = √(2/K)·ε`` up to sign.
    """
    class_dim = loss == "cross_entropy"
    layout = TermLayout(outputs.shape, class_dim)
    if class_dim:
        probs = layout.terms(torch.softmax(outputs, dim=1))
        drawn = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
        one_hot = nn.functional.one_hot(drawn.mT, probs.shape[-1]).to(probs.dtype)
        return OuterProducts(layout, probs[None] - one_hot)
    shape = (num_samples, layout.num_terms, layout.term_size)
    noise = torch.randn(shape, generator=generator, device=outputs.device, dtype=outputs.dtype)
    return OuterProducts(layout, noise * math.sqrt(2.0 / layout.term_size))


def builtin_loss(name: str, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
    """torch's mean-reduced loss ``name`` of ``outputs`` against ``batch[1]``."""
    targets = _targets(batch)
    if name == "cross_entropy":
        if outputs.ndim < 2:
            raise ValueError(
                "loss_from_output='cross_entropy' needs outputs with a class dimension "
                f"(N, C, ...), got shape {tuple(outputs.shape)}"
            )
        return nn.functional.cross_entropy(outputs, targets)
    if targets.numel() != outputs.numel():
        raise ValueError(
            "loss_from_output='mse' needs targets with as many entries as the outputs "
            f"{tuple(outputs.shape)}, got shape {tuple(targets.shape)}"
        )
    return nn.functional.mse_loss(outputs, targets.reshape(outputs.shape))


def batched_grad(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """Vector-Jacobian products for a stack of cotangents (leading axis), keeping the graph."""
    return list(
        torch.autograd.grad(
            outputs,
            inputs,
            cotangents,
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
            is_grads_batched=True,
        )
    )


def _targets(batch: Any) -> torch.Tensor:
    try:
        targets = batch[1]
    except (TypeError, IndexError, KeyError):
        targets = None
    if not isinstance(targets, torch.Tensor):
        raise ValueError(
            "the built-in losses read targets from batch[1] of an (inputs, targets) batch; "
            "for another batch layout pass a callable loss_from_output(outputs, batch)"
        )
    return targets
