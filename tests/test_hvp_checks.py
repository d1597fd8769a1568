"""Trustworthy products: the symmetry and finite-difference check, the automatic fallback to
finite differences, and models that autograd cannot differentiate twice (custom Functions
with @once_differentiable, ops without double backward, reentrant checkpointing, compiled
modules). Truth: dense float64 Hessians of an equivalent plain model, or central differences
of float64 gradients (tests/truth.py)."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

import lightning_curvature as lc
from lightning_curvature.operators.checks import SYMMETRY_TOLERANCE
from lightning_curvature.operators.products import finite_difference_step
from tests.test_hessian_operator import (
    AdapterModel,
    DropoutBatchNormNet,
    TinyAttention,
    assert_same,
    snapshot,
)
from tests.truth import (
    central_difference_rounding,
    classification_batches,
    cross_entropy_loss,
    dense_hessian,
    finite_difference_hvp,
    relu_mlp,
    small_cnn,
    tanh_mlp,
)


def relative_error(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def mlp_batches():
    return classification_batches(2, 32, (10,), 4)


class OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward is marked @once_differentiable, as hand-written kernels often are:
    double backward silently drops the path through it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


class CustomTanh(nn.Module):
    """The custom Function, or plain ``torch.tanh`` for the truth (``exact=True``)."""

    exact = False

    def forward(self, x):
        return torch.tanh(x) if self.exact else OnceDifferentiableTanh.apply(x)


def custom_in_loss():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 20), CustomTanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 4)
    )


class CustomInSideBranch(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.main = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 4))
        self.side = nn.Sequential(nn.Linear(10, 4), CustomTanh())

    def forward(self, x):
        return self.main(x) + 0.1 * self.side(x)


def exact_hessian(model, batches):
    """The dense float64 Hessian of the same model with plain tanh in place of the custom op."""
    for module in model.modules():
        if isinstance(module, CustomTanh):
            module.exact = True
    try:
        return dense_hessian(model, cross_entropy_loss, batches)
    finally:
        for module in model.modules():
            if isinstance(module, CustomTanh):
                module.exact = False


HEALTHY = {
    "tanh_mlp": (tanh_mlp, mlp_batches),
    "relu_mlp": (relu_mlp, mlp_batches),
    "cnn_batchnorm_train": (
        lambda: small_cnn().train(),
        lambda: classification_batches(2, 8, (1, 8, 8), 3),
    ),
    "dropout_batchnorm_train": (
        lambda: DropoutBatchNormNet().train(),
        lambda: classification_batches(2, 8, (1, 8, 8), 3),
    ),
    "attention": (TinyAttention, lambda: classification_batches(1, 4, (5, 16), 3)),
    "adapters": (AdapterModel, mlp_batches),
}


@pytest.mark.parametrize("name", list(HEALTHY))
def test_check_passes_on_healthy_float32_models_with_margin(name):
    make_model, make_batches = HEALTHY[name]
    op = lc.HessianOperator(make_model(), cross_entropy_loss, make_batches(), verify=False)
    for seed in range(3):
        result = op.check(seed)
        assert result.passed, result
        assert result.cause is None and result.method == "reuse_graph"
        assert result.symmetry_error < SYMMETRY_TOLERANCE[torch.float32] / 100
        assert (result.num_matvecs, result.num_gradients) == (2, 3)
    assert op.num_matvecs == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make_model", [custom_in_loss, CustomInSideBranch], ids=["loss", "side"])
def test_check_catches_a_once_differentiable_function(make_model, dtype):
    model = make_model()
    op = lc.HessianOperator(
        model,
        cross_entropy_loss,
        mlp_batches(),
        dtype=dtype,
        hvp_method="reuse_graph",
        verify=False,
    )
    # The defect: the products are not the Hessian's, and nothing raises.
    exact = exact_hessian(model, mlp_batches())
    matrix = op.matmat(torch.eye(op.dim, dtype=dtype)).double()
    assert relative_error(matrix, exact) > 0.01
    result = op.check()
    assert not result.passed
    assert result.symmetry_error > 10 * SYMMETRY_TOLERANCE[dtype]
    assert "OnceDifferentiableTanh" in result.cause
    assert "once_differentiable" in result.cause and "finite_difference" in result.cause


def test_auto_falls_back_to_finite_differences_once_and_says_why():
    model = custom_in_loss()
    batches = mlp_batches()
    exact = exact_hessian(model, batches)
    op = lc.HessianOperator(model, cross_entropy_loss, batches, dtype=torch.float64)
    assert op.method_used == "reuse_graph" and op.fallback_reason is None
    with pytest.warns(UserWarning, match="finite differences") as record:
        result = lc.lanczos(op, k=2)
    assert len([w for w in record if "HessianOperator" in str(w.message)]) == 1
    assert op.hvp_method == "auto"  # the request is kept
    assert op.method_used == "finite_difference"
    assert "non-symmetric" in op.fallback_reason and "OnceDifferentiableTanh" in op.fallback_reason
    assert not op.last_check.passed
    expected = torch.linalg.eigvalsh(exact).flip(0)[:2]
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-6, atol=0)
    # The monitor builds one operator per measurement: the same text each time, so Python
    # shows the warning once.
    again = lc.HessianOperator(model, cross_entropy_loss, mlp_batches(), dtype=torch.float64)
    with pytest.warns(UserWarning) as second:
        again.check(seed=7)
        again.matvec(torch.ones(again.dim, dtype=torch.float64))
    assert str(second[0].message) == str(record[0].message)


@pytest.mark.parametrize("method", ["reuse_graph", "recompute"])
def test_an_explicit_method_that_fails_its_check_raises(method):
    op = lc.HessianOperator(custom_in_loss(), cross_entropy_loss, mlp_batches(), hvp_method=method)
    with pytest.raises(lc.UnreliableProductError, match="once_differentiable") as info:
        op.matvec(torch.ones(op.dim))
    assert isinstance(info.value, RuntimeError)
    assert op.method_used == method


@pytest.mark.parametrize(
    ("make_model", "make_batches", "smooth"),
    [
        (tanh_mlp, mlp_batches, True),
        (relu_mlp, mlp_batches, False),
        (lambda: small_cnn().eval(), lambda: classification_batches(2, 8, (1, 8, 8), 3), False),
        (AdapterModel, mlp_batches, True),
    ],
    ids=["tanh_mlp", "relu_mlp", "cnn_eval", "adapters"],
)
def test_finite_difference_products_match_the_dense_hessian(make_model, make_batches, smooth):
    model = make_model()
    batches = make_batches()
    exact = dense_hessian(model, cross_entropy_loss, batches)
    block = torch.randn(exact.shape[0], 3, dtype=torch.float64, generator=torch.Generator())
    op = lc.HessianOperator(
        model, cross_entropy_loss, batches, dtype=torch.float64, hvp_method="finite_difference"
    )
    # Each column against the rounding its step implies on this machine (the gradients'
    # rounding over ε, which varies with the BLAS), with a margin of 4. Truncation is not in
    # it: a step too large to be exact to rounding fails. Kinks included: the float64 step is
    # too small to cross them.
    products = op.matmat(block)
    assert op.num_matvecs == 3 and op.last_check is None  # nothing to verify
    assert op.method_used == "finite_difference" and op.fallback_reason is None
    for product, v in zip(products.T, block.T, strict=True):
        assert _error(product, exact @ v) <= 4 * _expected_error(model, batches, v, exact)
    assert op.check().passed
    if smooth:  # float32 on smooth models: ~1e-3 relative, all of it rounding
        fast = lc.HessianOperator(
            model, cross_entropy_loss, batches, hvp_method="finite_difference"
        )
        v = block[:, 0].float()
        product = fast.matvec(v).double()
        assert _error(product, exact @ block[:, 0]) <= 4 * _expected_error(model, batches, v, exact)


def _error(product: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(product - exact))


def _expected_error(model, batches, v, hessian) -> float:
    """The rounding error of the package's central difference along ``v`` (its step, in
    ``v``'s dtype)."""
    params = [p.detach().to(v.dtype) for p in model.parameters() if p.requires_grad]
    step = float(finite_difference_step(params, v))
    return central_difference_rounding(model, cross_entropy_loss, batches, v, step, hessian)


