"""The estimators alone, on dense matrices whose spectrum is known exactly."""

import numpy as np
import pytest
import torch

import lightning_curvature as lc
from lightning_curvature.estimators._basis import Basis
from tests.truth import matrix_with_spectrum


def op_with_spectrum(eigenvalues, seed=0, dtype=torch.float64):
    return lc.DenseOperator(matrix_with_spectrum(torch.as_tensor(eigenvalues), seed).to(dtype))


def bulk(n, low=-1.0, high=2.0):
    return torch.linspace(low, high, n, dtype=torch.float64)


def test_lanczos_top_k_matches_known_spectrum():
    spectrum = torch.cat([torch.tensor([9.0, 7.5, 6.0, 5.0, 4.5]), bulk(295)])
    result = lc.lanczos(op_with_spectrum(spectrum), k=5)
    assert result.converged
    torch.testing.assert_close(
        result.eigenvalues,
        torch.tensor([9.0, 7.5, 6.0, 5.0, 4.5], dtype=torch.float64),
        rtol=1e-6,
        atol=0,
    )
    assert result.eigenvalues.dtype == torch.float64
    assert result.num_matvecs == result.num_iters < 70


def test_lanczos_finds_every_copy_of_a_repeated_eigenvalue():
    spectrum = torch.cat([torch.tensor([10.0, 10.0, 10.0, 5.0, 4.0]), bulk(195)])
    result = lc.lanczos(op_with_spectrum(spectrum), k=5)
    assert result.converged
    torch.testing.assert_close(
        result.eigenvalues,
        torch.tensor([10.0, 10, 10, 5, 4], dtype=torch.float64),
        rtol=1e-8,
        atol=0,
    )


def test_lanczos_separates_a_tight_cluster():
    cluster = [8.0, 8.0 - 1e-3, 8.0 - 2e-3, 8.0 - 3e-3]
    spectrum = torch.cat([torch.tensor(cluster), bulk(196, 0.0, 1.0)])
    result = lc.lanczos(op_with_spectrum(spectrum), k=4)
    assert result.converged
    torch.testing.assert_close(
        result.eigenvalues, torch.tensor(cluster, dtype=torch.float64), rtol=1e-5, atol=0
    )


def test_lanczos_smallest_reports_negative_curvature():
    spectrum = torch.cat([torch.tensor([-3.0, -2.0]), bulk(198, 0.0, 4.0)])
    result = lc.lanczos(op_with_spectrum(spectrum), k=2, which="smallest")
    assert result.converged
    torch.testing.assert_close(
        result.eigenvalues, torch.tensor([-3.0, -2.0], dtype=torch.float64), rtol=1e-6, atol=0
    )


def test_lanczos_largest_is_algebraic_not_magnitude():
    spectrum = torch.cat([torch.tensor([-20.0, 3.0]), bulk(98, 0.0, 1.0)])
    result = lc.lanczos(op_with_spectrum(spectrum), k=1)
    assert result.converged
    # tol is relative to the spectral scale, the largest magnitude (20 here).
    error = abs(result.eigenvalues[0].item() - 3.0)
    assert error <= result.error_bounds[0].item() <= 1e-4 * 20


def test_lanczos_gives_no_ghost_copies_after_many_iterations():
    # In plain Lanczos, rounding errors make λmax reappear once it has converged; after
    # dozens of extra steps the top-k would read [λ1, λ1, λ2, ...]. Full
    # re-orthogonalisation must keep the Ritz values a faithful picture of the spectrum.
    spectrum = torch.cat([torch.tensor([50.0, 20.0, 10.0]), bulk(297, 0.0, 5.0)])
    result = lc.lanczos(op_with_spectrum(spectrum, dtype=torch.float32), k=4, num_iters=200, tol=0)
    assert result.num_iters == 200
    top = result.eigenvalues
    torch.testing.assert_close(
        top[:3], torch.tensor([50.0, 20.0, 10.0], dtype=torch.float64), rtol=1e-5, atol=0
    )
    assert top[3].item() == pytest.approx(5.0, abs=1e-3)
    # No Ritz value other than the first sits near 50.
    assert int((result.ritz_values - 50.0).abs().lt(1.0).sum()) == 1


