"""What the automatic product check costs, and when it runs again: one extra product column
and two gradients on the operator's first block, nothing on later operators that share the
model, loss, method, parameters and dtype (every RECHECK_EVERY-th excepted), and a fresh check
for anything else. Truth: dense float64 Hessians (tests/truth.py)."""

import pytest
import torch

import lightning_curvature as lc
from lightning_curvature.operators import checks
from lightning_curvature.operators.checks import RECHECK_EVERY
from tests.test_hvp_checks import CustomInSideBranch, custom_in_loss, mlp_batches
from tests.truth import cross_entropy_loss, dense_hessian, tanh_mlp


class CountingLoss:
    """cross_entropy_loss, counting forward passes (each gradient is one)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        return cross_entropy_loss(model, batch)


def test_the_first_check_rides_on_the_first_block_and_is_exact():
    model = tanh_mlp().double()
    batches = mlp_batches()
    exact = dense_hessian(model, cross_entropy_loss, batches)
    loss = CountingLoss()
    op = lc.HessianOperator(model, loss, batches)
    block = torch.randn(op.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    product = op.matmat(block)
    torch.testing.assert_close(product, exact @ block, rtol=1e-10, atol=1e-12)
    assert product.is_contiguous()  # all_reduce (AllReduceOperator) sends raw memory
    assert op.last_check.passed
    assert (op.last_check.num_matvecs, op.last_check.num_gradients) == (1, 2)
    assert op.num_matvecs == 3 + 1
    # The graph (one forward per batch) and two gradients per batch for the differences.
    assert loss.calls == len(batches) * (1 + 2)


def test_a_passed_check_is_not_paid_again_on_the_same_model_until_its_turn():
    model = tanh_mlp()
    loss = CountingLoss()
    checked = 0
    for index in range(RECHECK_EVERY + 1):
        # A fresh closure around the same loss, as the monitor builds one per measurement.
        op = lc.HessianOperator(model, lambda m, b: loss(m, b), mlp_batches())
        before = loss.calls
        op.matvec(torch.ones(op.dim))
        assert op.last_check.passed
        paid = op.num_matvecs - 1
        checked += paid
        # Only the graph's forward passes when the check is skipped.
        assert loss.calls - before == len(op.batches) * (1 + 2 * paid)
        assert paid == (1 if index in (0, RECHECK_EVERY) else 0)
    assert checked == 2


@pytest.mark.parametrize(
    "change", ["model", "loss", "method", "params", "dtype"], ids=lambda c: f"new_{c}"
)
def test_anything_new_is_checked_again(change):
    model = tanh_mlp()
    first = lc.HessianOperator(model, cross_entropy_loss, mlp_batches())
    first.matvec(torch.ones(first.dim))
    kwargs = {}
    if change == "model":
        model = tanh_mlp()
    elif change == "method":
        kwargs["hvp_method"] = "recompute"
    elif change == "params":
        kwargs["params"] = list(model.parameters())[:2]
    elif change == "dtype":
        kwargs["dtype"] = torch.float64
    loss = (lambda m, b: 2 * cross_entropy_loss(m, b)) if change == "loss" else cross_entropy_loss
    op = lc.HessianOperator(model, loss, mlp_batches(), **kwargs)
    op.matvec(torch.ones(op.dim, dtype=op.dtype))
    assert op.num_matvecs == 2 and op.last_check.passed


@pytest.mark.parametrize("make_model", [custom_in_loss, CustomInSideBranch], ids=["loss", "side"])
def test_a_failure_is_never_remembered(make_model):
    model = make_model()
    for _ in range(2):
        op = lc.HessianOperator(model, cross_entropy_loss, mlp_batches(), dtype=torch.float64)
        with pytest.warns(UserWarning, match="finite differences"):
            op.matvec(torch.ones(op.dim, dtype=torch.float64))
        assert not op.last_check.passed and op.method_used == "finite_difference"
        assert "OnceDifferentiableTanh" in op.fallback_reason
        assert (op.last_check.num_matvecs, op.last_check.num_gradients) == (1, 2)


def test_the_check_probes_a_random_direction_when_the_first_column_is_zero():
    model = custom_in_loss()
    op = lc.HessianOperator(model, cross_entropy_loss, mlp_batches(), hvp_method="reuse_graph")
    with pytest.raises(lc.UnreliableProductError, match="once_differentiable"):
        op.matvec(torch.zeros(op.dim))
    assert op.last_check.num_matvecs == 2


def test_closures_count_as_the_same_loss_only_over_the_same_objects():
    def around(function):
        return lambda m, b: function(m, b)

    key = checks._callable_identity
    assert key(around(cross_entropy_loss)) == key(around(cross_entropy_loss))
    assert key(around(cross_entropy_loss)) != key(around(CountingLoss()))
    first, second = CountingLoss(), CountingLoss()
    assert key(first) != key(second)
    assert key(first.__call__) == key(first.__call__) != key(second.__call__)
