"""Blocks of products: matmat equals column-by-column matvec equals the dense Hessian, for
HessianOperator and for GradientGraphOperator (gradients that already carry their graph)."""

import pytest
import torch
from torch import nn

import lightning_curvature as lc
from tests.truth import classification_batches, cross_entropy_loss, dense_hessian, tanh_mlp


class UnusedHead(nn.Module):
    """An MLP with a second head the loss never uses (multi-task leftovers, frozen probes)."""

    def __init__(self):
        super().__init__()
        self.body = tanh_mlp()
        torch.manual_seed(1)
        self.unused = nn.Linear(12, 8)

    def forward(self, x):
        return self.body(x)


def batches():
    return classification_batches(2, 16, (10,), 4)


@pytest.mark.parametrize("m", [4, 7, 8])
@pytest.mark.parametrize("method", ["reuse_graph", "recompute"])
def test_matmat_with_an_unused_parameter_matches_columns_and_dense(m, method):
    model = UnusedHead()
    data = batches()
    op = lc.HessianOperator(model, cross_entropy_loss, data, dtype=torch.float64, hvp_method=method)
    assert op.dim == 828
    op.batch_columns = True  # the batched path, which CPUs skip by default
    exact = dense_hessian(model, cross_entropy_loss, data)
    block = torch.randn(op.dim, m, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    product = op.matmat(block)
    assert product.shape == (828, m)
    columns = torch.stack([op.matvec(block[:, j]) for j in range(m)], dim=1)
    torch.testing.assert_close(product, columns, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(product, exact @ block, rtol=1e-10, atol=1e-12)
    assert op.batching_failure is None


def test_trace_on_a_model_with_an_unused_parameter():
    model = UnusedHead()
    data = batches()
    exact = float(torch.trace(dense_hessian(model, cross_entropy_loss, data)))
    estimates = []
    for batched in (True, False):
        op = lc.HessianOperator(model, cross_entropy_loss, data, dtype=torch.float64)
        op.batch_columns = batched
        result = lc.hutchinson_trace(op, num_probes=64)  # blocks of 8 probes
        assert abs(result.estimate - exact) < 4 * result.stderr + 1e-9
        estimates.append(result.estimate)
    assert estimates[0] == pytest.approx(estimates[1], rel=1e-10)


def test_blocks_are_batched_on_accelerators_and_looped_on_cpus():
    op = lc.HessianOperator(tanh_mlp(), cross_entropy_loss, batches())
    assert op.batch_columns is False
    assert lc.operators.products.batch_columns_by_default(torch.device("cuda", 0))


def gradients_with_graph(model, data):
    """What AdaHessian holds after ``loss.backward(create_graph=True)``."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = sum(cross_entropy_loss(model, b) for b in data) / len(data)
    loss.backward(create_graph=True)
    return params, [p.grad for p in params]


def test_gradient_graph_operator_matches_the_dense_hessian():
    model = UnusedHead().double()
    data = [(x.double(), y) for x, y in batches()]
    params, grads = gradients_with_graph(model, data)
    op = lc.GradientGraphOperator(params, grads)
    op.batch_columns = True
    assert op.dim == 828 and op.dtype == torch.float64
    exact = dense_hessian(model, cross_entropy_loss, data)
    block = torch.randn(op.dim, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.matmat(block), exact @ block, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matvec(block[:, 0]), exact @ block[:, 0], rtol=1e-10, atol=1e-12)
    assert op.num_matvecs == 9
    # The optimizer's graph is kept: a second block works as well.
    torch.testing.assert_close(op.matmat(block[:, :3]), exact @ block[:, :3], rtol=1e-10, atol=0)
    with op:
        pass
    with pytest.raises(RuntimeError, match="released"):
        op.matvec(block[:, 0])
    for p in params:
        p.grad = None  # break the reference cycle p.grad -> graph -> p


class NoBatchingRule(torch.autograd.Function):
    """x**2 with a backward that cannot run under vmap (it reads a value to the host)."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad.sum().item()  # data-dependent control flow: vmap cannot batch this
        return 2 * x * grad


def test_a_block_falls_back_to_columns_per_call_and_says_why():
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    loss = (NoBatchingRule.apply(w) ** 2).sum()  # w**4: H = diag(12 w**2)
    (grad,) = torch.autograd.grad(loss, [w], create_graph=True)
    op = lc.GradientGraphOperator([w], [grad])
    op.batch_columns = True
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(eye), torch.diag(12 * w.detach() ** 2))
    assert "batched backward failed" in op.batching_failure
    op.matvec(eye[:, 0])  # one column needs no batching: the reason is cleared
    assert op.batching_failure is None


@pytest.mark.parametrize(
    ("params", "grads", "match"),
    [
        ([], [], "params"),
        ([torch.ones(2, requires_grad=True)], [], "grads"),
        ([torch.ones(2)], [torch.ones(2)], r"params\[0\]"),
        ([torch.ones(2, requires_grad=True)], [torch.ones(3)], r"grads\[0\]"),
        ([torch.ones(2, requires_grad=True)], [torch.ones(2)], "create_graph"),
    ],
)
def test_gradient_graph_operator_rejects_bad_arguments(params, grads, match):
    with pytest.raises(ValueError, match=match):
        lc.GradientGraphOperator(params, grads)
