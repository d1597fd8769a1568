"""Critical sharpness against independent truth: the closed forms of a quadratic and of least
squares, and the dense Hessian of a small tanh MLP."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_curvature.measure.critical import critical_sharpness, loss_along

DOUBLE = torch.float64


def _quadratic(n: int = 12, seed: int = 0):
    """L(θ) = ½θᵀAθ − bᵀθ with A's eigenvalues spread over [0.1, 10], a point θ and g there."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DOUBLE))
    eigenvalues = torch.logspace(-1, 1, n, dtype=DOUBLE)
    a = q @ torch.diag(eigenvalues) @ q.T
    b = torch.randn(n, generator=gen, dtype=DOUBLE)
    theta = torch.randn(n, generator=gen, dtype=DOUBLE)
    g = a @ theta - b

    def loss(x: torch.Tensor) -> float:
        return float(0.5 * x @ a @ x - b @ x)

    return a, theta, g, loss


def _line(loss, theta: torch.Tensor, direction: torch.Tensor, calls: list[float] | None = None):
    def loss_at(t: float) -> float:
        if calls is not None:
            calls.append(t)
        return loss(theta + t * direction)

    return loss_at


def _assert_within_bracket(result, truth: float) -> None:
    assert result.bracketed, result.reason
    assert result.lower <= truth <= result.upper
    assert abs(result.value - truth) <= result.upper - result.lower


@pytest.mark.parametrize("lr", [0.02, 0.1, 0.3, 1.0, 5.0])
def test_gradient_direction_on_a_quadratic_is_the_rayleigh_quotient(lr):
    a, theta, g, loss = _quadratic()
    truth = float(g @ a @ g / (g @ g))
    result = critical_sharpness(
        _line(loss, theta, -g), lr, max_evals=30, rel_tol=1e-3, loss_dtype=DOUBLE
    )
    _assert_within_bracket(result, truth)
    assert result.relative_width <= 1e-3


def test_preconditioned_direction_on_a_quadratic():
    a, theta, g, loss = _quadratic(seed=1)
    p_inv = 1 / torch.linspace(0.5, 4.0, len(g), dtype=DOUBLE)
    d = -p_inv * g
    t_c = 2 * float(g @ (p_inv * g)) / float(d @ a @ d)
    result = critical_sharpness(
        _line(loss, theta, d), 0.3, max_evals=30, rel_tol=1e-4, loss_dtype=DOUBLE
    )
    _assert_within_bracket(result, 2 / t_c)


@pytest.mark.parametrize("scale", [0.55, 0.8, 1.0, 1.3, 1.9])
def test_five_evaluations_reach_one_percent_when_the_crossing_is_within_a_factor_two(scale):
    # L(θ), lr and one neighbour on the grid bracket t_c; the quadratic model's two probes,
    # one either side of its crossing, then leave a bracket of about rel_tol/2.
    a, theta, g, loss = _quadratic(seed=2)
    t_c = float(g @ g / (g @ a @ g)) * 2
    result = critical_sharpness(
        _line(loss, theta, -g), t_c / scale, max_evals=5, rel_tol=1e-2, loss_dtype=DOUBLE
    )
    _assert_within_bracket(result, 2 / t_c)
    assert result.num_evals <= 5
    assert result.relative_width <= 1e-2


def test_least_squares_closed_form_and_bit_exact_restore():
    gen = torch.Generator().manual_seed(3)
    n, dim = 64, 5
    x = torch.randn(n, dim, generator=gen, dtype=DOUBLE)
    y = torch.randn(n, generator=gen, dtype=DOUBLE)
    model = nn.Linear(dim, 1).to(DOUBLE)

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        inputs, targets = batch
        return ((m(inputs).squeeze(-1) - targets) ** 2).mean()

    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss_fn(model, (x, y)), list(params.values()))
    g = torch.cat([gr.reshape(-1) for gr in grads])
    features = torch.cat([x, torch.ones(n, 1, dtype=DOUBLE)], dim=1)  # weight then bias
    hessian = 2 / n * features.T @ features
    truth = float(g @ hessian @ g / (g @ g))

    before = {name: p.detach().clone() for name, p in params.items()}
    loss_at = loss_along(model, params, -g, loss_fn, (x, y))
    result = critical_sharpness(loss_at, 0.1, max_evals=30, rel_tol=1e-4, loss_dtype=DOUBLE)
    _assert_within_bracket(result, truth)
    for t in (0.1, 1 / 3, 7.77, -2.5):
        loss_at(t)
    assert all(torch.equal(p, before[name]) for name, p in params.items())
    assert all(p.requires_grad for p in params.values())


