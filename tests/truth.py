"""Independent truth for the tests: dense Hessians in float64 and matrices of known spectrum.

Nothing here uses the package: the dense Hessian comes from reverse-over-reverse
differentiation (``torch.autograd.functional.hessian``) of the loss as a function of one flat
float64 parameter vector. Not ``torch.func.hessian``: its forward-over-reverse (and
``jacrev(jacrev)``) returns a wrong, asymmetric Hessian through train-mode batch
normalization on torch 2.13 (tests/test_truth.py shows it), where reverse-over-reverse agrees
with central differences of float64 gradients.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def dense_hessian(model: nn.Module, loss_fn, batches, param_names=None) -> torch.Tensor:
    """The exact Hessian of the mean loss over ``batches``, in float64."""
    model64 = copy.deepcopy(model).double()
    named = dict(model64.named_parameters())
    names = param_names or [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [named[n].shape for n in names]
    batches64 = [
        tuple(t.double() if t.is_floating_point() else t for t in b)
        if isinstance(b, (tuple, list))
        else b.double()
        for b in batches
    ]

    class LossOf(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model64

        def forward(self, batch):
            return loss_fn(self.model, batch)

    wrapper = LossOf()

    def mean_loss(theta: torch.Tensor) -> torch.Tensor:
        values, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            values["model." + name] = theta[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        losses = [torch.func.functional_call(wrapper, values, (b,)) for b in batches64]
        return sum(losses) / len(losses)

    theta = torch.cat([named[n].detach().reshape(-1) for n in names])
    # The math attention kernel: fused ones have no double backward.
    with sdpa_kernel(SDPBackend.MATH):
        hessian = torch.autograd.functional.hessian(mean_loss, theta, vectorize=True)
    return hessian.detach()


def matrix_with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A dense symmetric float64 matrix ``Q diag(λ) Qᵀ`` with a random orthogonal Q."""
    generator = torch.Generator().manual_seed(seed)
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * eigenvalues.double()) @ q.T


def cross_entropy_loss(model: nn.Module, batch) -> torch.Tensor:
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs), targets)


def classification_batches(num_batches: int, batch_size: int, shape, num_classes: int, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, *shape, generator=generator),
            torch.randint(0, num_classes, (batch_size,), generator=generator),
        )
        for _ in range(num_batches)
    ]


def tanh_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 4)
    )


def relu_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 4))


def small_cnn(seed: int = 0) -> nn.Module:
    """A CNN with BatchNorm; callers put it in eval mode for a deterministic Hessian."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 3),
    )
    # Non-trivial running statistics, as after some training.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def finite_difference_hvp(model: nn.Module, loss_fn, batches, v: torch.Tensor, eps=1e-5):
    """``H v`` by central differences of first-order float64 gradients: no double backward
    and no forward AD, so it is independent of how the package computes products."""
    model64 = copy.deepcopy(model).double()
    params = [p for p in model64.parameters() if p.requires_grad]
    batches64 = [tuple(t.double() if t.is_floating_point() else t for t in b) for b in batches]

    def gradient_at(shift: float) -> torch.Tensor:
        with torch.no_grad():
            offset = 0
            for p in params:
                p.add_(shift * v[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        loss = sum(loss_fn(model64, b) for b in batches64) / len(batches64)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            offset = 0
            for p in params:
                p.sub_(shift * v[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        return torch.cat([g.reshape(-1) for g in grads])

    return (gradient_at(eps) - gradient_at(-eps)) / (2 * eps)


def mean_loss_gradient(model: nn.Module, loss_fn, batches, dtype: torch.dtype) -> torch.Tensor:
    """The flat gradient of the mean loss over the trainable parameters, computed in ``dtype``
    (returned in float64)."""
    copied = copy.deepcopy(model).to(dtype)
    params = [p for p in copied.parameters() if p.requires_grad]
    cast = [tuple(t.to(dtype) if t.is_floating_point() else t for t in b) for b in batches]
    loss = sum(loss_fn(copied, b) for b in cast) / len(cast)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()


def central_difference_rounding(
    model: nn.Module, loss_fn, batches, v: torch.Tensor, step: float, hessian: torch.Tensor
) -> float:
    """The rounding error to expect of a central difference ``(g(θ + εv) − g(θ − εv))/2ε`` of
    gradients in ``v.dtype`` (ε = ``step``) against ``H v``, measured on this machine without
    the package; a tolerance is a margin times this. Two parts:

    - the gradients' rounding over the step, ``δ/ε``: δ = ‖g₃₂ − g₆₄‖ at θ, which depends on
      the BLAS's summation order; in float64 δ·u₆₄/u₃₂, the same operations rounded at a
      finer unit u;
    - the rounding of the shifted parameters, ``‖H (fl(θ + εv) − (θ + εv))‖/ε``, the
      addition's exact error taken by TwoSum.

    Truncation (ε²·g‴, kinks crossed) is left out: it is what a too-large step would add.
    """
    dtype = v.dtype
    delta = float(
        torch.linalg.vector_norm(
            mean_loss_gradient(model, loss_fn, batches, torch.float32)
            - mean_loss_gradient(model, loss_fn, batches, torch.float64)
        )
    )
    if dtype == torch.float64:
        delta *= torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    theta, shift = theta.to(dtype), v * torch.tensor(step, dtype=dtype)
    shifted = theta + shift
    back = shifted - theta
    rounding = (theta - (shifted - back)) + (shift - back)  # TwoSum: shifted - (θ + εv), exactly
    return (delta + float(torch.linalg.vector_norm(hessian @ rounding.double()))) / step


def adam_preconditioner(
    exp_avg_sq: torch.Tensor, step: float, beta1: float = 0.9, beta2: float = 0.999, eps=1e-8
) -> torch.Tensor:
    """Adam's diagonal preconditioner ``P = (1 − β1ᵗ)(√v̂ + ε)``, ``v̂ = v / (1 − β2ᵗ)``, in
    float64, written out from torch.optim.Adam's update ``x ← x − η·m̂ / (√v̂ + ε)`` with
    ``m̂ = m / (1 − β1ᵗ)`` (so the step is ``η·m / P``)."""
    v_hat = exp_avg_sq.double() / (1 - beta2**step)
    return (1 - beta1**step) * (v_hat.sqrt() + eps)


def preconditioned_lambda_max(hessian: torch.Tensor, diagonal: torch.Tensor) -> float:
    """The largest eigenvalue of ``P⁻¹H`` for a diagonal P, from the similar symmetric
    matrix ``P^-1/2 H P^-1/2`` (dense, float64)."""
    scale = diagonal.double().rsqrt()
    return torch.linalg.eigvalsh(scale[:, None] * hessian.double() * scale[None, :])[-1].item()
