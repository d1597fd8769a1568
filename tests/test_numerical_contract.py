"""DESIGN.md's numerical contract, at the default settings, on models with a dense Hessian.

- λmax to a relative error ≤ 1e-3 and each of the top 5 to ≤ 1e-2;
- a trace whose reported stderr is honest: the exact trace within 3 stderr in ≥ 95% of seeds;
- with a seed, results on the CPU are identical run to run.
"""

import numpy as np
import pytest
import torch

import lightning_curvature as lc
from tests.truth import (
    classification_batches,
    cross_entropy_loss,
    dense_hessian,
    relu_mlp,
    small_cnn,
    tanh_mlp,
)

CASES = {
    "tanh_mlp": (tanh_mlp, lambda: classification_batches(2, 32, (10,), 4)),
    "relu_mlp": (relu_mlp, lambda: classification_batches(2, 32, (10,), 4)),
    "cnn_batchnorm_eval": (small_cnn, lambda: classification_batches(2, 8, (1, 8, 8), 3)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    make_model, make_batches = CASES[request.param]
    model = make_model().eval()
    batches = make_batches()
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(model, cross_entropy_loss, batches))
    return model, batches, eigenvalues


def test_default_lanczos_gives_lambda_max_and_top5_within_contract(case):
    model, batches, eigenvalues = case
    op = lc.HessianOperator(model, cross_entropy_loss, batches)  # float32, defaults
    truth = eigenvalues.flip(0)[:5]
    top1 = lc.lanczos(op, k=1)
    assert top1.converged
    assert abs(top1.eigenvalues[0].item() / truth[0].item() - 1) <= 1e-3
    top5 = lc.lanczos(op, k=5)
    assert top5.converged
    relative = (top5.eigenvalues - truth).abs() / truth.abs()
    assert float(relative.max()) <= 1e-2
    assert abs(top5.eigenvalues[0].item() / truth[0].item() - 1) <= 1e-3


def test_default_lanczos_smallest_finds_lambda_min(case):
    model, batches, eigenvalues = case
    op = lc.HessianOperator(model, cross_entropy_loss, batches)
    bottom = lc.lanczos(op, k=1, which="smallest")
    scale = eigenvalues.abs().max().item()
    error = abs(bottom.eigenvalues[0].item() - eigenvalues[0].item())
    assert error <= 1e-3 * scale
    # It reports its own convergence, honestly, and never after a couple of steps.
    assert bottom.converged and bottom.num_iters >= 20
    assert error <= bottom.error_bounds[0].item() + 1e-6 * scale


def test_trace_stderr_is_honest_over_seeds(case):
    model, batches, eigenvalues = case
    op = lc.HessianOperator(model, cross_entropy_loss, batches)
    exact = float(eigenvalues.sum())
    results = [lc.hutchinson_trace(op, seed=seed) for seed in range(100)]
    inside = [abs(r.estimate - exact) <= 3 * r.stderr for r in results]
    assert np.mean(inside) >= 0.95
    # ... and the stderr is not inflated: it matches the spread of the estimates.
    spread = np.std([r.estimate for r in results], ddof=1)
    assert np.mean([r.stderr for r in results]) == pytest.approx(spread, rel=0.3)


def test_power_iteration_defaults_find_the_dominant_eigenvalue(case):
    model, batches, eigenvalues = case
    op = lc.HessianOperator(model, cross_entropy_loss, batches)
    dominant = eigenvalues[eigenvalues.abs().argmax()].item()
    result = lc.power_iteration(op)
    assert result.eigenvalue == pytest.approx(dominant, rel=1e-2)


def test_results_are_identical_run_to_run_on_cpu(case):
    model, batches, _ = case

    def measure():
        op = lc.HessianOperator(model, cross_entropy_loss, batches)
        return (
            lc.lanczos(op, k=5).eigenvalues,
            lc.hutchinson_trace(op).estimate,
            lc.spectral_density(op, num_runs=2, num_iters=20).density,
        )

    first, second = measure(), measure()
    assert torch.equal(first[0], second[0])
    assert first[1] == second[1]
    assert torch.equal(first[2], second[2])


def test_spectral_density_mean_is_the_trace_over_dim(case):
    model, batches, eigenvalues = case
    op = lc.HessianOperator(model, cross_entropy_loss, batches)
    density = lc.spectral_density(op, num_runs=20, num_iters=40)
    mean = float((density.weights * density.nodes).sum()) / density.num_runs
    spread = float(eigenvalues.abs().max())
    assert mean == pytest.approx(float(eigenvalues.mean()), abs=0.05 * spread)
    assert density.lambda_max == pytest.approx(float(eigenvalues[-1]), rel=1e-3)
