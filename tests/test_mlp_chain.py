"""lc.mlp_chain_solve: the exact structured solve against dense float64 (H + εI)⁻¹b."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lightning_curvature as lc
from tests.truth import dense_hessian


def _chain(widths, activation=nn.Tanh, bias=True, seed=0, trailing=None) -> nn.Sequential:
    torch.manual_seed(seed)
    modules: list[nn.Module] = []
    for index in range(len(widths) - 1):
        modules.append(nn.Linear(widths[index], widths[index + 1], bias=bias))
        if index < len(widths) - 2:
            modules.append(activation())
    if trailing is not None:
        modules.append(trailing())
    return nn.Sequential(*modules).double()


def _batch(n, widths, loss, seed=1):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, widths[0], generator=generator, dtype=torch.float64)
    if isinstance(loss, nn.CrossEntropyLoss):
        targets = torch.randint(0, widths[-1], (n,), generator=generator)
    else:
        targets = torch.randn(n, widths[-1], generator=generator, dtype=torch.float64)
    return inputs, targets


def _dense_solve(model, loss, batch, b, damping):
    hessian = dense_hessian(model, lambda m, bt: loss(m(bt[0]), bt[1]), [batch])
    system = hessian + damping * torch.eye(hessian.shape[0], dtype=torch.float64)
    return torch.linalg.solve(system, b), hessian


def _relative_error(x, exact) -> float:
    return float(torch.linalg.vector_norm(x - exact) / torch.linalg.vector_norm(exact))


@pytest.mark.parametrize(
    ("activation", "loss"),
    [
        (nn.Tanh, nn.CrossEntropyLoss()),
        (nn.Sigmoid, nn.MSELoss()),
        (nn.GELU, nn.CrossEntropyLoss(reduction="sum")),
        (nn.Softplus, nn.MSELoss(reduction="sum")),
        (nn.ReLU, nn.CrossEntropyLoss()),
        (nn.SiLU, nn.MSELoss()),
    ],
)
@pytest.mark.parametrize("depth", [2, 5])
def test_chain_solve_matches_the_dense_solve_in_float64(activation, loss, depth):
    widths = [3] + [4] * (depth - 1) + [3]
    model = _chain(widths, activation)
    batch = _batch(5, widths, loss)
    dim = sum(p.numel() for p in model.parameters())
    b = torch.randn(dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact, hessian = _dense_solve(model, loss, batch, b, 1e-2)
    res = lc.mlp_chain_solve(model, loss, batch, b, damping=1e-2)
    assert _relative_error(res.x, exact) <= 1e-8
    assert res.relative_residual <= 1e-8
    # Sylvester's inertia over the pivots counts H + εI's negative eigenvalues.
    negatives = int((torch.linalg.eigvalsh(hessian) + 1e-2 < 0).sum())
    assert res.negative_eigenvalues == negatives
    assert res.num_layers == depth and len(res.pivot_condition_numbers) == depth


def test_a_fifty_layer_chain_is_solved_exactly():
    widths = [2] * 51
    model = _chain(widths, nn.Tanh)
    loss = nn.CrossEntropyLoss()
    batch = _batch(3, widths, loss)
    dim = sum(p.numel() for p in model.parameters())
    b = torch.randn(dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact, hessian = _dense_solve(model, loss, batch, b, 1e-3)
    res = lc.mlp_chain_solve(model, loss, batch, b, damping=1e-3)
    assert res.num_layers == 50
    assert _relative_error(res.x, exact) <= 1e-8
    assert res.negative_eigenvalues == int((torch.linalg.eigvalsh(hessian) + 1e-3 < 0).sum())


def test_a_single_linear_layer_with_mse_is_damped_least_squares():
    # H = 2/(n·k) · I_k ⊗ X̃ᵀX̃ with X̃ = [X, 1], for MSE's mean over n·k entries.
    model = _chain([4, 2], bias=True)
    loss = nn.MSELoss()
    inputs, targets = _batch(6, [4, 2], loss)
    design = torch.cat([inputs, torch.ones(6, 1, dtype=torch.float64)], dim=1)
    gram = 2.0 / (6 * 2) * design.T @ design
    # Flat order: W (row-major, 2 rows of 4), then b (2): permute the kron's order.
    kron = torch.kron(torch.eye(2, dtype=torch.float64), gram)
    order = [0, 1, 2, 3, 5, 6, 7, 8, 4, 9]
    hessian = kron[order][:, order]
    b = torch.arange(10, dtype=torch.float64)
    res = lc.mlp_chain_solve(model, loss, (inputs, targets), b, damping=0.1)
    exact = torch.linalg.solve(hessian + 0.1 * torch.eye(10, dtype=torch.float64), b)
    assert _relative_error(res.x, exact) <= 1e-12


def test_bias_free_layers_nested_sequentials_and_outer_activations_are_supported():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Tanh(),  # on the inputs
        nn.Sequential(nn.Linear(3, 4, bias=False), nn.GELU(), nn.Sigmoid()),
        nn.Linear(4, 4),
        nn.Softplus(),
        nn.Linear(4, 2, bias=False),
        nn.Tanh(),  # on the outputs, before the loss
    ).double()
    loss = nn.MSELoss()
    batch = _batch(4, [3, 2], loss)
    dim = sum(p.numel() for p in model.parameters())
    b = torch.randn(dim, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact, _ = _dense_solve(model, loss, batch, b, 0.05)
    res = lc.mlp_chain_solve(model, "mse", batch, b, damping=0.05)
    assert res.x.shape == (dim, 3)
    assert _relative_error(res.x, exact) <= 1e-9


def test_relu_hessian_keeps_the_mixed_gradient_terms():
    # σ'' = 0 for ReLU, yet H differs from the Gauss-Newton matrix: the solve must match
    # the true Hessian (dense truth), not the GGN.
    widths = [3, 5, 5, 3]
    model = _chain(widths, nn.ReLU)
    loss = nn.CrossEntropyLoss()
    batch = _batch(6, widths, loss)
    dim = sum(p.numel() for p in model.parameters())
    b = torch.randn(dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact, hessian = _dense_solve(model, loss, batch, b, 0.1)
    assert float(torch.linalg.eigvalsh(hessian)[0]) < -1e-3  # indefinite: not a GGN
    res = lc.mlp_chain_solve(model, loss, batch, b, damping=0.1)
    assert _relative_error(res.x, exact) <= 1e-9


def test_float32_model_solved_in_float64_on_request():
    widths = [3, 4, 4, 3]
    model64 = _chain(widths)
    model32 = _chain(widths).float()
    loss = nn.CrossEntropyLoss()
    inputs, targets = _batch(5, widths, loss)
    dim = sum(p.numel() for p in model64.parameters())
    b = torch.randn(dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact, _ = _dense_solve(model64, loss, (inputs, targets), b, 0.1)
    res = lc.mlp_chain_solve(
        model32, loss, (inputs.float(), targets), b.float(), damping=0.1, dtype=torch.float64
    )
    assert res.x.dtype == torch.float64
    # The float32 weights are the only rounding: a float32-level error.
    assert _relative_error(res.x, exact) <= 1e-5
    plain = lc.mlp_chain_solve(model32, loss, (inputs.float(), targets), b.float(), damping=0.1)
    assert plain.x.dtype == torch.float32 and _relative_error(plain.x.double(), exact) <= 1e-3


def test_an_undamped_overparameterised_last_layer_is_reported_as_ill_conditioned():
    # The last pivot is B_Lᵀ T B_L: rank ≤ n·(k−1) < p, singular without damping.
    widths = [3, 6, 4]
    model = _chain(widths)
    loss = nn.CrossEntropyLoss()
    batch = _batch(2, widths, loss)
    dim = sum(p.numel() for p in model.parameters())
    with pytest.warns(RuntimeWarning, match="condition number"):
        res = lc.mlp_chain_solve(
            model, loss, batch, torch.ones(dim, dtype=torch.float64), damping=np.float64(0.0)
        )
    assert res.pivot_condition_numbers[-1] > 1e12


def test_without_diagnostics_or_residual_check_the_fields_are_empty():
    widths = [3, 4, 3]
    model = _chain(widths)
    dim = sum(p.numel() for p in model.parameters())
    res = lc.mlp_chain_solve(
        model,
        "cross_entropy",
        _batch(4, widths, nn.CrossEntropyLoss()),
        torch.ones(dim, dtype=torch.float64),
        diagnostics=False,
        check_residual=False,
        refine=0,
    )
    assert res.pivot_condition_numbers == () and res.negative_eigenvalues is None
    assert res.relative_residual is None
    assert (res.state_size, res.block_size) == (4 * 4, 4 * (3 + 1))


def _shared_weights() -> nn.Sequential:
    layer = nn.Linear(3, 3)
    return nn.Sequential(layer, nn.Tanh(), layer)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Linear(3, 3), "nn.Sequential"),
        (nn.Sequential(nn.Conv1d(1, 1, 1)), "Conv1d"),
        (nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 3)), "Dropout"),
        (nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1), nn.Linear(3, 3)), "Softmax"),
        (nn.Sequential(nn.Tanh()), "at least one nn.Linear"),
        (_shared_weights(), "shared weights"),
    ],
)
def test_a_model_that_is_not_a_chain_is_rejected(model, match):
    with pytest.raises(ValueError, match=match):
        lc.mlp_chain_solve(model, "mse", (torch.ones(2, 3), torch.ones(2, 3)), torch.ones(12))


def test_frozen_parameters_and_bad_arguments_are_rejected_by_name():
    model = _chain([3, 3])
    batch = (torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64))
    b = torch.ones(12, dtype=torch.float64)
    with pytest.raises(ValueError, match="loss"):
        lc.mlp_chain_solve(model, nn.L1Loss(), batch, b)
    with pytest.raises(ValueError, match="loss"):
        lc.mlp_chain_solve(model, "hinge", batch, b)
    with pytest.raises(ValueError, match="reduction"):
        lc.mlp_chain_solve(model, nn.MSELoss(reduction="none"), batch, b)
    with pytest.raises(ValueError, match="damping"):
        lc.mlp_chain_solve(model, "mse", batch, b, damping=-1.0)
    with pytest.raises(ValueError, match="b must"):
        lc.mlp_chain_solve(model, "mse", batch, torch.ones(11, dtype=torch.float64))
    with pytest.raises(ValueError, match="inputs"):
        lc.mlp_chain_solve(model, "mse", (torch.ones(2, 4), batch[1]), b)
    with pytest.raises(ValueError, match="dtype"):
        lc.mlp_chain_solve(model, "mse", batch, b, dtype=torch.float16)
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"0\.bias"):
        lc.mlp_chain_solve(model, "mse", batch, b)


def test_an_exactly_singular_pivot_raises_naming_the_layer_and_the_fix():
    # Zero inputs and no bias: the last layer's Hessian block is 0, so is its pivot at ε = 0.
    model = nn.Sequential(nn.Linear(3, 2, bias=False)).double()
    batch = (torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(torch.linalg.LinAlgError, match=r"layer 1 .*raise the damping"):
        lc.mlp_chain_solve(model, "mse", batch, torch.ones(6, dtype=torch.float64), damping=0.0)


@pytest.mark.parametrize("damping", [1e-3, 0.1])
@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.MSELoss()])
def test_small_batches_use_the_low_rank_pivots_and_stay_exact(damping, loss):
    # n = 2: a = 2·width ≤ p/2 for every layer, so the pivots go through Woodbury.
    widths = [4, 5, 5, 5, 3]
    model = _chain(widths, nn.Tanh)
    batch = _batch(2, widths, loss)
    dim = sum(p.numel() for p in model.parameters())
    b = torch.randn(dim, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    exact, hessian = _dense_solve(model, loss, batch, b, damping)
    res = lc.mlp_chain_solve(model, loss, batch, b, damping=damping)
    assert _relative_error(res.x, exact) <= 1e-8
    assert res.negative_eigenvalues == int((torch.linalg.eigvalsh(hessian) + damping < 0).sum())


def test_low_rank_and_dense_pivot_factorisations_agree():
    from lightning_curvature.solvers.chain_riccati import factor_pivot

    generator = torch.Generator().manual_seed(0)
    tangent_map = torch.randn(4, 20, generator=generator, dtype=torch.float64)
    symmetric = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    riccati = symmetric + symmetric.T  # indefinite, like P away from a minimum
    pb = riccati @ tangent_map
    block = torch.randn(20, 3, generator=generator, dtype=torch.float64)
    pivot = tangent_map.T @ riccati @ tangent_map + 0.3 * torch.eye(20, dtype=torch.float64)
    solve, spectrum, info = factor_pivot(riccati, tangent_map, pb, 0.3, True)
    assert int(info) == 0
    torch.testing.assert_close(solve(block), torch.linalg.solve(pivot, block))
    torch.testing.assert_close(spectrum.sort().values, torch.linalg.eigvalsh(pivot))


def test_refinement_recovers_the_digits_elimination_loses_at_small_damping():
    # ε = 1e-5 against an indefinite H (cond ≈ 1.5e5): block elimination without pivoting
    # across layers leaves a relative residual of ~1e-3 to 0.3; refinement brings it down to
    # the rounding floor of any backward-stable solve. How fast it gets there (a factor of
    # ~1e-3 a step here) depends on the elimination's own rounding, which differs between
    # CPUs, so the test lets refinement run until it stops paying and compares with the
    # floors derived from the problem, not with a number one CPU printed.
    widths = [4, 5, 5, 5, 3]
    model = _chain(widths, nn.Tanh)
    loss = nn.CrossEntropyLoss()
    batch = _batch(2, widths, loss)
    dim = sum(p.numel() for p in model.parameters())
    b = torch.randn(dim, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    exact, hessian = _dense_solve(model, loss, batch, b, 1e-5)
    system = hessian + 1e-5 * torch.eye(dim, dtype=torch.float64)
    eps = torch.finfo(torch.float64).eps
    condition = float(torch.linalg.cond(system))
    # A backward-stable solve leaves ‖r‖/‖b‖ ≈ eps·‖A‖·‖x‖/‖b‖ (times a slowly growing
    # function of dim) and a forward error ≈ cond·eps; the margin 10·√dim covers the
    # accumulation over dim-long inner products.
    margin = 10 * dim**0.5
    residual_floor = float(
        (eps * torch.linalg.matrix_norm(system, 2) * exact.norm(dim=0) / b.norm(dim=0)).max()
    )
    raw = lc.mlp_chain_solve(model, loss, batch, b, damping=1e-5, refine=0)
    refined = lc.mlp_chain_solve(model, loss, batch, b, damping=1e-5, refine=20)
    assert raw.relative_residual > 1e4 * residual_floor  # elimination alone loses digits
    assert refined.relative_residual <= margin * residual_floor
    assert _relative_error(refined.x, exact) <= margin * condition * eps
    # The default number of steps recovers the digits too; its residual (1.0e-8 here, three
    # contractions from the raw one) is not held to the floor, as the contraction varies.
    default = lc.mlp_chain_solve(model, loss, batch, b, damping=1e-5)
    assert _relative_error(default.x, exact) <= margin * condition * eps