def test_loss_along_restores_when_the_loss_raises_and_takes_per_parameter_directions():
    model = nn.Linear(3, 2)
    params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    directions = [torch.full_like(p, 0.1) for p in params.values()]

    def failing(m: nn.Module, batch) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        loss_along(model, params, directions, failing, None)(0.3)
    assert all(torch.equal(p, before[name]) for name, p in params.items())

    def shifted_bias(m: nn.Module, batch) -> dict[str, torch.Tensor]:
        return {"loss": m.bias.sum()}

    loss_at = loss_along(model, params, directions, shifted_bias, None)
    assert loss_at(2.0) == pytest.approx(float(before["bias"].sum()) + 2 * 0.1 * 2)
    assert all(torch.equal(p, before[name]) for name, p in params.items())


def test_loss_along_leaves_normalization_statistics_as_they_were():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).train()
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    model(x)  # running statistics away from their initial values
    state = {name: v.clone() for name, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    direction = torch.randn(sum(p.numel() for p in params.values()))

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    result = critical_sharpness(loss_along(model, params, direction, loss_fn, (x, y)), 0.1)
    assert result.num_evals >= 2
    assert all(torch.equal(v, state[name]) for name, v in model.state_dict().items())


@pytest.mark.parametrize(("noise", "rel"), [(1.0, None), (0.01, 1e-2)])
def test_tanh_mlp_lies_between_the_dense_hessians_extreme_eigenvalues(noise, rel):
    # Targets are the model's own outputs plus noise, so |g| scales with the noise while the
    # curvature (mostly the Gauss-Newton part) does not. Checked: 2/t_c lies in [λmin, λmax]
    # of the dense float64 Hessian at either noise; at small noise the step t_c is small
    # against the loss's third-order scale, and 2/t_c is the Rayleigh quotient gᵀHg/gᵀg to 1%.
    torch.manual_seed(4)
    x = torch.randn(32, 3, dtype=DOUBLE)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).to(DOUBLE)
    y = model(x).detach() + noise * torch.randn(32, 1, dtype=DOUBLE)
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def flat_loss(flat: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(flat, [math.prod(s) for s in shapes])
        values = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        out = torch.func.functional_call(model, values, (x,))
        return ((out - y) ** 2).mean()

    hessian = torch.autograd.functional.hessian(flat_loss, flat0)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    g = torch.autograd.functional.jacobian(flat_loss, flat0)
    rayleigh = float(g @ hessian @ g / (g @ g))

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    loss_at = loss_along(model, dict(model.named_parameters()), -g, loss_fn, (x, y))
    result = critical_sharpness(loss_at, 0.5, max_evals=30, rel_tol=1e-4, loss_dtype=DOUBLE)
    assert result.bracketed, result.reason
    assert float(eigenvalues[0]) <= result.lower and result.upper <= float(eigenvalues[-1])
    if rel is not None:
        assert result.value == pytest.approx(rayleigh, rel=rel)


def test_an_ascent_direction_is_reported_not_bracketed():
    _, theta, g, loss = _quadratic()
    result = critical_sharpness(_line(loss, theta, g), 0.1, max_evals=6, loss_dtype=DOUBLE)
    assert not result.bracketed
    assert math.isnan(result.value)
    assert result.t_lo == 0 and result.upper == math.inf
    assert "not a descent direction" in result.reason
    assert result.num_evals == 6
    assert result.relative_width == math.inf


def test_a_loss_that_never_rises_is_reported_not_bracketed():
    result = critical_sharpness(lambda t: 1.0 - t, 0.1, max_evals=5)
    assert not result.bracketed
    assert result.t_hi == math.inf and result.lower == 0
    assert result.upper == pytest.approx(2 / (0.1 * 2**3))
    assert "did not rise" in result.reason


def test_a_non_finite_loss_counts_as_a_rise():
    result = critical_sharpness(lambda t: 1.0 - t if t < 1 else math.inf, 0.3, max_evals=20)
    assert result.bracketed
    assert result.t_lo < 1 <= result.t_hi


def test_the_rise_must_clear_a_relative_margin():
    # A rise of 1 ulp of |L| is rounding, not a rise; with margin=0 it is one.
    zero = 1000.0
    bump = lambda t: zero + (t > 0) * math.ulp(zero)  # noqa: E731
    assert not critical_sharpness(bump, 0.1, max_evals=4, loss_dtype=DOUBLE).bracketed
    assert critical_sharpness(bump, 0.1, max_evals=4, margin=0.0).t_lo == 0


@pytest.mark.parametrize("max_evals", [2, 3, 4, 6, 9])
@pytest.mark.parametrize("given_zero", [False, True])
def test_max_evals_is_respected(max_evals, given_zero):
    _, theta, g, loss = _quadratic()
    for direction, lr in ((-g, 1e-4), (-g, 1e3), (-g, 0.2), (g, 0.2)):
        calls: list[float] = []
        result = critical_sharpness(
            _line(loss, theta, direction, calls),
            lr,
            max_evals=max_evals,
            rel_tol=1e-6,
            loss_at_zero=loss(theta) if given_zero else None,
            loss_dtype=DOUBLE,
        )
        assert len(calls) == result.num_evals <= max_evals


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"max_evals": 1}, "max_evals"),
        ({"max_evals": True}, "max_evals"),
        ({"max_evals": 2.5}, "max_evals"),
        ({"rel_tol": 0.0}, "rel_tol"),
        ({"rel_tol": 1.5}, "rel_tol"),
        ({"margin": -1e-9}, "margin"),
        ({"loss_dtype": torch.int64}, "loss_dtype"),
        ({"loss_at": 3.0}, "loss_at"),
        ({"loss_at": lambda t: math.nan}, "loss_at"),
        ({"loss_at_zero": math.inf}, "loss_at_zero"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    arguments = {"loss_at": lambda t: (t - 1.0) ** 2, "lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=name):
        critical_sharpness(**arguments)


def test_loss_along_bad_arguments_name_the_argument():
    model = nn.Linear(3, 2)
    params = dict(model.named_parameters())
    loss_fn = lambda m, b: m.bias.sum()  # noqa: E731
    with pytest.raises(ValueError, match="direction"):
        loss_along(model, params, torch.zeros(5), loss_fn, None)
    with pytest.raises(ValueError, match="direction"):
        loss_along(model, params, [torch.zeros(3)], loss_fn, None)
    with pytest.raises(ValueError, match="params"):
        loss_along(model, {}, torch.zeros(0), loss_fn, None)
    with pytest.raises(ValueError, match="loss_fn"):
        loss_along(model, params, torch.zeros(8), None, None)


@pytest.mark.parametrize(
    ("rise", "t_c"),
    [
        (lambda t: -t + t**4, 1.0),
        (lambda t: -math.sin(t) if t < 2 else t - 2 - math.sin(2), 2 + math.sin(2)),
        (lambda t: t * (t - 1) * (t + 5), 1.0),
        (lambda t: math.expm1(t) - 2 * t, 1.2564312086261697),
        (lambda t: -t if t < 0.7 else 1.0, 0.7),  # a cliff, where the quadratic model misleads
    ],
)
@pytest.mark.parametrize("lr", [0.01, 0.6, 40.0])
def test_lines_that_are_not_quadratic_converge_to_their_crossing(rise, t_c, lr):
    result = critical_sharpness(
        lambda t: 2.0 + rise(t), lr, max_evals=80, rel_tol=1e-9, loss_dtype=DOUBLE
    )
    assert result.bracketed, result.reason
    assert result.t_lo <= t_c <= result.t_hi
    assert result.relative_width <= 1e-9


def test_a_wavy_line_gives_a_crossing_not_necessarily_the_first():
    # L rises past L(θ) at every odd multiple of π; from lr = 40 the grid meets 21π first.
    result = critical_sharpness(
        lambda t: 2.0 - math.sin(t), 40.0, max_evals=80, rel_tol=1e-9, loss_dtype=DOUBLE
    )
    crossing = round(result.t_lo / math.pi) * math.pi
    assert round(result.t_lo / math.pi) % 2 == 1
    assert result.t_lo <= crossing <= result.t_hi
    assert result.t_lo > math.pi
