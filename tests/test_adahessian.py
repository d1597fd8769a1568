"""lc.optim.AdaHessian: step-for-step agreement with torch_optimizer.Adahessian fed the same
probes, the Hutchinson diagonal against closed forms, Adam's stability rule with its own P,
and a real Lightning Trainer."""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch_optimizer
from torch import nn

import lightning_curvature as lc
from lightning_curvature.optim import AdaHessian, HessianBackwardMixin
from lightning_curvature.optim import adahessian as adahessian_module
from lightning_curvature.optim.stability import adaptive_threshold


class _RecordingOperator(lc.GradientGraphOperator):
    """Records every probe block sent through the gradient graph."""

    blocks: ClassVar[list[torch.Tensor]] = []

    def _matmat(self, block):
        _RecordingOperator.blocks.append(block.clone())
        return super()._matmat(block)


@pytest.fixture
def recorded_probes(monkeypatch):
    _RecordingOperator.blocks = []
    monkeypatch.setattr(adahessian_module, "GradientGraphOperator", _RecordingOperator)
    return _RecordingOperator.blocks


def _feed_probes_to_reference(monkeypatch, probe: torch.Tensor, params):
    """torch_optimizer draws one ``2·randint_like(p, high=2) − 1`` per parameter: hand it
    the pieces of our probe instead."""
    pieces = iter(
        ((piece.view_as(p) + 1) / 2).to(p.dtype)
        for piece, p in zip(probe.split([p.numel() for p in params]), params, strict=True)
    )
    monkeypatch.setattr(torch, "randint_like", lambda p, *args, **kwargs: next(pieces))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, 3),
        nn.Softplus(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    ).double()


def _data(model_name: str, step: int):
    generator = torch.Generator().manual_seed(step)
    shape = (16, 6) if model_name == "mlp" else (16, 1, 6, 6)
    inputs = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return inputs, torch.randint(0, 3, (16,), generator=generator)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize(("hessian_power", "weight_decay"), [(1.0, 0.0), (0.5, 0.01)])
