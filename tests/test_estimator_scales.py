"""Every estimator is scale-free: the same answers at 1e-8, 1 and 1e8, in float32 and float64.

An estimator may not hold an absolute threshold: a curvature of 1e-5 in float32 is as
well-defined as one of 1, and a floor such as ``clamp_min(1e3·eps)`` on a vector norm
silently rescales everything below it. Each estimator runs here on a dense symmetric
matrix of known spectrum multiplied by ``scale``, and is checked against dense float64
truth (``torch.linalg.eigvalsh`` and ``torch.linalg.solve`` of the float64 matrix).

Tolerances. A product in ``dtype`` is exact up to ``ROUNDING = 10·√n·eps·‖A‖``: rounding
errors of an ``n``-term sum grow like ``√n·eps`` (random-walk model) and the margin of 10
covers its spread and the representation of the float64 matrix in ``dtype``. An
eigenvalue of a symmetric matrix moves by at most the perturbation's norm (Weyl), so
ROUNDING bounds every eigenvalue error that rounding alone can cause; the rest of each
tolerance is the estimator's own stopping rule (its ``tol``), stated where it is used.

Error bounds. Below rounding, a residual norm certifies nothing: a float32 run whose
residual reads 1e-20 still carries the products' rounding. The reported bound must
exceed the true error ``|λ32 − λ64|`` against the float64 truth.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_curvature as lc
from lightning_curvature.estimators.blockwise import blockwise_lambda_max
from tests.truth import cross_entropy_loss, dense_hessian, matrix_with_spectrum

SCALES = (1e-8, 1.0, 1e8)
DTYPES = (torch.float32, torch.float64)
N = 60
# Largest 1.0, then 0.85 and 0.7 (relative gaps of 15%), a bulk, and a negative end with
# its own gap, so that λmax, the top 3 and λmin are all well conditioned.
SPECTRUM = torch.cat(
    [
        torch.tensor([-0.6, -0.45], dtype=torch.float64),
        torch.linspace(-0.3, 0.5, N - 5, dtype=torch.float64),
        torch.tensor([0.7, 0.85, 1.0], dtype=torch.float64),
    ]
)
TOL = 1e-4  # the estimators' default relative tolerance


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def rounding(dtype: torch.dtype, norm: float, n: int = N) -> float:
    """What the products' rounding can do to an eigenvalue (see the module docstring)."""
    return 10 * math.sqrt(n) * eps(dtype) * norm


def case(scale: float, dtype: torch.dtype, spectrum=SPECTRUM, seed: int = 0):
    """The operator in ``dtype`` and its float64 matrix (the truth's)."""
    matrix = matrix_with_spectrum(spectrum * scale, seed=seed)
    return lc.DenseOperator(matrix.to(dtype)), matrix


parametrize_all = pytest.mark.parametrize(
    ("scale", "dtype"),
    [(s, d) for s in SCALES for d in DTYPES],
    ids=[f"{s:g}-{str(d)[6:]}" for s in SCALES for d in DTYPES],
)


@parametrize_all
def test_lanczos_top_k_and_lambda_min_at_every_scale(scale, dtype):
    op, matrix = case(scale, dtype)
    truth = torch.linalg.eigvalsh(matrix)
    norm = float(truth.abs().max())
    top = lc.lanczos(op, k=3)
    bottom = lc.lanczos(op, k=1, which="smallest")
    for result, expected in ((top, truth.flip(0)[:3]), (bottom, truth[:1])):
        assert result.converged
        errors = (result.eigenvalues - expected).abs()
        # The bound is honest, and converged means it is within tol of the spectral scale.
        assert bool((errors <= result.error_bounds).all()), (errors, result.error_bounds)
        assert float(result.error_bounds.max()) <= TOL * norm * (1 + 1e-6)
    # Scale-free: the number of steps does not depend on the units of the operator.
    reference = lc.lanczos(case(1.0, dtype)[0], k=3)
    assert top.num_iters == reference.num_iters


