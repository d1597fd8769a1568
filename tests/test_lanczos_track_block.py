"""A warm block [previous top vector, last update, probe gradient]: λmax and the Rayleigh
quotients of the update and the gradient (directional and batch sharpness) from one Lanczos
run, the quotients at no product beyond the block's. Truth: dense float64 matrices with a
known spectrum (uᵀAu/uᵀu computed directly) and the eigendecomposition."""

import numpy as np
import torch

import lightning_curvature as lc
from tests.truth import matrix_with_spectrum


def spectrum():
    return torch.cat(
        [torch.tensor([10.0, 7.0, 5.0]), torch.linspace(-1.0, 2.0, 197, dtype=torch.float64)]
    )


def rayleigh(matrix, column):
    return float(column @ matrix @ column / (column @ column))


def test_the_block_gives_each_columns_rayleigh_quotient_and_lambda_max():
    matrix = matrix_with_spectrum(spectrum(), seed=3)
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    generator = torch.Generator().manual_seed(0)
    previous = eigenvectors[:, -1] + 1e-3 * torch.randn(
        200, generator=generator, dtype=torch.float64
    )
    update = torch.randn(200, generator=generator, dtype=torch.float64) * 0.01
    gradient = 0.3 * eigenvectors[:, -1] + torch.randn(
        200, generator=generator, dtype=torch.float64
    )
    block = torch.stack([previous, update, gradient], dim=1)
    op = lc.DenseOperator(matrix)
    result = lc.lanczos(op, k=1, tol=1e-4, init=block)
    expected = [rayleigh(matrix, block[:, j]) for j in range(3)]
    # Float64 products; the quotients are exact to rounding: 1e-12 of the scale of 10.
    np.testing.assert_allclose(result.init_rayleigh.numpy(), expected, rtol=0, atol=1e-11)
    assert result.converged
    error = abs(float(result.eigenvalues[0]) - float(eigenvalues[-1]))
    assert error <= float(result.error_bounds[0]) <= 1e-4 * 10
    assert op.num_matvecs == result.num_matvecs  # nothing spent beyond the run


def test_a_warm_block_near_the_top_vector_stops_after_its_block_product():
    matrix = matrix_with_spectrum(spectrum(), seed=4)
    eigenvectors = torch.linalg.eigh(matrix).eigenvectors
    generator = torch.Generator().manual_seed(1)
    previous = eigenvectors[:, -1] + 1e-7 * torch.randn(
        200, generator=generator, dtype=torch.float64
    )
    update = torch.randn(200, generator=generator, dtype=torch.float64)
    gradient = torch.randn(200, generator=generator, dtype=torch.float64)
    block = torch.stack([previous, update, gradient], dim=1)
    result = lc.lanczos(lc.DenseOperator(matrix), k=1, tol=1e-3, init=block)
    assert result.converged and result.num_matvecs == 3
    assert abs(float(result.eigenvalues[0]) - 10.0) <= float(result.error_bounds[0])
    np.testing.assert_allclose(
        result.init_rayleigh.numpy(),
        [rayleigh(matrix, block[:, j]) for j in range(3)],
        rtol=0,
        atol=1e-11,
    )


def test_dependent_and_zero_columns_are_read_within_the_stated_error():
    matrix = matrix_with_spectrum(spectrum(), seed=5)
    generator = torch.Generator().manual_seed(2)
    first = torch.randn(200, generator=generator, dtype=torch.float64)
    nearly = first + 1e-5 * torch.randn(200, generator=generator, dtype=torch.float64)
    block = torch.stack([first, nearly, torch.zeros(200, dtype=torch.float64)], dim=1)
    result = lc.lanczos(lc.DenseOperator(matrix), k=1, init=block)
    values = result.init_rayleigh.numpy()
    assert abs(values[0] - rayleigh(matrix, first)) <= 1e-11
    assert abs(values[1] - rayleigh(matrix, nearly)) <= 2e-3 * 10  # dropped: its projection
    assert np.isnan(values[2])
    assert lc.lanczos(lc.DenseOperator(matrix), k=1).init_rayleigh is None


def test_the_quotients_read_later_are_those_of_the_block_as_it_was_given():
    # They are computed when first read: changing the block afterwards must not move them.
    matrix = matrix_with_spectrum(spectrum(), seed=6)
    generator = torch.Generator().manual_seed(3)
    block = torch.randn(200, 2, generator=generator, dtype=torch.float64)
    expected = [rayleigh(matrix, block[:, j]) for j in range(2)]
    result = lc.lanczos(lc.DenseOperator(matrix), k=1, init=block)
    block.mul_(-3.0).add_(1.0)
    np.testing.assert_allclose(result.init_rayleigh.numpy(), expected, rtol=0, atol=1e-11)
    assert result.init_rayleigh is result.init_rayleigh  # computed once
