"""lc.solve: (A + εI)⁻¹b by MINRES and CG, against dense float64 solves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lightning_curvature as lc
from tests.truth import (
    classification_batches,
    cross_entropy_loss,
    dense_hessian,
    matrix_with_spectrum,
    tanh_mlp,
)


def _indefinite(n: int = 40, seed: int = 0) -> torch.Tensor:
    eigenvalues = torch.linspace(-3.0, 5.0, n, dtype=torch.float64)
    eigenvalues = eigenvalues[eigenvalues.abs() > 0.05]  # keep it well-posed at ε = 0
    return matrix_with_spectrum(eigenvalues, seed=seed)


def _rhs(n: int, m: int | None = None, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (n,) if m is None else (n, m)
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def _true_relative_residual(matrix, damping, x, b) -> float:
    system = matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype)
    return float(torch.linalg.vector_norm(system @ x - b) / torch.linalg.vector_norm(b))


def test_minres_solves_an_indefinite_system_like_a_dense_solve():
    matrix = _indefinite()
    b = _rhs(matrix.shape[0])
    res = lc.solve(lc.DenseOperator(matrix), b, damping=0.0, tol=1e-12)
    exact = torch.linalg.solve(matrix, b)
    assert res.converged and not res.negative_curvature
    assert torch.linalg.vector_norm(res.x - exact) <= 1e-8 * torch.linalg.vector_norm(exact)


def test_minres_on_a_tiny_mlp_hessian_matches_the_dense_damped_solve():
    model = tanh_mlp().double()
    batches = [
        tuple(t.double() if t.is_floating_point() else t for t in b)
        for b in classification_batches(2, 16, (10,), 4)
    ]
    hessian = dense_hessian(model, cross_entropy_loss, batches)
    op = lc.HessianOperator(model, cross_entropy_loss, batches, dtype=torch.float64)
    assert float(torch.linalg.eigvalsh(hessian)[0]) < -0.3  # H + 0.3 I is indefinite
    b = _rhs(op.dim)
    res = lc.solve(op, b, damping=0.3, tol=1e-11)
    exact = torch.linalg.solve(hessian + 0.3 * torch.eye(op.dim, dtype=torch.float64), b)
    assert res.converged
    assert torch.linalg.vector_norm(res.x - exact) <= 1e-8 * torch.linalg.vector_norm(exact)


def test_cg_and_minres_reach_the_same_solution_on_a_damped_positive_definite_hessian():
    model = tanh_mlp().double()
    batches = [
        tuple(t.double() if t.is_floating_point() else t for t in b)
        for b in classification_batches(1, 32, (10,), 4)
    ]
    hessian = dense_hessian(model, cross_entropy_loss, batches)
    damping = 0.5 - float(torch.linalg.eigvalsh(hessian)[0])  # H + εI ≥ 0.5 I
    b = _rhs(hessian.shape[0])
    op = lc.DenseOperator(hessian)
    cg = lc.solve(op, b, damping=damping, tol=1e-12, method="cg")
    minres = lc.solve(op, b, damping=damping, tol=1e-12, method="minres")
    exact = torch.linalg.solve(hessian + damping * torch.eye(op.dim, dtype=torch.float64), b)
    for res in (cg, minres):
        assert res.converged and not res.negative_curvature
        assert torch.linalg.vector_norm(res.x - exact) <= 1e-9 * torch.linalg.vector_norm(exact)


def test_least_squares_solve_matches_the_closed_form_hessian():
    # H = 2/n XᵀX for the mean squared error of a linear model without bias.
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    targets = torch.randn(50, 1, generator=generator, dtype=torch.float64)
    model = nn.Linear(6, 1, bias=False).double()

    def mse(module, batch):
        x, y = batch
        return ((module(x) - y) ** 2).mean()

    op = lc.HessianOperator(model, mse, [(inputs, targets)], dtype=torch.float64)
    b = _rhs(6)
    res = lc.solve(op, b, damping=1e-3, method="cg", tol=1e-12)
    closed_form = 2.0 / 50 * inputs.T @ inputs + 1e-3 * torch.eye(6, dtype=torch.float64)
    assert torch.allclose(res.x, torch.linalg.solve(closed_form, b), rtol=1e-9, atol=0)


@pytest.mark.parametrize("method", ["minres", "cg"])
def test_reported_residual_is_the_true_residual_even_when_stopped_early(method):
    matrix = matrix_with_spectrum(torch.logspace(-3, 2, 60, dtype=torch.float64))
    b = _rhs(60)
    res = lc.solve(lc.DenseOperator(matrix), b, damping=1e-4, max_iters=7, method=method)
    truth = _true_relative_residual(matrix, 1e-4, res.x, b)
    assert res.iterations == 7 and not res.converged
    assert res.relative_residual == pytest.approx(truth, rel=1e-10)
    assert "did not reach" in res.message


@pytest.mark.parametrize("method", ["minres", "cg"])
def test_in_float32_the_drifted_recurrence_is_not_reported_as_converged(method):
    # cond = 1e3 in float32: the recurrence's residual estimate falls below tol, the true
    # residual stalls above it. The result must report the true one (float64 truth here).
    matrix = matrix_with_spectrum(torch.logspace(-3, 0, 50, dtype=torch.float64))
    b = _rhs(50)
    res = lc.solve(
        lc.DenseOperator(matrix.float()),
        b.float(),
        damping=0.0,
        tol=1e-6,
        method=method,
        max_iters=400,
    )
    truth = _true_relative_residual(matrix, 0.0, res.x.double(), b)
    assert res.iterations < 400  # stopped because the recurrence claimed convergence
    assert truth > 1e-6 and not res.converged
    # The reported residual is computed in float32: it can differ from the float64 truth by
    # the rounding of b − Ax, eps·‖A‖·‖x‖/‖b‖ (about 30× what one CPU measured).
    rounding = torch.finfo(torch.float32).eps * torch.linalg.matrix_norm(matrix, 2)
    rounding = float(rounding * res.x.double().norm() / b.norm())
    assert abs(res.relative_residual - truth) <= rounding


def test_a_broken_down_recurrence_never_returns_a_worse_iterate_than_zero():
    # cond = 1e9 is singular in float32: MINRES's recurrence breaks down and its iterate
    # grows without bound; the solve keeps x = 0 (relative residual 1) instead.
    matrix = matrix_with_spectrum(torch.logspace(-9, 0, 50, dtype=torch.float64)).float()
    res = lc.solve(lc.DenseOperator(matrix), _rhs(50).float(), damping=0.0, max_iters=400)
    assert not res.converged and res.relative_residual <= 1.0


def test_converged_solve_reports_a_true_residual_below_tol():
    matrix = _indefinite()
    b = _rhs(matrix.shape[0])
    res = lc.solve(lc.DenseOperator(matrix), b, damping=0.1, tol=1e-7)
    assert res.converged
    assert _true_relative_residual(matrix, 0.1, res.x, b) == pytest.approx(
        res.relative_residual, rel=1e-8
    )
    assert res.relative_residual <= 1e-7
    # The final check is one product more than the iterations (a single right-hand side).
    assert res.num_matvecs == res.iterations + 1


def test_cg_reports_negative_curvature_on_an_indefinite_system():
    matrix = _indefinite()
    with pytest.warns(RuntimeWarning, match="negative curvature"):
        res = lc.solve(lc.DenseOperator(matrix), _rhs(matrix.shape[0]), method="cg")
    assert res.negative_curvature and not res.converged
    assert "minres" in res.message


class _CountingOperator(lc.DenseOperator):
    def __init__(self, matrix):
        super().__init__(matrix)
        self.block_calls = 0

    def _matmat(self, block):
        self.block_calls += 1
        return super()._matmat(block)


@pytest.mark.parametrize("method", ["minres", "cg"])
def test_several_right_hand_sides_are_solved_together_with_block_products(method):
    matrix = matrix_with_spectrum(torch.linspace(0.1, 4.0, 30, dtype=torch.float64))
    b = _rhs(30, m=4)
    op = _CountingOperator(matrix)
    res = lc.solve(op, b, damping=0.0, tol=1e-10, method=method)
    assert res.x.shape == (30, 4) and len(res.relative_residuals) == 4
    assert torch.allclose(res.x, torch.linalg.solve(matrix, b), rtol=1e-8, atol=1e-10)
    assert op.block_calls == res.iterations + 1  # one block product per iteration
    assert res.num_matvecs == 4 * op.block_calls


def test_a_zero_right_hand_side_gives_zero_without_iterating():
    matrix = _indefinite()
    b = torch.zeros(matrix.shape[0], 2, dtype=torch.float64)
    b[:, 1] = _rhs(matrix.shape[0])
    res = lc.solve(lc.DenseOperator(matrix), b, damping=0.0, tol=1e-10)
    assert torch.equal(res.x[:, 0], torch.zeros_like(res.x[:, 0]))
    assert res.relative_residuals[0] == 0.0 and res.converged


def test_float32_operator_and_numpy_arguments_are_accepted():
    matrix = matrix_with_spectrum(torch.linspace(1.0, 3.0, 20, dtype=torch.float64)).float()
    res = lc.solve(
        lc.DenseOperator(matrix),
        torch.ones(20),
        damping=np.float32(0.0),
        tol=np.float64(1e-5),
        max_iters=np.int64(50),
    )
    assert res.converged and res.x.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"damping": -1.0}, "damping"),
        ({"damping": float("nan")}, "damping"),
        ({"tol": 0.0}, "tol"),
        ({"tol": 1.5}, "tol"),
        ({"max_iters": 0}, "max_iters"),
        ({"max_iters": True}, "max_iters"),
        ({"max_iters": 2.5}, "max_iters"),
        ({"method": "gmres"}, "method"),
        ({"check_every": 0}, "check_every"),
    ],
)
def test_bad_arguments_raise_a_value_error_naming_them(kwargs, argument):
    op = lc.DenseOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=argument):
        lc.solve(op, torch.ones(3, dtype=torch.float64), **kwargs)


@pytest.mark.parametrize(
    "b", [torch.ones(4), torch.ones(3, 2, 1), torch.ones(3, 0), torch.ones(3, dtype=torch.long)]
)
def test_a_right_hand_side_of_the_wrong_shape_or_type_is_rejected(b):
    op = lc.DenseOperator(torch.eye(3))
    with pytest.raises(ValueError, match="b must"):
        lc.solve(op, b)


def test_non_finite_products_raise_floating_point_error():
    matrix = torch.eye(3, dtype=torch.float64)
    matrix[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        lc.solve(lc.DenseOperator(matrix), torch.ones(3, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["minres", "cg"])
def test_on_gpu_convergence_is_checked_every_few_iterations_not_every_one(method):
    import warnings

    from lightning_curvature.solvers.krylov import GPU_CHECK_EVERY

    eigenvalues = torch.logspace(-4, 0, 2000, dtype=torch.float64)
    op = lc.DenseOperator(matrix_with_spectrum(eigenvalues).float().cuda())
    b = torch.ones(2000, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = lc.solve(op, b, damping=0.0, tol=1e-9, max_iters=60, method=method)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert res.iterations == 60 and res.x.device.type == "cuda"
    assert len(syncs) <= 60 // GPU_CHECK_EVERY * 3 + 10
    assert len(syncs) < 60


class _MatvecOnly:
    """An operator with matvec alone (no matmat), as the protocol allows."""

    def __init__(self, matrix):
        self.matrix, self.dim = matrix, matrix.shape[0]
        self.device, self.dtype = matrix.device, matrix.dtype

    def matvec(self, v):
        return self.matrix @ v


def test_an_operator_without_matmat_is_solved_column_by_column():
    matrix = _indefinite()
    b = _rhs(matrix.shape[0], m=2)
    res = lc.solve(_MatvecOnly(matrix), b, damping=0.0, tol=1e-11)
    assert res.converged
    assert torch.allclose(res.x, torch.linalg.solve(matrix, b), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["minres", "cg"])
def test_sparse_convergence_checks_give_the_same_answer(method):
    # check_every > 1 is the accelerator's setting; columns that converge between checks
    # must stay put (CG freezes them, MINRES's φ̄ is 0 once its Krylov space is exhausted).
    matrix = matrix_with_spectrum(torch.linspace(0.5, 4.0, 30, dtype=torch.float64))
    b = _rhs(30, m=3)
    every = lc.solve(lc.DenseOperator(matrix), b, damping=0.0, tol=1e-10, method=method)
    sparse = lc.solve(
        lc.DenseOperator(matrix), b, damping=0.0, tol=1e-10, method=method, check_every=7
    )
    assert sparse.converged and sparse.iterations >= every.iterations
    assert torch.allclose(sparse.x, every.x, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method", ["minres", "cg"])
def test_iterating_past_an_exhausted_krylov_space_stays_finite_and_exact(method):
    # dim 5, checks every 50 iterations: 45 iterations run after the exact solution.
    eigenvalues = torch.tensor([-2.0, -1.0, 1.0, 3.0, 5.0], dtype=torch.float64)
    matrix = matrix_with_spectrum(eigenvalues if method == "minres" else eigenvalues + 3.0)
    b = _rhs(5, m=3)
    b[:, 2] = 0.0
    res = lc.solve(
        lc.DenseOperator(matrix),
        b,
        damping=0.0,
        tol=1e-12,
        method=method,
        max_iters=200,
        check_every=50,
    )
    assert res.converged and res.iterations == 50
    assert torch.allclose(res.x, torch.linalg.solve(matrix, b), rtol=1e-10, atol=1e-12)