@parametrize_all
def test_power_iteration_at_every_scale(scale, dtype):
    op, matrix = case(scale, dtype)
    truth = float(torch.linalg.eigvalsh(matrix)[-1])  # 1.0·scale is the largest magnitude
    result = lc.power_iteration(op, num_iters=400, tol=1e-7)
    assert result.converged
    # For a symmetric matrix the Rayleigh quotient lies within its residual of an
    # eigenvalue; the residual is below half the gap (0.15·scale), so that one is λmax.
    assert result.residual <= 0.075 * abs(truth)
    assert abs(result.eigenvalue - truth) <= result.residual + rounding(dtype, abs(truth))


@parametrize_all
def test_hutchinson_trace_and_diagonal_at_every_scale(scale, dtype):
    op, matrix = case(scale, dtype)
    trace = lc.hutchinson_trace(op, num_probes=40, seed=1)
    exact = float(torch.trace(matrix))
    # The estimate scales with the operator: its stderr is as many units of ``scale``.
    assert trace.stderr > 0
    assert abs(trace.estimate - exact) <= 4 * trace.stderr + rounding(dtype, scale)
    diagonal = lc.hutchinson_diagonal(op, num_probes=40, seed=1)
    error = torch.linalg.vector_norm(diagonal.estimate.double() - torch.diagonal(matrix))
    # E‖estimate − diag‖² is the sum of the variances: within 2× its estimate.
    spread = torch.linalg.vector_norm(diagonal.stderr.double())
    assert float(spread) > 0
    assert float(error) <= 2 * float(spread) + rounding(dtype, scale)


@parametrize_all
def test_spectral_density_nodes_and_weights_at_every_scale(scale, dtype):
    op, matrix = case(scale, dtype)
    truth = torch.linalg.eigvalsh(matrix)
    norm = float(truth.abs().max())
    # N steps from a start vector with a component on every eigenvector: each run's
    # quadrature nodes are the whole spectrum, its weights sum to 1.
    density = lc.spectral_density(op, num_runs=3, num_iters=N, seed=2)
    for nodes, weights in zip(density.nodes, density.weights, strict=True):
        assert float(weights.sum()) == pytest.approx(1.0, abs=N * eps(dtype))
        assert bool((weights > 0).all())
        error = (nodes.sort().values - truth).abs().max()
        assert float(error) <= rounding(dtype, norm)
    # The smoothing width is 1% of the spectral range, whatever the units.
    assert density.sigma == pytest.approx(0.01 * float(truth[-1] - truth[0]), rel=1e-3)
    assert float(density.grid[0]) <= float(truth[0]) and float(density.grid[-1]) >= truth[-1]


@pytest.mark.parametrize("scale", SCALES)
def test_spectral_density_of_a_multiple_of_the_identity_has_a_width_in_its_units(scale):
    # A spectrum with no spread still needs a width: it must be relative to the value,
    # not an absolute number that is huge at 1e-8 and nothing at 1e8.
    op = lc.DenseOperator(scale * torch.eye(8, dtype=torch.float64))
    density = lc.spectral_density(op, num_runs=2, num_iters=4)
    assert density.lambda_max == pytest.approx(scale, rel=1e-12)
    assert 0 < density.sigma <= 1e-6 * scale
    assert float((density.density * (density.grid[1] - density.grid[0])).sum()) == pytest.approx(
        1.0, rel=1e-2
    )


BLOCK_TOPS = (0.86995, 0.88266)  # the two block λmax of the reported defect


def block_case(scale: float, dtype: torch.dtype, sizes=(30, 40), seed: int = 0):
    spectra = [
        torch.cat([torch.linspace(-0.3, 0.6, size - 1, dtype=torch.float64), torch.tensor([t])])
        for size, t in zip(sizes, BLOCK_TOPS, strict=True)
    ]
    dense = torch.block_diag(
        *[matrix_with_spectrum(s * scale, seed=seed + i) for i, s in enumerate(spectra)]
    )
    blocks, start = [], 0
    for i, size in enumerate(sizes):
        blocks.append((f"layer{i}", slice(start, start + size)))
        start += size
    return lc.DenseOperator(dense.to(dtype)), blocks