def test_finite_differences_leave_model_grads_buffers_modes_and_rng_untouched():
    model = DropoutBatchNormNet()
    model.train()
    model.head.eval()
    batches = classification_batches(2, 8, (1, 8, 8), 3)
    cross_entropy_loss(model, batches[0]).backward()
    model.features[0].bias.grad = None
    torch.manual_seed(99)
    before = snapshot(model)
    # One block of the parameters: the others' .grad must not collect the FD gradients.
    op = lc.HessianOperator(
        model,
        cross_entropy_loss,
        batches,
        params=model.head.parameters(),
        hvp_method="finite_difference",
    )
    lc.lanczos(op, k=2, num_iters=6)
    lc.hutchinson_trace(op, num_probes=4)
    assert_same(before, snapshot(model))


class RadialBasis(nn.Module):
    """Distances to learned centres: torch.cdist has no double backward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.centres = nn.Parameter(torch.randn(6, 10))
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        distances = torch.cdist(x, self.centres, compute_mode="donot_use_mm_for_euclid_dist")
        return self.head(torch.exp(-0.1 * distances**2))


def test_an_op_without_double_backward_falls_back_or_raises_clearly():
    model = RadialBasis()
    batches = mlp_batches()
    v = torch.randn(88, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    truth = finite_difference_hvp(model, cross_entropy_loss, batches, v)
    op = lc.HessianOperator(model, cross_entropy_loss, batches, dtype=torch.float64)
    with pytest.warns(UserWarning, match="no second derivative"):
        product = op.matvec(v)
    assert op.method_used == "finite_difference" and "_cdist_backward" in op.fallback_reason
    assert relative_error(product, truth) < 1e-6
    strict = lc.HessianOperator(model, cross_entropy_loss, batches, hvp_method="reuse_graph")
    with pytest.raises(lc.UnreliableProductError, match="finite_difference"):
        strict.matvec(v.float())


class Checkpointed(nn.Module):
    def __init__(self, use_checkpoint=True):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(10, 16)
        self.block = nn.Sequential(nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.out = nn.Linear(16, 4)
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        hidden = self.inp(x)
        if self.use_checkpoint:
            hidden = checkpoint(self.block, hidden, use_reentrant=True)
        else:
            hidden = self.block(hidden)
        return self.out(hidden)


def test_reentrant_checkpointing_falls_back_or_names_the_fix():
    model = Checkpointed()
    batches = mlp_batches()
    model.use_checkpoint = False
    exact = dense_hessian(model, cross_entropy_loss, batches)
    model.use_checkpoint = True
    block = torch.randn(exact.shape[0], 2, dtype=torch.float64, generator=torch.Generator())
    op = lc.HessianOperator(model, cross_entropy_loss, batches, dtype=torch.float64)
    with pytest.warns(UserWarning, match="use_reentrant=False"):
        assert relative_error(op.matmat(block), exact @ block) < 1e-6
    assert op.method_used == "finite_difference"
    for p in model.parameters():
        assert p.grad is None
    strict = lc.HessianOperator(model, cross_entropy_loss, batches, hvp_method="recompute")
    with pytest.raises(lc.UnreliableProductError, match="use_reentrant=False"):
        strict.matvec(block[:, 0].float())


class CompiledInside(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.net = torch.compile(tanh_mlp(), backend=backend)

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize(
    ("make_model", "backend"),
    [
        pytest.param(CompiledInside, "aot_eager", marks=pytest.mark.slow),  # compiles ~4 s
        (lambda b: torch.compile(tanh_mlp(), backend=b), "eager"),
    ],
    ids=["compiled_submodule", "compiled_model"],
)
def test_compiled_modules_are_differentiated_eagerly(make_model, backend):
    model = make_model(backend)
    batches = mlp_batches()
    cross_entropy_loss(model, batches[0]).backward()  # compiled, as after a training step
    for p in model.parameters():
        p.grad = None
    exact = dense_hessian(tanh_mlp(), cross_entropy_loss, batches)
    block = torch.randn(exact.shape[0], 2, dtype=torch.float64, generator=torch.Generator())
    op = lc.HessianOperator(model, cross_entropy_loss, batches, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: the exact path works
        assert relative_error(op.matmat(block), exact @ block) < 1e-10
    assert op.method_used == "reuse_graph" and op.last_check.passed
    compiled = [m for m in model.modules() if type(m).__name__ == "OptimizedModule"]
    assert compiled, "the compiled wrapper must be put back"


def test_a_float64_model_is_measured_in_float64_without_a_copy():
    model = tanh_mlp().double()
    batches = mlp_batches()  # float32 inputs, as a DataLoader gives them
    op = lc.HessianOperator(model, cross_entropy_loss, batches)
    assert op.dtype == torch.float64 and op.model is model
    assert all(x.dtype == torch.float64 for x, _ in op.batches)
    exact = dense_hessian(model, cross_entropy_loss, batches)
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator())
    assert relative_error(op.matvec(v), exact @ v) < 1e-12


def test_cudnn_is_switched_off_only_for_models_with_an_rnn():
    seen = []

    def recording_loss(model, batch):
        seen.append(torch.backends.cudnn.enabled)
        inputs, targets = batch
        output = model(inputs)
        output = output[0][:, -1] if isinstance(output, tuple) else output
        return nn.functional.cross_entropy(output, targets)

    enabled = torch.backends.cudnn.enabled
    op = lc.HessianOperator(tanh_mlp(), recording_loss, mlp_batches())
    op.matvec(torch.ones(op.dim))
    assert set(seen) == {enabled}
    seen.clear()
    rnn = nn.GRU(3, 4, batch_first=True)
    op = lc.HessianOperator(rnn, recording_loss, classification_batches(1, 5, (4, 3), 4))
    op.matvec(torch.ones(op.dim))
    assert set(seen) == {False}
    assert torch.backends.cudnn.enabled == enabled


def test_verify_must_be_a_bool_and_seed_an_int():
    with pytest.raises(ValueError, match="verify"):
        lc.HessianOperator(tanh_mlp(), cross_entropy_loss, mlp_batches(), verify="yes")
    op = lc.HessianOperator(tanh_mlp(), cross_entropy_loss, mlp_batches())
    for seed in (True, 1.5, "0"):
        with pytest.raises(ValueError, match="seed"):
            op.check(seed)
    assert op.check(np.int64(3)).passed


@torch.compile(backend="aot_eager")
def compiled_activation(x):
    return 1.5 * torch.tanh(x)


class CompiledFunctionInside(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = nn.Linear(10, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.out(compiled_activation(self.inp(x)))


def test_a_compiled_function_falls_back_to_finite_differences():
    # A compiled function (not module) cannot be swapped for its eager version: the compiled
    # backward refuses create_graph, and "auto" measures by finite differences instead.
    model = CompiledFunctionInside()
    batches = mlp_batches()
    v = torch.randn(124, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    truth = finite_difference_hvp(model, cross_entropy_loss, batches, v)
    op = lc.HessianOperator(model, cross_entropy_loss, batches, dtype=torch.float64)
    with pytest.warns(UserWarning, match="cannot be differentiated twice"):
        assert relative_error(op.matvec(v), truth) < 1e-6
    assert op.method_used == "finite_difference"


def test_wrappers_pass_the_method_and_the_fallback_reason_through():
    op = lc.HessianOperator(custom_in_loss(), cross_entropy_loss, mlp_batches())
    wrapped = lc.operators.PreconditionedOperator(op, torch.ones(op.dim))
    assert wrapped.method_used == "reuse_graph" and wrapped.fallback_reason is None
    with pytest.warns(UserWarning, match="finite differences"):
        wrapped.matvec(torch.ones(op.dim))
    assert wrapped.method_used == "finite_difference"
    assert wrapped.fallback_reason == op.fallback_reason is not None


class CustomReluNet(nn.Module):
    """A ReLU MLP on a batch large enough that a float32 finite-difference step crosses
    kinks, with the custom tanh in a side branch so that the fallback is taken."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.main = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 4))
        self.side = nn.Sequential(nn.Linear(10, 4), CustomTanh())

    def forward(self, x):
        return self.main(x) + self.side(x)


def test_the_fallback_warns_when_float32_differences_are_inexact():
    batches = classification_batches(1, 512, (10,), 4)
    op = lc.HessianOperator(CustomReluNet(), cross_entropy_loss, batches)
    with pytest.warns(UserWarning, match="dtype=torch.float64 for accurate") as record:
        op.matvec(torch.ones(op.dim))
    assert op.last_check.finite_difference_uncertainty > 1e-2
    assert len(record) == 1
    smooth = lc.HessianOperator(custom_in_loss(), cross_entropy_loss, mlp_batches())
    with pytest.warns(UserWarning) as record:
        smooth.matvec(torch.ones(smooth.dim))
    assert "accurate products" not in str(record[0].message)
