"""Per-layer products applied directly: each diagonal block ``H_ll x_l`` differentiated
towards its own layer on the kept graph, against the dense float64 Hessian's blocks, and the
cases where the operator must leave it to masked full products."""

import pytest
import torch
from torch import nn

import lightning_curvature as lc
import lightning_curvature.operators.hessian as hessian_module
from lightning_curvature.estimators.blockwise import blockwise_lambda_max
from lightning_curvature.linear_operator import block_products
from lightning_curvature.operators.blocks import parameter_blocks
from lightning_curvature.operators.ggn import GGNOperator
from lightning_curvature.operators.wrappers import PreconditionedOperator
from tests.truth import (
    classification_batches,
    cross_entropy_loss,
    dense_hessian,
    small_cnn,
    tanh_mlp,
)


class WithUnusedLayer(nn.Module):
    """A tanh MLP with a layer the loss never reaches (its block of H is zero)."""

    def __init__(self):
        super().__init__()
        self.body = tanh_mlp()
        self.unused = nn.Linear(3, 2)

    def forward(self, x):
        return self.body(x)


@pytest.fixture(scope="module")
def problem():
    model = WithUnusedLayer().double().eval()
    batches = classification_batches(2, 16, (10,), 4)
    batches = [(x.double(), y) for x, y in batches]
    return model, batches, dense_hessian(model, cross_entropy_loss, batches)


