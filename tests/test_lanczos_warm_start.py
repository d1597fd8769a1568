"""Warm starts: the track tier's λmax from the previous Ritz vectors, on drifting operators."""

import statistics

import pytest
import torch

import lightning_curvature as lc
from tests.truth import classification_batches, cross_entropy_loss, matrix_with_spectrum, tanh_mlp


def drifting_matrices(steps, size=400, drift=1e-3, seed=0):
    """A spectrum with separated outliers over a bulk, nudged by a small symmetric step."""
    spectrum = torch.cat(
        [
            torch.tensor([10.0, 8.0, 7.0, 6.5, 6.0, 5.5]),
            torch.linspace(-1.0, 4.0, size - 6, dtype=torch.float64),
        ]
    )
    matrix = matrix_with_spectrum(spectrum, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        yield matrix
        noise = torch.randn(size, size, generator=generator, dtype=torch.float64) * drift
        matrix = matrix + (noise + noise.T) / 2


def test_track_tier_needs_a_handful_of_matvecs_on_a_steady_run():
    previous, matvecs = None, []
    for step, matrix in enumerate(drifting_matrices(12)):
        op = lc.DenseOperator(matrix.float())
        warm = lc.lanczos(op, k=1, tol=1e-3, seed=step, init=previous, return_eigenvectors=True)
        cold = lc.lanczos(op, k=1, tol=1e-3, seed=step)
        truth = torch.linalg.eigvalsh(matrix)[-1].item()
        assert warm.converged
        assert abs(warm.eigenvalues[0].item() - truth) <= warm.error_bounds[0].item() + 1e-5
        assert abs(warm.eigenvalues[0].item() - cold.eigenvalues[0].item()) <= 1e-3 * truth
        if previous is not None:
            matvecs.append(warm.num_matvecs)
        previous = warm.eigenvectors[:, 0]
    assert statistics.median(matvecs) <= 8


def test_a_block_warm_start_converges_on_its_rayleigh_ritz_step_when_the_drift_is_small():
    matrices = list(drifting_matrices(4, drift=1e-6))
    previous = lc.lanczos(lc.DenseOperator(matrices[0]), k=5, return_eigenvectors=True)
    for matrix in matrices[1:]:
        op = lc.DenseOperator(matrix)
        truth = torch.linalg.eigvalsh(matrix).flip(0)[:5]
        cold = lc.lanczos(op, k=5)
        warm = lc.lanczos(op, k=5, init=previous.eigenvectors, return_eigenvectors=True)
        assert warm.converged and cold.converged
        assert bool(((warm.eigenvalues - truth).abs() <= warm.error_bounds + 1e-12).all())
        assert warm.num_matvecs < cold.num_matvecs / 2
        previous = warm


def test_a_block_warm_start_still_converges_when_the_drift_is_large():
    matrices = list(drifting_matrices(2, drift=1e-2))
    previous = lc.lanczos(lc.DenseOperator(matrices[0]), k=5, return_eigenvectors=True)
    warm = lc.lanczos(lc.DenseOperator(matrices[1]), k=5, init=previous.eigenvectors)
    truth = torch.linalg.eigvalsh(matrices[1]).flip(0)[:5]
    assert warm.converged
    assert bool(((warm.eigenvalues - truth).abs() <= warm.error_bounds + 1e-12).all())


STEPS_BETWEEN_MEASUREMENTS = 1


def test_warm_start_on_a_real_network_measured_every_sgd_step():
    model = tanh_mlp()
    batches = classification_batches(2, 32, (10,), 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    previous, matvecs = None, []
    for step in range(8):
        op = lc.HessianOperator(model, cross_entropy_loss, batches)
        warm = lc.lanczos(op, k=1, tol=1e-3, init=previous, return_eigenvectors=True)
        cold = lc.lanczos(op, k=1, tol=1e-3)
        assert warm.converged
        relative = abs(warm.eigenvalues[0].item() / cold.eigenvalues[0].item() - 1)
        assert relative <= 1e-3
        if previous is not None:
            matvecs.append(warm.num_matvecs)
        previous = warm.eigenvectors
        for _ in range(STEPS_BETWEEN_MEASUREMENTS):
            optimizer.zero_grad()
            cross_entropy_loss(model, batches[step % 2]).backward()
            optimizer.step()
    assert statistics.median(matvecs) <= 8


def test_a_warm_start_counts_its_seed_products_within_num_iters_and_returns_its_basis():
    matrix = next(drifting_matrices(1))
    op = lc.DenseOperator(matrix)
    block = torch.linalg.qr(torch.randn(400, 3, dtype=torch.float64))[0]
    result = lc.lanczos(op, k=1, num_iters=5, tol=0, init=block, return_basis=True)
    assert result.num_matvecs == op.num_matvecs == 5
    basis = result.basis
    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64))
    torch.testing.assert_close(
        result.basis_rayleigh, (basis * (matrix @ basis)).sum(dim=0), rtol=1e-10, atol=1e-10
    )


def test_a_seed_that_is_an_eigenvector_goes_on_from_a_random_direction():
    # The seed's residual is zero: Lanczos cannot continue from it and draws a direction
    # (only then: a warm start draws no random vector otherwise). k=2 needs the second one.
    spectrum = torch.arange(1.0, 51.0, dtype=torch.float64)
    seed = torch.zeros(50, dtype=torch.float64)
    seed[-1] = 1.0
    result = lc.lanczos(lc.DenseOperator(torch.diag(spectrum)), k=2, init=seed)
    assert result.converged
    # Each within its own bound, and the bounds within tol (1e-4) of the scale (50).
    assert ((result.eigenvalues - spectrum[[-1, -2]]).abs() <= result.error_bounds).all()
    assert (result.error_bounds <= 1e-4 * 50).all()


def test_restarts_converge_within_a_bounded_basis():
    # A slowly converging spectrum: a top cluster 2% apart over a bulk. Ten steps are not
    # enough; restarting from the wanted Ritz vectors gets there with a basis of ten.
    spectrum = torch.cat(
        [torch.tensor([10.0, 9.8, 9.6, 9.4]), torch.linspace(-1.0, 9.0, 396, dtype=torch.float64)]
    )
    op = lc.DenseOperator(matrix_with_spectrum(spectrum, seed=2))
    capped = lc.lanczos(op, k=1, num_iters=10, tol=1e-6)
    assert not capped.converged
    restarted = lc.lanczos(op, k=1, num_iters=10, tol=1e-6, restarts=40, return_basis=True)
    assert restarted.converged and restarted.basis.shape[1] <= 10
    assert restarted.num_matvecs > 10
    truth = spectrum.max()
    assert ((restarted.eigenvalues - truth).abs() <= restarted.error_bounds).all()


def test_restarts_must_be_a_non_negative_integer_and_need_k_1():
    op = lc.DenseOperator(torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="restarts"):
        lc.lanczos(op, k=1, restarts=-1)
    with pytest.raises(ValueError, match="restarts needs k=1"):
        lc.lanczos(op, k=2, restarts=3)
