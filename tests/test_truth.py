"""The tests' own truth, checked against something independent of it: the dense Hessian of
``tests/truth.py`` against central differences of float64 gradients, on the models where
forward-over-reverse differentiation was found wrong (train-mode batch normalization)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.truth import cross_entropy_loss, dense_hessian


def _central_difference_hessian(model: nn.Module, batch) -> torch.Tensor:
    """Column i is (g(θ + h·e_i) − g(θ − h·e_i)) / 2h, g the float64 gradient."""
    model64 = copy.deepcopy(model).double()
    params = list(model64.parameters())
    inputs, targets = batch
    batch64 = (inputs.double(), targets)

    def gradient() -> torch.Tensor:
        loss = cross_entropy_loss(model64, batch64)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    flat = [p.view(-1) for p in params]
    columns = []
    for p in flat:
        for index in range(p.numel()):
            # h balances truncation (h²·f''') against rounding (eps·|g|/h).
            h = torch.finfo(torch.float64).eps ** (1 / 3) * max(1.0, abs(float(p.detach()[index])))
            with torch.no_grad():
                p[index] += h
            plus = gradient()
            with torch.no_grad():
                p[index] -= 2 * h
            minus = gradient()
            with torch.no_grad():
                p[index] += h
            columns.append((plus - minus) / (2 * h))
    return torch.stack(columns, dim=1)


def _bn_mlp(track_running_stats: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 6),
        nn.BatchNorm1d(6, track_running_stats=track_running_stats),
        nn.Tanh(),
        nn.Linear(6, 3),
    ).train()


def _bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).train()


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (_bn_mlp(False), (5,)),
        (_bn_mlp(True), (5,)),
        (_bn_cnn(), (1, 6, 6)),
    ],
    ids=["bn-mlp", "bn-mlp-running-stats", "bn-cnn"],
)
def test_dense_hessian_agrees_with_central_differences_through_train_mode_batch_norm(model, shape):
    generator = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, *shape, generator=generator), torch.randint(0, 3, (8,)))
    hessian = dense_hessian(model, cross_entropy_loss, [batch])
    differences = _central_difference_hessian(model, batch)
    scale = float(hessian.abs().max())
    # Central differences in float64 are good to about eps^(2/3) ≈ 4e-11 of the scale (both
    # the truncation and the rounding term); 100× that is the margin. The wrong Hessian was
    # off by ~1e-1 of the scale.
    tolerance = 100 * torch.finfo(torch.float64).eps ** (2 / 3) * scale
    assert float((hessian - hessian.T).abs().max()) <= tolerance
    assert float((hessian - differences).abs().max()) <= tolerance