def packed_vectors(dim, m=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(dim, m, generator=generator, dtype=torch.float64)


def dense_blocks(matrix, blocks, active, packed):
    expected = torch.zeros_like(packed)
    for index in active:
        piece = blocks[index][1]
        expected[piece] = matrix[piece, piece] @ packed[piece]
    return expected


@pytest.mark.parametrize("method", ["reuse_graph", "recompute"])
def test_direct_blocks_are_the_dense_hessians_diagonal_blocks(problem, method):
    model, batches, hessian = problem
    op = lc.HessianOperator(model, cross_entropy_loss, batches, hvp_method=method)
    op.matvec(torch.ones(op.dim, dtype=torch.float64))  # the checked first product
    blocks = parameter_blocks(op.param_names, op.params)
    assert [name for name, _ in blocks] == ["body.0", "body.2", "body.4", "unused"]
    packed = packed_vectors(op.dim)
    for active in ([0, 1, 2, 3], [2, 3], [1]):
        before = op.num_matvecs
        direct = op.diagonal_block_products(blocks, packed, active)
        assert direct is not None
        assert op.num_matvecs - before == 2 * len(active)
        expected = dense_blocks(hessian, blocks, active, packed)
        torch.testing.assert_close(direct, expected, rtol=1e-10, atol=1e-12)
    assert not op.diagonal_block_products(blocks, packed, [3]).any()  # the unused layer


def test_direct_blocks_wait_for_the_check_and_need_a_graph_and_whole_parameters(problem):
    model, batches, hessian = problem
    op = lc.HessianOperator(model, cross_entropy_loss, batches)
    blocks = parameter_blocks(op.param_names, op.params)
    packed = packed_vectors(op.dim)
    assert op.diagonal_block_products(blocks, packed, [0]) is None  # not checked yet
    # block_products then masks full products, and the first of them is checked.
    torch.testing.assert_close(
        block_products(op, blocks, packed, [0, 1]),
        dense_blocks(hessian, blocks, [0, 1], packed),
        rtol=1e-10,
        atol=1e-12,
    )
    assert op.last_check is not None and op.last_check.passed
    assert op.diagonal_block_products(blocks, packed, [0]) is not None
    cut = [("half a weight", slice(0, 7))]
    assert op.diagonal_block_products(cut, packed, [0]) is None
    for method in ("finite_difference", "forward_over_reverse"):
        other = lc.HessianOperator(model, cross_entropy_loss, batches, hvp_method=method)
        other.matvec(torch.ones(op.dim, dtype=torch.float64))
        assert other.diagonal_block_products(blocks, packed, [0]) is None


def test_a_failing_direct_product_leaves_it_to_the_masked_ones(problem, monkeypatch):
    model, batches, hessian = problem
    op = lc.HessianOperator(model, cross_entropy_loss, batches)
    op.matvec(torch.ones(op.dim, dtype=torch.float64))
    blocks = parameter_blocks(op.param_names, op.params)

    def fails(*args, **kwargs):
        raise RuntimeError("no double backward for this op")

    monkeypatch.setattr(hessian_module, "diagonal_products_from_graph", fails)
    packed = packed_vectors(op.dim)
    before = op.num_matvecs
    torch.testing.assert_close(
        block_products(op, blocks, packed, [0, 2]),
        dense_blocks(hessian, blocks, [0, 2], packed),
        rtol=1e-10,
        atol=1e-12,
    )
    assert op.num_matvecs - before == 4  # the masked columns alone


def test_preconditioned_blocks_are_those_of_the_dense_symmetric_form(problem):
    model, batches, hessian = problem
    op = lc.HessianOperator(model, cross_entropy_loss, batches)
    op.matvec(torch.ones(op.dim, dtype=torch.float64))
    diagonal = torch.rand(op.dim, generator=torch.Generator().manual_seed(1)).double() + 0.1
    scaled = PreconditionedOperator(op, diagonal)
    blocks = parameter_blocks(op.param_names, op.params)
    packed = packed_vectors(op.dim)
    scale = diagonal.rsqrt()
    symmetric = scale[:, None] * hessian * scale[None, :]
    calls = []
    original = op._matmat
    op._matmat = lambda block: (calls.append(block.shape[1]), original(block))[1]
    torch.testing.assert_close(
        block_products(scaled, blocks, packed, [0, 1, 2]),
        dense_blocks(symmetric, blocks, [0, 1, 2], packed),
        rtol=1e-10,
        atol=1e-12,
    )
    assert calls == [] and scaled.num_matvecs == 6  # no masked full product


def test_per_layer_lambda_max_on_a_cnn_applies_each_layer_directly():
    """The float32 CNN with BatchNorm: after the checked first step, no full product."""
    model = small_cnn().eval()
    batches = classification_batches(2, 8, (1, 8, 8), 3)
    op = lc.HessianOperator(model, cross_entropy_loss, batches)
    blocks = parameter_blocks(op.param_names, op.params)
    masked = []
    original = op._matmat
    op._matmat = lambda block: (masked.append(block.shape[1]), original(block))[1]
    result = blockwise_lambda_max(op, blocks)
    assert masked == [len(blocks)]  # the first step only, which carries the check
    hessian = dense_hessian(model, cross_entropy_loss, batches)
    for i, (name, piece) in enumerate(blocks):
        truth = float(torch.linalg.eigvalsh(hessian[piece, piece])[-1])
        assert result.converged[i], name
        # float32 products: the bound carries their rounding floor; tol is 1e-4.
        assert abs(result.eigenvalues[i].item() - truth) <= 2 * result.error_bounds[i], name
        assert abs(result.eigenvalues[i].item() / truth - 1) <= 1e-3, name


def test_ggn_blocks_of_a_linear_model_are_the_least_squares_hessians():
    """For a linear model under MSE, G = H exactly (2/(nK)·XᵀX per output, and the bias)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2)).double()
    with torch.no_grad():  # one affine map written as two layers: G ≠ H there
        model[0].weight.normal_()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randn(40, 2, dtype=torch.float64)
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    linear = nn.Linear(5, 2).double()
    op = GGNOperator(linear, batches, loss_from_output="mse")
    blocks = parameter_blocks(op.param_names, op.params)
    packed = packed_vectors(op.dim)
    ones = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], dim=1)
    gram = 2 / (40 * 2) * ones.T @ ones  # per output; W rows are outputs
    dense = torch.zeros(op.dim, op.dim, dtype=torch.float64)
    for k in range(2):
        rows = [k * 5 + i for i in range(5)] + [10 + k]
        dense[torch.tensor(rows)[:, None], torch.tensor(rows)[None]] = gram
    direct = op.diagonal_block_products(blocks, packed, [0, 1])
    torch.testing.assert_close(direct, dense_blocks(dense, blocks, [0, 1], packed))
    # Two layers: G = Jᵀ(2/(nK))J with J the outputs' Jacobian in the flat parameters,
    # dense by autograd, independently of the operator; its diagonal blocks.
    deep = GGNOperator(model, batches, loss_from_output="mse")
    layers = parameter_blocks(deep.param_names, deep.params)
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(flat):
        values = dict(zip(names, torch.split(flat, [s.numel() for s in shapes]), strict=True))
        values = {n: v.view(s) for (n, v), s in zip(values.items(), shapes, strict=True)}
        return torch.func.functional_call(model, values, (x,)).reshape(-1)

    jacobian = torch.autograd.functional.jacobian(outputs, theta)
    ggn = 2 / (40 * 2) * jacobian.T @ jacobian
    packed = packed_vectors(deep.dim)
    direct = deep.diagonal_block_products(layers, packed, [0, 1])
    torch.testing.assert_close(direct, dense_blocks(ggn, layers, [0, 1], packed))