def test_lanczos_basis_memory_follows_the_steps_taken_not_the_most_allowed():
    # A well-separated λmax converges in a handful of steps; the basis must not hold the
    # 80 vectors that num_iters allows (80 copies of the parameters on a GPU).
    from lightning_curvature.estimators import _krylov

    spectrum = torch.cat([torch.tensor([100.0]), bulk(999, 0.0, 1.0)])
    op = op_with_spectrum(spectrum)
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(op.dim, generator=generator, dtype=torch.float64)
    run = _krylov.krylov_projection(
        op,
        start,
        80,
        generator,
        restart_on_breakdown=True,
        is_converged=lambda projection: projection.size >= 9,
    )
    assert run.projection.size == run.basis.size == 9
    assert run.basis.rows.shape[0] == Basis.INITIAL_ROWS  # 16 rows, not 80
    rows = run.basis.active
    torch.testing.assert_close(rows @ rows.T, torch.eye(9, dtype=torch.float64))
    # The projected matrix is QᵀAQ.
    torch.testing.assert_close(
        torch.from_numpy(run.projection.matrix), rows @ op.matrix @ rows.T, atol=1e-10, rtol=0
    )


def test_lanczos_continues_after_breakdown_on_a_low_rank_matrix():
    # Rank 10 in dimension 120: the Krylov space is invariant after 11 steps.
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(10, 120, generator=generator, dtype=torch.float64)
    gram = x.T @ x
    truth = torch.linalg.eigvalsh(gram).flip(0)
    result = lc.lanczos(lc.DenseOperator(gram), k=12)
    torch.testing.assert_close(result.eigenvalues, truth[:12], rtol=1e-8, atol=1e-8)
    assert result.converged


def test_lanczos_says_when_it_has_not_converged():
    spectrum = torch.linspace(1.0, 1.001, 400, dtype=torch.float64)
    result = lc.lanczos(op_with_spectrum(spectrum), k=5, num_iters=10, tol=1e-12)
    assert not result.converged
    assert result.num_iters == 10
    assert float(result.error_bounds.max()) > 1e-12


def test_lanczos_residuals_are_the_true_ritz_residuals():
    spectrum = torch.cat([torch.tensor([6.0, 5.0]), bulk(98)])
    op = op_with_spectrum(spectrum)
    result = lc.lanczos(op, k=2, num_iters=8, tol=0, return_eigenvectors=True)
    vectors = result.eigenvectors
    true_residuals = torch.linalg.vector_norm(
        op.matrix @ vectors - vectors * result.eigenvalues, dim=0
    )
    torch.testing.assert_close(result.residuals, true_residuals, rtol=1e-6, atol=1e-12)
    # The reported bound really bounds the eigenvalue error.
    errors = (result.eigenvalues - torch.tensor([6.0, 5.0], dtype=torch.float64)).abs()
    assert bool((errors <= result.error_bounds * 1.01 + 1e-12).all())


def test_lanczos_eigenvectors_are_orthonormal_eigenvectors():
    spectrum = torch.cat([torch.tensor([6.0, 5.0, 4.0]), bulk(97)])
    op = op_with_spectrum(spectrum)
    result = lc.lanczos(op, k=3, return_eigenvectors=True)
    vectors = result.eigenvectors
    torch.testing.assert_close(
        vectors.T @ vectors, torch.eye(3, dtype=torch.float64), atol=1e-8, rtol=0
    )
    # Each Ritz vector points along the true eigenvector (error ~ residual / gap).
    _, true_vectors = torch.linalg.eigh(op.matrix)
    alignment = (true_vectors[:, -3:].flip(1) * vectors).sum(dim=0).abs()
    assert float(alignment.min()) > 0.999


def test_power_iteration_returns_the_largest_magnitude_and_says_so():
    spectrum = torch.cat([torch.tensor([-8.0, 3.0]), bulk(98, 0.0, 1.0)])
    result = lc.power_iteration(op_with_spectrum(spectrum), num_iters=300, tol=1e-10)
    assert result.kind == "largest_magnitude"
    assert result.converged
    assert result.eigenvalue == pytest.approx(-8.0, rel=1e-6)


def test_power_iteration_needs_many_more_matvecs_than_lanczos_for_lambda_max():
    spectrum = torch.cat([torch.tensor([1.0]), torch.linspace(0.0, 0.95, 499, dtype=torch.float64)])
    op = op_with_spectrum(spectrum)
    lanczos = lc.lanczos(op, k=1, tol=1e-6)
    power = lc.power_iteration(op, num_iters=1000, tol=1e-8)
    assert lanczos.eigenvalues[0].item() == pytest.approx(1.0, rel=1e-6)
    assert power.eigenvalue == pytest.approx(1.0, rel=1e-4)
    assert 3 * lanczos.num_matvecs < power.num_matvecs


def test_hutchinson_trace_stderr_is_honest_over_many_seeds():
    spectrum = torch.cat([torch.tensor([30.0, -5.0]), bulk(148, -1.0, 3.0)])
    op = op_with_spectrum(spectrum)
    exact = float(spectrum.sum())
    inside = [
        abs(r.estimate - exact) <= 3 * r.stderr
        for r in (lc.hutchinson_trace(op, num_probes=30, seed=s) for s in range(300))
    ]
    assert np.mean(inside) >= 0.95