@pytest.mark.parametrize("scale", (*SCALES, 1e-5, 1e-3))
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_blockwise_lambda_max_at_every_scale(scale, dtype):
    # The reported defect: float32 at 1e-5 gave 0.52e-5 and 0.58e-5, "converged".
    op, blocks = block_case(scale, dtype)
    result = blockwise_lambda_max(op, blocks)
    assert all(result.converged)
    for i, top in enumerate(BLOCK_TOPS):
        truth = top * scale
        error = abs(result.eigenvalues[i].item() - truth)
        assert error <= result.error_bounds[i].item(), (i, error, result.error_bounds[i])
        assert result.error_bounds[i].item() <= TOL * truth * (1 + 1e-6)


@parametrize_all
@pytest.mark.parametrize("method", ["cg", "minres"])
def test_solve_at_every_scale(scale, dtype, method):
    # Positive definite for CG, indefinite for MINRES; condition number κ = 10 either way.
    if method == "cg":
        spectrum = torch.linspace(0.1, 1.0, N, dtype=torch.float64)
    else:
        spectrum = torch.cat(
            [torch.linspace(-1.0, -0.1, N // 2), torch.linspace(0.1, 1.0, N - N // 2)]
        ).double()
    matrix = matrix_with_spectrum(spectrum * scale, seed=3)
    b = torch.randn(N, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = torch.linalg.solve(matrix, b)
    # A residual of 100·κ·eps is reachable in ``dtype``; float64 stops at 1e-10.
    kappa = 10.0
    tol = max(100 * kappa * eps(dtype), 1e-10)
    result = lc.solve(
        lc.DenseOperator(matrix.to(dtype)), b.to(dtype), damping=0.0, tol=tol, method=method
    )
    assert result.converged and not result.negative_curvature
    true_residual = torch.linalg.vector_norm(matrix @ result.x.double() - b) / b.norm()
    assert float(true_residual) <= tol * 1.01 + rounding(dtype, kappa)
    # The forward error is at most κ times the relative residual (plus the rounding of x).
    error = torch.linalg.vector_norm(result.x.double() - exact) / exact.norm()
    assert float(error) <= kappa * float(true_residual) + 10 * eps(dtype) * kappa


# ------------------------------------------------------------- float32 error bounds
SPECTRA32 = {
    "spread": torch.cat([torch.linspace(-1.0, 2.0, 57), torch.tensor([3.0, 3.5, 4.0])]),
    "cluster": torch.cat(
        [torch.rand(47, generator=torch.Generator().manual_seed(7)), torch.tensor([5.0, 4.9, 4.8])]
    ),
    "decaying": torch.logspace(-6, 0, 50),
}


@pytest.mark.parametrize("name", sorted(SPECTRA32))
@pytest.mark.parametrize("seed", range(4))
def test_float32_error_bounds_cover_the_error_against_float64(name, seed):
    spectrum = SPECTRA32[name].double()
    matrix = matrix_with_spectrum(spectrum, seed=seed)
    truth = torch.linalg.eigvalsh(matrix)
    op = lc.DenseOperator(matrix.float())
    dim = op.dim
    # The whole space (an exhausted Krylov space has a residual of 1e-20) and many steps
    # past convergence (tol=0): the bound that remains is the rounding floor.
    runs = [
        (lc.lanczos(op, k=3, num_iters=dim, seed=seed), truth.flip(0)[:3]),
        (lc.lanczos(op, k=2, num_iters=dim, tol=0, seed=seed, which="smallest"), truth[:2]),
        (lc.lanczos(op, k=1, seed=seed), truth.flip(0)[:1]),
    ]
    for result, expected in runs:
        errors = (result.eigenvalues - expected).abs()
        assert bool((errors <= result.error_bounds).all()), (errors, result.error_bounds)
    # Blocks small enough to be exhausted, the case that printed "error bound 0, converged".
    half = dim // 2
    blocks = [("a", slice(0, half)), ("b", slice(half, dim))]
    block_matrix = torch.block_diag(matrix[:half, :half], matrix[half:, half:])
    per_block = blockwise_lambda_max(lc.DenseOperator(block_matrix.float()), blocks, seed=seed)
    for i, (_, piece) in enumerate(blocks):
        block_truth = float(torch.linalg.eigvalsh(block_matrix[piece, piece])[-1])
        error = abs(per_block.eigenvalues[i].item() - block_truth)
        assert error <= per_block.error_bounds[i].item(), (i, error, per_block.error_bounds)


def test_float32_bounds_stay_within_the_default_tol_so_runs_still_converge():
    # The floor must not turn every float32 run into "not converged".
    for dim in (50, 400):
        spectrum = torch.cat([torch.linspace(0.0, 1.0, dim - 1), torch.tensor([2.0])]).double()
        op = lc.DenseOperator(matrix_with_spectrum(spectrum).float())
        result = lc.lanczos(op, k=1)
        assert result.converged and result.error_bounds[0].item() <= TOL * 2.0
        assert result.error_bounds[0].item() > 0


def test_float32_hessian_bound_covers_rounding_of_a_nearly_separable_logistic_regression():
    # The loss is small and its Hessian's weights p(1 − p) come from cancellations in
    # float32: the float32 products are exact to 1e-6 only, while a converged residual
    # says 1e-12. Truth: the float64 Hessian of the same model and data.
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        inputs = torch.randn(64, 20, generator=generator)
        direction = torch.nn.functional.normalize(torch.randn(20, generator=generator), dim=0)
        targets = (inputs @ direction > 0).long()
        model = nn.Linear(20, 2)
        with torch.no_grad():
            model.weight.copy_(8.0 * torch.stack([-direction, direction]))
            model.bias.zero_()
        batches = [(inputs, targets)]
        truth = torch.linalg.eigvalsh(dense_hessian(model, cross_entropy_loss, batches))
        op = lc.HessianOperator(model, cross_entropy_loss, batches)
        result = lc.lanczos(op, k=2, num_iters=op.dim, tol=0, seed=seed)
        errors = (result.eigenvalues - truth.flip(0)[:2]).abs()
        assert bool((errors <= result.error_bounds).all()), (seed, errors, result.error_bounds)
        assert float(result.error_bounds.max()) <= TOL * float(truth[-1])


class InexactOperator(lc.DenseOperator):
    """Products ``(A + E)v`` with a fixed non-symmetric ``E``: an HVP less accurate than
    ``tol``, as a float32 network's near a minimum, or a finite-difference product."""

    def __init__(self, matrix, error):
        super().__init__(matrix)
        self.error = error

    def _matmat(self, block):
        return (self.matrix + self.error) @ block


@pytest.mark.parametrize("seed", range(3))
def test_products_less_accurate_than_tol_stop_early_with_a_bound_that_says_so(seed):
    spectrum = torch.cat([torch.linspace(0.0, 1.0, N - 1), torch.tensor([2.0])]).double()
    matrix = matrix_with_spectrum(spectrum, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    error = torch.randn(N, N, generator=generator, dtype=torch.float64)
    error *= 1e-3 * 2.0 / torch.linalg.matrix_norm(error, ord=2)  # ‖E‖ = 1e-3·‖A‖
    result = lc.lanczos(InexactOperator(matrix, error), k=1, seed=seed)
    # No step can beat the products: the run stops well before its 40 steps, says it is
    # as resolved as they allow, and its bound covers the error that E causes (up to ‖E‖).
    assert result.converged and result.num_iters < 20
    assert abs(result.eigenvalues[0].item() - 2.0) <= result.error_bounds[0].item()
    assert result.error_bounds[0].item() > TOL * 2.0


class _Diagonal:
    """diag(values) as an operator: large dims without a dense matrix."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values, self.dim = values, values.numel()
        self.device, self.dtype = values.device, values.dtype

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.values * v


def test_deflating_by_float32_ritz_vectors_of_a_large_model_is_accepted():
    # Orthonormal columns computed in float32 over 137k entries are orthonormal only to
    # about eps·√dim times a small factor: a transformer's Ritz vectors came at 2.9e-4 and
    # were refused. A block that far off is accepted; one visibly not orthonormal is not.
    dim = 137_216
    q, _ = torch.linalg.qr(torch.randn(dim, 5, dtype=torch.float64))
    op = _Diagonal(torch.linspace(0.0, 1.0, dim, dtype=torch.float32))
    near = q.clone()
    near[:, 1] += 3e-4 * q[:, 0]
    lc.hutchinson_trace(op, num_probes=2, deflate=near.float())
    far = q.clone()
    far[:, 1] += 1e-1 * q[:, 0]
    with pytest.raises(ValueError, match="orthonormal columns"):
        lc.hutchinson_trace(op, num_probes=2, deflate=far.float())
