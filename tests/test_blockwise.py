"""Per-layer curvature: parameter blocks, the block-diagonal operator, per-block traces from
the whole trace's products, and the batched block Lanczos, against dense eigvalsh."""

import ast
import doctest
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_curvature as lc
from lightning_curvature.estimators import blockwise as blockwise_module
from lightning_curvature.estimators.blockwise import (
    block_quadratic_forms,
    blockwise_lambda_max,
    blockwise_trace,
)
from lightning_curvature.operators import DenseOperator
from lightning_curvature.operators import blocks as blocks_module
from lightning_curvature.operators.blocks import BlockDiagonalOperator, parameter_blocks
from lightning_curvature.operators.ggn import GGNOperator
from tests.truth import (
    classification_batches,
    cross_entropy_loss,
    dense_hessian,
    matrix_with_spectrum,
    small_cnn,
    tanh_mlp,
)


class CountingOperator(DenseOperator):
    """A dense matrix that records how many matmat calls (and columns) reach it."""

    def __init__(self, matrix):
        super().__init__(matrix)
        self.calls = 0

    def _matmat(self, block):
        self.calls += 1
        return super()._matmat(block)


def dense_block(matrix, piece):
    return matrix[piece, piece]


@pytest.fixture(scope="module")
def mlp_hessian():
    model = tanh_mlp().eval()
    batches = classification_batches(2, 32, (10,), 4)
    return model, batches, dense_hessian(model, cross_entropy_loss, batches)


def test_per_layer_blocks_group_weight_and_bias_by_module_path():
    model = small_cnn()
    names, params = zip(*model.named_parameters(), strict=True)
    blocks = parameter_blocks(names, params)
    assert [name for name, _ in blocks] == ["0", "1", "4", "5", "9"]
    sizes = [piece.stop - piece.start for _, piece in blocks]
    assert sizes == [4 * 9 + 4, 8, 6 * 4 * 9 + 6, 12, 24 * 3 + 3]
    assert blocks[0][1].start == 0 and blocks[-1][1].stop == sum(p.numel() for p in params)
    bare = parameter_blocks(["weight", "bias"], [torch.zeros(3, 2), torch.zeros(3)])
    assert bare == [("weight", slice(0, 6)), ("bias", slice(6, 9))]


def test_regex_blocks_take_first_match_and_leave_unmatched_parameters_out():
    model = small_cnn()
    names, params = zip(*model.named_parameters(), strict=True)
    blocks = parameter_blocks(names, params, per_layer=[r"^[01]\.", r"^9\."])
    total = sum(p.numel() for p in params)
    assert blocks == [(r"^[01]\.", slice(0, 48)), (r"^9\.", slice(total - 75, total))]