def test_steps_agree_with_torch_optimizer_fed_the_same_probes(
    model_name, hessian_power, weight_decay, recorded_probes, monkeypatch
):
    ours = _mlp() if model_name == "mlp" else _cnn()
    reference, initial = copy.deepcopy(ours), copy.deepcopy(ours)
    kwargs = dict(lr=0.05, hessian_power=hessian_power, weight_decay=weight_decay, eps=1e-4)
    ours_opt = AdaHessian(ours.parameters(), **kwargs)
    reference_opt = torch_optimizer.Adahessian(reference.parameters(), **kwargs)
    randint_like = torch.randint_like
    for step in range(6):
        inputs, targets = _data(model_name, step)
        for model, opt in ((ours, ours_opt), (reference, reference_opt)):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(inputs), targets).backward(create_graph=True)
            if opt is reference_opt:
                _feed_probes_to_reference(
                    monkeypatch, recorded_probes[-1][:, 0], list(model.parameters())
                )
            opt.step()
            monkeypatch.setattr(torch, "randint_like", randint_like)
        for ours_p, reference_p in zip(ours.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(ours_p, reference_p, rtol=1e-12, atol=1e-14)
    assert len(recorded_probes) == 6
    # Six steps moved the parameters: the agreement is not that of two idle optimizers.
    for moved, start in zip(ours.parameters(), initial.parameters(), strict=True):
        assert not torch.allclose(moved, start)


class _Quartic(nn.Module):
    """loss = Σ c·w⁴: its Hessian is diagonal, 12·c·w², so one probe gives it exactly."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.vector = nn.Parameter(torch.randn(5, generator=generator, dtype=torch.float64))
        self.kernel = nn.Parameter(
            torch.randn(2, 3, 3, 3, generator=generator, dtype=torch.float64)
        )
        self.c_vector = torch.rand(5, generator=generator, dtype=torch.float64) - 0.5
        self.c_kernel = torch.rand(2, 3, 3, 3, generator=generator, dtype=torch.float64) - 0.5

    def loss(self):
        return (self.c_vector * self.vector**4).sum() + (self.c_kernel * self.kernel**4).sum()


@pytest.mark.parametrize("average_conv_kernel", [True, False])
def test_hessian_diagonal_is_the_closed_form_with_kernel_averaging(average_conv_kernel):
    model = _Quartic()
    exact_vector = (12 * model.c_vector * model.vector.detach() ** 2).abs()
    exact_kernel = (12 * model.c_kernel * model.kernel.detach() ** 2).abs()
    opt = AdaHessian(model.parameters(), lr=1e-3, average_conv_kernel=average_conv_kernel)
    model.loss().backward(create_graph=True)
    opt.step()
    torch.testing.assert_close(opt.state[model.vector]["hessian_diag"], exact_vector)
    expected = exact_kernel.mean(dim=(2, 3), keepdim=True) if average_conv_kernel else exact_kernel
    torch.testing.assert_close(opt.state[model.kernel]["hessian_diag"], expected)


def test_probes_go_through_one_block_product_per_estimate(recorded_probes):
    model = _mlp()
    opt = AdaHessian(model.parameters(), num_probes=4, update_each=3)
    for step in range(7):
        inputs, targets = _data("mlp", step)
        opt.zero_grad()
        # The graph is needed only on the steps that estimate the diagonal (0, 3, 6).
        nn.functional.cross_entropy(model(inputs), targets).backward(create_graph=step % 3 == 0)
        opt.step()
    assert [block.shape for block in recorded_probes] == [(model_dim(model), 4)] * 3
    # Different steps draw different probes.
    assert not torch.equal(recorded_probes[0], recorded_probes[1])


def model_dim(model):
    return sum(p.numel() for p in model.parameters())


def test_a_gradient_without_graph_is_reported_with_the_fix():
    model = _mlp()
    opt = AdaHessian(model.parameters())
    nn.functional.cross_entropy(model(_data("mlp", 0)[0]), _data("mlp", 0)[1]).backward()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step()


def test_the_graph_is_freed_after_the_step():
    model = _mlp()
    opt = AdaHessian(model.parameters())
    inputs, targets = _data("mlp", 0)
    nn.functional.cross_entropy(model(inputs), targets).backward(create_graph=True)
    opt.step()
    assert all(not p.grad.requires_grad for p in model.parameters())


class _DiagonalQuadratic(nn.Module):
    def __init__(self, curvatures):
        super().__init__()
        self.curvatures = curvatures
        self.theta = nn.Parameter(torch.ones_like(curvatures))

    def loss(self):
        return 0.5 * (self.curvatures * self.theta**2).sum()


@pytest.mark.parametrize(("scale", "diverges"), [(0.9, False), (1.1, True)])
def test_stability_follows_adams_rule_with_the_reported_preconditioner(scale, diverges):
    # H = diag(h); the probes give D = h exactly, so P settles and the iteration is
    # momentum on P⁻¹H: stable while λmax(P⁻¹H)·η < 2(1+β1)/(1−β1).
    curvatures = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    threshold = adaptive_threshold(0.9)
    sharpness = float((curvatures / (curvatures.sqrt() + 1e-4)).max())  # k = 0.5
    lr = scale * threshold / sharpness
    model = _DiagonalQuadratic(curvatures)
    opt = AdaHessian(model.parameters(), lr=lr, hessian_power=0.5, betas=(0.9, 0.999))
    # The bias-corrected first steps overshoot (a transient of ~1e11 here, in both cases);
    # what the rule decides is the growth rate once P has settled: compare steps 400 and 600.
    sizes = {}
    for step in range(1, 601):
        opt.zero_grad()
        model.loss().backward(create_graph=True)
        opt.step()
        sizes[step] = float(model.theta.detach().abs().max())
    preconditioner = opt.preconditioner_diagonal()
    measured = float((curvatures / preconditioner).max())  # λmax(P⁻¹H) for diagonal H
    assert measured * lr / threshold == pytest.approx(scale, rel=1e-3)
    growth = sizes[600] / sizes[400]
    assert (growth > 1e10) if diverges else (growth < 1e-3)


def test_preconditioner_is_none_before_a_step_and_rejects_foreign_params():
    model = _mlp()
    opt = AdaHessian(model.parameters())
    assert opt.preconditioner_diagonal() is None
    inputs, targets = _data("mlp", 0)
    nn.functional.cross_entropy(model(inputs), targets).backward(create_graph=True)
    opt.step()
    assert opt.preconditioner_diagonal().shape == (model_dim(model),)
    with pytest.raises(ValueError, match=r"params\[0\]"):
        opt.preconditioner_diagonal([torch.zeros(3, requires_grad=True)])


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": True}, "lr"),
        ({"betas": (1.0, 0.9)}, r"betas\[0\]"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
        ({"betas": 0.9}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"hessian_power": 1.5}, "hessian_power"),
        ({"update_each": 0}, "update_each"),
        ({"num_probes": 2.0}, "num_probes"),
        ({"average_conv_kernel": 1}, "average_conv_kernel"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        AdaHessian(_mlp().parameters(), **kwargs)


def test_numpy_scalars_are_accepted():
    AdaHessian(
        _mlp().parameters(),
        lr=np.float32(0.1),
        betas=(np.float64(0.9), 0.99),
        update_each=np.int64(2),
        seed=np.int32(3),
    )


def test_in_a_lightning_trainer_it_matches_a_manual_loop(tmp_path):
    from lightning_curvature._lightning import pl
    from tests.lightning_models import classification_data, loader, mlp, trainer

    class Model(HessianBackwardMixin, pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return nn.functional.cross_entropy(self.net(inputs), targets)

        def configure_optimizers(self):
            return AdaHessian(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    net = mlp()
    manual, initial = copy.deepcopy(net), copy.deepcopy(net)
    data = classification_data(n=64)
    trainer(tmp_path, max_steps=4, logger=False).fit(Model(net), loader(data, batch_size=16))

    opt = AdaHessian(manual.parameters(), lr=0.05)
    for inputs, targets in loader(data, batch_size=16):
        opt.zero_grad()
        nn.functional.cross_entropy(manual(inputs), targets).backward(create_graph=True)
        opt.step()
    for trained, expected in zip(net.parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(trained, expected)
    assert not torch.allclose(net[0].weight, initial[0].weight)


def test_a_run_resumed_from_its_state_dict_continues_exactly():
    def train(model, opt, steps):
        for step in steps:
            inputs, targets = _data("mlp", step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward(create_graph=True)
            opt.step()

    straight = _mlp()
    straight_opt = AdaHessian(straight.parameters(), lr=0.05, update_each=2)
    train(straight, straight_opt, range(5))

    first = _mlp()
    first_opt = AdaHessian(first.parameters(), lr=0.05, update_each=2)
    train(first, first_opt, range(3))
    resumed = copy.deepcopy(first)
    resumed_opt = AdaHessian(resumed.parameters(), lr=0.05, update_each=2)
    resumed_opt.load_state_dict(copy.deepcopy(first_opt.state_dict()))
    train(resumed, resumed_opt, range(3, 5))
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