def test_hutchinson_trace_error_shrinks_like_one_over_root_probes():
    op = op_with_spectrum(torch.cat([torch.tensor([30.0]), bulk(149, -1.0, 3.0)]))
    few = [lc.hutchinson_trace(op, num_probes=10, seed=s).stderr for s in range(20)]
    many = [lc.hutchinson_trace(op, num_probes=160, seed=s).stderr for s in range(20)]
    assert np.mean(few) / np.mean(many) == pytest.approx(4.0, rel=0.25)


def test_hutch_plus_plus_beats_hutchinson_when_a_few_eigenvalues_dominate():
    spectrum = torch.cat([torch.tensor([100.0, 80.0, 60.0, 50.0, 40.0]), bulk(195, 0.0, 0.1)])
    op = op_with_spectrum(spectrum)
    exact = float(spectrum.sum())
    errors = {
        method: np.mean(
            [
                abs(lc.hutchinson_trace(op, num_probes=30, seed=s, method=method).estimate - exact)
                for s in range(40)
            ]
        )
        for method in ("hutchinson", "hutch++")
    }
    assert errors["hutch++"] < 0.2 * errors["hutchinson"]
    calibrated = [
        abs(r.estimate - exact) <= 3 * r.stderr
        for r in (
            lc.hutchinson_trace(op, num_probes=30, seed=s, method="hutch++") for s in range(100)
        )
    ]
    assert np.mean(calibrated) >= 0.95


def test_hutchinson_diagonal_matches_the_diagonal_within_its_stderr():
    matrix = matrix_with_spectrum(torch.cat([torch.tensor([5.0, 4.0]), bulk(58)]), seed=2)
    result = lc.hutchinson_diagonal(lc.DenseOperator(matrix), num_probes=400, seed=0)
    z = (result.estimate - matrix.diagonal()) / result.stderr
    assert float(z.abs().max()) < 4.5
    assert float((z.abs() <= 3).double().mean()) >= 0.95
    assert result.estimate.shape == (60,)


def test_spectral_density_puts_the_right_mass_in_each_cluster():
    spectrum = torch.cat(
        [torch.full((60,), 5.0), torch.linspace(-1.0, 1.0, 240, dtype=torch.float64)]
    )
    op = op_with_spectrum(spectrum)
    density = lc.spectral_density(op, num_runs=20, num_iters=40, seed=0)
    mass_high = float((density.weights * (density.nodes > 3.0)).sum()) / density.num_runs
    assert mass_high == pytest.approx(60 / 300, abs=0.04)
    mean_eigenvalue = float((density.weights * density.nodes).sum()) / density.num_runs
    assert mean_eigenvalue == pytest.approx(float(spectrum.mean()), abs=0.1)
    assert density.lambda_max == pytest.approx(5.0, rel=1e-8)
    assert density.lambda_min == pytest.approx(-1.0, abs=0.02)
    step = float(density.grid[1] - density.grid[0])
    assert float(density.density.sum()) * step == pytest.approx(1.0, abs=1e-3)
    # The smoothed density peaks at the cluster.
    assert float(density.grid[density.density.argmax()]) == pytest.approx(5.0, abs=0.1)


def test_spectral_density_on_a_small_matrix_is_the_exact_measure():
    spectrum = torch.tensor([-2.0, 0.5, 1.0, 3.0, 7.0], dtype=torch.float64)
    density = lc.spectral_density(op_with_spectrum(spectrum), num_runs=3, num_iters=80)
    for run in range(3):
        mask = density.weights[run] > 1e-12
        torch.testing.assert_close(
            density.nodes[run][mask].sort().values, spectrum, rtol=1e-8, atol=1e-8
        )


def test_estimators_are_reproducible_and_leave_the_global_rng_alone():
    op = op_with_spectrum(torch.cat([torch.tensor([4.0, 3.0]), bulk(98)]), dtype=torch.float32)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = (
        lc.lanczos(op, k=3).eigenvalues,
        lc.power_iteration(op).eigenvalue,
        lc.hutchinson_trace(op).estimate,
        lc.spectral_density(op, num_runs=2).density,
    )
    assert torch.equal(torch.get_rng_state(), state)
    second = (
        lc.lanczos(op, k=3).eigenvalues,
        lc.power_iteration(op).eigenvalue,
        lc.hutchinson_trace(op).estimate,
        lc.spectral_density(op, num_runs=2).density,
    )
    assert torch.equal(first[0], second[0]) and first[1] == second[1] and first[2] == second[2]
    assert torch.equal(first[3], second[3])
    assert lc.hutchinson_trace(op, seed=1).estimate != first[2]


