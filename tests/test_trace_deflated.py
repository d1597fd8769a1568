"""The trace deflated by the Ritz space Lanczos already found (no extra products)."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import lightning_curvature as lc
from tests.truth import matrix_with_spectrum


@pytest.fixture(scope="module")
def least_squares_hessian():
    """Least squares on digits (64 features + a bias): H = 2/n·AᵀA, in closed form."""
    features, _ = load_digits(return_X_y=True)
    design = torch.cat(
        [torch.tensor(features, dtype=torch.float64), torch.ones(len(features), 1)], dim=1
    )
    return 2 / len(features) * design.T @ design


def test_deflating_the_top_ritz_vectors_makes_the_trace_accurate_and_keeps_stderr_honest(
    least_squares_hessian,
):
    op = lc.DenseOperator(least_squares_hessian)
    exact = float(torch.trace(least_squares_hessian))
    top = lc.lanczos(op, k=5, return_eigenvectors=True)
    plain, deflated = [], []
    for seed in range(200):
        plain.append(lc.hutchinson_trace(op, num_probes=10, seed=seed))
        deflated.append(
            lc.hutchinson_trace(
                op,
                num_probes=10,
                seed=seed,
                deflate=top.eigenvectors,
                deflate_values=top.eigenvalues,
            )
        )
    relative = [abs(r.estimate - exact) / exact for r in deflated]
    assert np.median(relative) <= 0.02
    assert np.median([abs(r.estimate - exact) / exact for r in plain]) > 0.1
    assert np.mean([abs(r.estimate - exact) <= 3 * r.stderr for r in deflated]) >= 0.95
    assert all(r.num_matvecs == 10 for r in deflated)  # the Ritz values cost nothing


def test_deflating_the_whole_lanczos_basis_uses_its_rayleigh_quotients(least_squares_hessian):
    op = lc.DenseOperator(least_squares_hessian.float())
    exact = float(torch.trace(least_squares_hessian))
    top = lc.lanczos(op, k=5, return_basis=True)
    assert top.basis.shape == (65, top.num_iters)
    torch.testing.assert_close(
        top.basis_rayleigh,
        (top.basis.double() * (least_squares_hessian @ top.basis.double())).sum(dim=0),
        rtol=1e-4,
        atol=1e-4,
    )
    results = [
        lc.hutchinson_trace(
            op, num_probes=10, seed=s, deflate=top.basis, deflate_values=top.basis_rayleigh
        )
        for s in range(100)
    ]
    assert np.median([abs(r.estimate - exact) / exact for r in results]) <= 0.02
    assert np.mean([abs(r.estimate - exact) <= 3 * r.stderr for r in results]) >= 0.95


def test_deflation_without_values_spends_one_product_per_column():
    spectrum = torch.cat(
        [torch.tensor([50.0, 30.0]), torch.linspace(-1, 1, 98, dtype=torch.float64)]
    )
    op = lc.DenseOperator(matrix_with_spectrum(spectrum, seed=1))
    top = lc.lanczos(op, k=2, return_eigenvectors=True)
    given = lc.hutchinson_trace(op, 10, deflate=top.eigenvectors, deflate_values=top.eigenvalues)
    computed = lc.hutchinson_trace(op, 10, deflate=top.eigenvectors)
    assert computed.num_matvecs == given.num_matvecs + 2
    assert computed.estimate == pytest.approx(given.estimate, rel=1e-9)
    inside = [
        abs(r.estimate - float(spectrum.sum())) <= 3 * r.stderr
        for r in (lc.hutchinson_trace(op, 10, seed=s, deflate=top.eigenvectors) for s in range(100))
    ]
    assert np.mean(inside) >= 0.95


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"deflate": torch.ones(10, 2)}, "deflate"),
        ({"deflate": torch.eye(9, 2)}, "deflate"),
        ({"deflate": torch.eye(10, 2), "method": "hutch++"}, "deflate"),
        ({"deflate": torch.eye(10, 2), "deflate_values": torch.ones(3)}, "deflate_values"),
    ],
)
def test_bad_deflation_arguments_name_themselves(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        lc.hutchinson_trace(lc.DenseOperator(torch.eye(10)), 10, **kwargs)


def test_deflating_a_complete_basis_gives_the_exact_trace_with_zero_stderr():
    spectrum = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    op = lc.DenseOperator(matrix_with_spectrum(spectrum))
    everything = lc.lanczos(op, k=4, return_eigenvectors=True)
    result = lc.hutchinson_trace(
        op, 4, deflate=everything.eigenvectors, deflate_values=everything.eigenvalues
    )
    assert result.estimate == pytest.approx(4.5, abs=1e-12)
    assert result.stderr == pytest.approx(0.0, abs=1e-12)