def test_parameter_blocks_reject_what_a_slice_cannot_hold():
    model = small_cnn()
    names, params = zip(*model.named_parameters(), strict=True)
    with pytest.raises(ValueError, match="not contiguous"):
        parameter_blocks(names, params, per_layer=["weight"])
    with pytest.raises(ValueError, match="matches no parameter"):
        parameter_blocks(names, params, per_layer=["^decoder"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        parameter_blocks(names, params, per_layer=["("])
    with pytest.raises(ValueError, match="per_layer must be True or a list"):
        parameter_blocks(names, params, per_layer="0")
    with pytest.raises(ValueError, match="per_layer must be True or a list"):
        parameter_blocks(names, params, per_layer=False)
    with pytest.raises(ValueError, match="same length"):
        parameter_blocks(names[:2], params)


def test_block_diagonal_operator_is_the_dense_block_diagonal_in_one_matmat(mlp_hessian):
    model, _, hessian = mlp_hessian
    blocks = parameter_blocks(*zip(*model.named_parameters(), strict=True))
    inner = CountingOperator(hessian)
    op = BlockDiagonalOperator(inner, blocks)
    expected = torch.zeros_like(hessian)
    for _, piece in blocks:
        expected[piece, piece] = hessian[piece, piece]
    block = torch.randn(
        hessian.shape[0], 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    torch.testing.assert_close(op.matmat(block), expected @ block)
    assert inner.calls == 1 and inner.num_matvecs == len(blocks) * 2
    assert op.num_matvecs == 2 and op.names == ["0", "2", "4"]


def test_blockwise_trace_reuses_the_whole_traces_probes_and_sums_to_it(mlp_hessian):
    model, batches, hessian = mlp_hessian
    op = lc.HessianOperator(model, cross_entropy_loss, batches, verify=False)
    blocks = parameter_blocks(op.param_names, op.params)
    result = blockwise_trace(op, blocks, num_probes=30, seed=3)
    assert op.num_matvecs == 30  # 0 extra products for the blocks
    whole = lc.hutchinson_trace(op, num_probes=30, seed=3)
    assert result.whole.estimate == whole.estimate and result.whole.stderr == whole.stderr
    total = sum(r.estimate for r in result.blocks.values())
    assert abs(total - result.whole.estimate) <= 1e-6 * abs(result.whole.estimate)
    for name, piece in blocks:
        exact = float(torch.trace(dense_block(hessian, piece)))
        assert abs(result.blocks[name].estimate - exact) <= 3 * result.blocks[name].stderr, name


def test_block_quadratic_forms_split_each_probe_term_by_block():
    matrix = matrix_with_spectrum(torch.linspace(1, 6, 6))
    blocks = [("a", slice(0, 2)), ("b", slice(2, 6))]
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    forms = block_quadratic_forms(z, matrix @ z, blocks)
    torch.testing.assert_close(
        forms[0],
        torch.einsum("ij,ik,kj->j", z[:2], matrix[:2, :2], z[:2])
        + torch.einsum("ij,ik,kj->j", z[:2], matrix[:2, 2:], z[2:]),
    )
    torch.testing.assert_close(forms.sum(0), (z * (matrix @ z)).sum(0))


def test_blockwise_lambda_max_matches_each_dense_blocks_eigvalsh(mlp_hessian):
    model, batches, hessian = mlp_hessian
    op = lc.HessianOperator(model, cross_entropy_loss, batches)
    blocks = parameter_blocks(op.param_names, op.params)
    result = blockwise_lambda_max(op, blocks)
    assert all(result.converged)
    for i, (_, piece) in enumerate(blocks):
        truth = float(torch.linalg.eigvalsh(dense_block(hessian, piece))[-1])
        assert abs(result.eigenvalues[i].item() / truth - 1) <= 1e-3
        assert result.error_bounds[i] <= 1e-4 * abs(truth) * 1.01


OPERATORS = {
    "hessian": lambda model, batches, params=None: lc.HessianOperator(
        model, cross_entropy_loss, batches, params
    ),
    "ggn": lambda model, batches, params=None: GGNOperator(
        model, batches, params, loss_from_output="cross_entropy"
    ),
}


@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_batched_block_lambda_max_equals_lanczos_on_each_layer_alone(kind):
    model = small_cnn().eval()
    batches = classification_batches(2, 8, (1, 8, 8), 3)
    op = OPERATORS[kind](model, batches)
    blocks = parameter_blocks(op.param_names, op.params)
    counting = []
    original = op._matmat
    op._matmat = lambda block: (counting.append(block.shape[1]), original(block))[1]
    result = blockwise_lambda_max(op, blocks)
    # Each layer is applied directly (no masked full product), but for the Hessian's
    # checked first step.
    assert counting == ([len(blocks)] if kind == "hessian" else []) and result.num_steps > 1
    assert op.num_matvecs == result.num_matvecs + (kind == "hessian")  # + the check's column
    named = dict(model.named_parameters())
    for i, (name, _) in enumerate(blocks):
        layer = {n: named[n] for n in op.param_names if n.rsplit(".", 1)[0] == name}
        single = lc.lanczos(OPERATORS[kind](model, batches, layer), k=1)
        assert result.converged[i] and single.converged
        scale = max(abs(r) for r in single.ritz_values.tolist())
        difference = abs(result.eigenvalues[i].item() - single.eigenvalues[0].item())
        assert difference <= 2e-4 * scale, name


def test_blockwise_lambda_max_on_known_spectra_with_tiny_and_zero_blocks():
    spectra = [
        torch.tensor([3.0]),
        torch.tensor([-1.0, 2.0]),
        torch.zeros(4),
        torch.linspace(-2, 7, 60),
    ]
    dense = torch.block_diag(*[matrix_with_spectrum(s, seed=i) for i, s in enumerate(spectra)])
    blocks, offset = [], 0
    for i, s in enumerate(spectra):
        blocks.append((f"b{i}", slice(offset, offset + s.numel())))
        offset += s.numel()
    result = blockwise_lambda_max(DenseOperator(dense), blocks, seed=np.int64(1))
    torch.testing.assert_close(
        result.eigenvalues,
        torch.tensor([3.0, 2.0, 0.0, 7.0], dtype=torch.float64),
        atol=1e-6,
        rtol=1e-4,
    )
    assert all(result.converged)
    assert result.num_iters[:3] == (1, 2, 1)  # capped by block size; the zero block breaks down
    assert result.as_dict()["b3"] == result.eigenvalues[3].item()


def test_blockwise_estimators_reject_bad_blocks_and_arguments():
    op = DenseOperator(torch.eye(5))
    with pytest.raises(ValueError, match="non-empty, disjoint"):
        blockwise_lambda_max(op, [("a", slice(0, 3)), ("b", slice(2, 5))])
    with pytest.raises(ValueError, match="ends past"):
        blockwise_trace(op, [("a", slice(0, 6))])
    with pytest.raises(ValueError, match="non-empty list"):
        blockwise_trace(op, [])
    with pytest.raises(ValueError, match=r"\(name, slice\) pairs"):
        BlockDiagonalOperator(op, [("a", [0, 1])])
    with pytest.raises(ValueError, match="tol must be"):
        blockwise_lambda_max(op, [("a", slice(0, 5))], tol=-1.0)
    with pytest.raises(ValueError, match="num_iters must be an integer"):
        blockwise_lambda_max(op, [("a", slice(0, 5))], num_iters=True)
    with pytest.raises(ValueError, match="num_probes must be an integer >= 2"):
        blockwise_trace(op, [("a", slice(0, 5))], num_probes=1)
    assert blockwise_trace(op, [("a", slice(0, 5))], num_probes=np.int32(4)).whole.num_probes == 4


def test_estimators_blockwise_imports_neither_torch_nn_nor_operators():
    tree = ast.parse(Path(blockwise_module.__file__).read_text())
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    assert not [
        m for m in imported if m and ("torch.nn" in m or "operators" in m or "lightning" == m)
    ]


@pytest.mark.parametrize("module", [blocks_module, blockwise_module])
def test_docstring_examples_run(module):
    assert doctest.testmod(module, raise_on_error=False).failed == 0