def test_non_finite_products_raise_a_clear_error():
    matrix = torch.eye(20, dtype=torch.float64)
    matrix[3, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        lc.lanczos(lc.DenseOperator(matrix), k=1)
    with pytest.raises(FloatingPointError, match="non-finite"):
        lc.hutchinson_trace(lc.DenseOperator(matrix))


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda op: lc.lanczos(op, k=0), "k"),
        (lambda op: lc.lanczos(op, k=11), "k"),
        (lambda op: lc.lanczos(op, k=2, num_iters=1), "num_iters"),
        (lambda op: lc.lanczos(op, tol=-1.0), "tol"),
        (lambda op: lc.lanczos(op, which="middle"), "which"),
        (lambda op: lc.lanczos(op, init=torch.ones(3)), "init"),
        (lambda op: lc.power_iteration(op, num_iters=0), "num_iters"),
        (lambda op: lc.hutchinson_trace(op, num_probes=1), "num_probes"),
        (lambda op: lc.hutchinson_trace(op, method="exact"), "method"),
        (lambda op: lc.spectral_density(op, num_runs=0), "num_runs"),
        (lambda op: lc.spectral_density(op, sigma=0.0), "sigma"),
        (lambda op: lc.lanczos(op, seed="zero"), "seed"),
        (lambda op: lc.lanczos(op, k=True), "k"),
        (lambda op: lc.lanczos(op, tol=False), "tol"),
        (lambda op: lc.lanczos(op, init=torch.ones(10, 11)), "init"),
    ],
)
def test_bad_arguments_name_themselves(call, argument):
    with pytest.raises(ValueError, match=argument):
        call(lc.DenseOperator(torch.eye(10)))


def test_numpy_numbers_are_accepted_where_python_numbers_are():
    op = op_with_spectrum(torch.cat([torch.tensor([4.0, 3.0]), bulk(98)]))
    result = lc.lanczos(
        op, k=np.int64(2), num_iters=np.int32(30), tol=np.float32(1e-3), seed=np.int64(0)
    )
    assert result.eigenvalues[0].item() == pytest.approx(4.0, rel=1e-3)
    assert lc.power_iteration(op, num_iters=np.int64(5), tol=np.float64(1e-3)).num_iters == 5
    assert lc.hutchinson_trace(op, num_probes=np.int64(4)).num_probes == 4


def test_power_iteration_stops_on_the_same_span_on_every_device():
    # The Rayleigh quotient is compared with its value CHECK_SPAN iterations earlier, so a
    # check every iteration (CPU) stops where checks every CHECK_SPAN (GPU) would, or sooner
    # by less than CHECK_SPAN iterations.
    from lightning_curvature.estimators.power import CHECK_SPAN

    spectrum = torch.cat([torch.tensor([1.0]), torch.linspace(0.0, 0.9, 199, dtype=torch.float64)])
    result = lc.power_iteration(op_with_spectrum(spectrum), num_iters=500, tol=1e-6)
    assert result.converged and result.num_iters > CHECK_SPAN
    assert result.eigenvalue == pytest.approx(1.0, rel=1e-3)


def test_the_accelerator_path_checks_every_few_steps_and_agrees_with_the_cpu_path(monkeypatch):
    # On an accelerator the loop never waits on the host: both Gram-Schmidt passes always
    # run and breakdowns are found at the checks, every few steps, and the steps after
    # one discarded. Forcing that schedule on the CPU must give the same answers.
    from lightning_curvature.estimators import _common, _krylov

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(10, 120, generator=generator, dtype=torch.float64)
    gram = x.T @ x  # rank 10: the Krylov space is invariant after 10 steps
    truth = torch.linalg.eigvalsh(gram).flip(0)
    spectrum = torch.cat([torch.tensor([9.0, 7.5, 6.0]), bulk(197)])
    cpu = [lc.lanczos(lc.DenseOperator(gram), k=12), lc.lanczos(op_with_spectrum(spectrum), k=3)]
    monkeypatch.setattr(_krylov, "check_every", lambda device: _common.ACCELERATOR_CHECK_EVERY)
    accelerator = [
        lc.lanczos(lc.DenseOperator(gram), k=12),
        lc.lanczos(op_with_spectrum(spectrum), k=3),
    ]
    torch.testing.assert_close(accelerator[0].eigenvalues, truth[:12], rtol=1e-8, atol=1e-8)
    assert accelerator[0].converged
    assert accelerator[0].num_matvecs >= cpu[0].num_matvecs  # discarded steps still count
    torch.testing.assert_close(accelerator[1].eigenvalues, cpu[1].eigenvalues, rtol=1e-6, atol=0)
    assert accelerator[1].num_iters % _common.ACCELERATOR_CHECK_EVERY == 0
