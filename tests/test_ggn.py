"""GGNOperator and FisherOperator against dense float64 truth built from torch.func.jacrev
(outputs) and torch.func.hessian (the loss in output space), never from the package."""

import copy
import doctest

import numpy as np
import pytest
import torch
from torch import nn

import lightning_curvature as lc
from lightning_curvature.operators import fisher as fisher_module
from lightning_curvature.operators import ggn as ggn_module
from lightning_curvature.operators import output_space
from lightning_curvature.operators.fisher import FisherOperator
from lightning_curvature.operators.ggn import GGNOperator
from tests.truth import classification_batches, dense_hessian, small_cnn, tanh_mlp


def regression_batches(num_batches=2, batch_size=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, 10, generator=generator),
            torch.randn(batch_size, 4, generator=generator),
        )
        for _ in range(num_batches)
    ]


def cnn_regression_batches(num_batches=2, batch_size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, 1, 8, 8, generator=generator),
            torch.randn(batch_size, 3, generator=generator),
        )
        for _ in range(num_batches)
    ]


CASES = {
    "mlp_cross_entropy": (
        tanh_mlp,
        lambda: classification_batches(2, 24, (10,), 4),
        "cross_entropy",
    ),
    "mlp_mse": (tanh_mlp, regression_batches, "mse"),
    "cnn_mse": (small_cnn, lambda: cnn_regression_batches(), "mse"),
    "cnn_cross_entropy": (
        small_cnn,
        lambda: classification_batches(2, 8, (1, 8, 8), 3),
        "cross_entropy",
    ),
}
TORCH_LOSSES = {"mse": nn.functional.mse_loss, "cross_entropy": nn.functional.cross_entropy}


def flat_model(model):
    """The model's outputs as a function of one flat float64 parameter vector."""
    model64 = copy.deepcopy(model).double()
    names, shapes = zip(*[(n, p.shape) for n, p in model64.named_parameters()], strict=True)
    theta = torch.cat([p.detach().reshape(-1) for p in model64.parameters()])

    def outputs(flat, inputs):
        values, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            values[name] = flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return torch.func.functional_call(model64, values, (inputs.double(),))

    return theta, outputs


def dense_matrices(model, batches, loss_name):
    """(GGN, empirical Fisher, list of (J, H_ℓ) per batch), float64, mean over batches."""
    theta, outputs = flat_model(model)
    loss = TORCH_LOSSES[loss_name]
    ggn = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    fisher = torch.zeros_like(ggn)
    pieces = []
    for inputs, targets in batches:
        targets = targets.double() if targets.is_floating_point() else targets
        f = outputs(theta, inputs)
        jacobian = torch.func.jacrev(outputs)(theta, inputs).reshape(f.numel(), -1)
        h_loss = torch.func.hessian(lambda g, t=targets: loss(g, t))(f).reshape(f.numel(), -1)
        ggn += jacobian.T @ h_loss @ jacobian
        pieces.append((f, jacobian, h_loss))

        # Per-sample losses ℓ_n (a row for MSE, a sample for cross-entropy), L = mean ℓ_n.
        def per_sample(flat, inputs=inputs, targets=targets):
            out = outputs(flat, inputs)
            if loss_name == "mse":
                return ((out - targets) ** 2).mean(dim=1)
            return nn.functional.cross_entropy(out, targets, reduction="none")

        grads = torch.func.jacrev(per_sample)(theta).reshape(-1, theta.numel())  # per term
        fisher += grads.T @ grads / grads.shape[0]
    return ggn / len(batches), fisher / len(batches), pieces


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    make_model, make_batches, loss_name = CASES[request.param]
    model = make_model().eval()
    batches = make_batches()
    ggn, fisher, pieces = dense_matrices(model, batches, loss_name)
    return model, batches, loss_name, ggn, fisher, pieces


def relative_error(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("method", ["reuse_graph", "forward_mode"])
def test_ggn_matvec_matches_dense_jt_h_j(case, method):
    model, batches, loss_name, ggn, _, _ = case
    block = torch.randn(
        ggn.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    exact = GGNOperator(
        model, batches, loss_from_output=loss_name, dtype=torch.float64, product_method=method
    )
    assert exact.dim == ggn.shape[0]
    assert relative_error(exact.matvec(block[:, 0]), ggn @ block[:, 0]) < 1e-10
    assert relative_error(exact.matmat(block), ggn @ block) < 1e-10
    assert exact.num_matvecs == 4
    fast = GGNOperator(model, batches, loss_from_output=loss_name, product_method=method)
    assert fast.dtype == torch.float32
    assert relative_error(fast.matmat(block.float()).double(), ggn @ block) < 1e-5


def test_callable_loss_gets_its_output_hessian_by_autograd(case):
    model, batches, loss_name, ggn, _, _ = case
    loss = TORCH_LOSSES[loss_name]
    op = GGNOperator(
        model, batches, loss_from_output=lambda f, b: loss(f, b[1]), dtype=torch.float64
    )
    block = torch.randn(
        ggn.shape[0], 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    assert relative_error(op.matmat(block), ggn @ block) < 1e-10


def test_callable_loss_without_closed_form_matches_dense_truth():
    model = tanh_mlp().eval()
    batches = regression_batches()

    def log_cosh(outputs, batch):
        return torch.log(torch.cosh(outputs - batch[1])).mean()

    theta, outputs = flat_model(model)
    truth = 0
    for inputs, targets in batches:
        f = outputs(theta, inputs)
        jacobian = torch.func.jacrev(outputs)(theta, inputs).reshape(f.numel(), -1)
        batch64 = (None, targets.double())
        h_loss = torch.func.hessian(lambda g, b=batch64: log_cosh(g, b))(f)
        truth = truth + jacobian.T @ h_loss.reshape(f.numel(), -1) @ jacobian
    truth = truth / len(batches)
    op = GGNOperator(model, batches, loss_from_output=log_cosh, dtype=torch.float64)
    identity = torch.eye(op.dim, dtype=torch.float64)[:, :50]
    assert relative_error(op.matmat(identity), truth[:, :50]) < 1e-10


def test_empirical_fisher_matches_mean_outer_product_of_per_sample_gradients(case):
    model, batches, loss_name, _, fisher, _ = case
    op = FisherOperator(
        model, batches, kind="empirical", loss_from_output=loss_name, dtype=torch.float64
    )
    block = torch.randn(
        fisher.shape[0], 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    assert relative_error(op.matmat(block), fisher @ block) < 1e-10


def test_true_fisher_monte_carlo_is_within_its_standard_error_of_the_ggn(case):
    """vᵀFv is a mean over terms and draws of (r·Jv)²; its standard error comes from the exact
    per-term variance of that square (computed here from the dense J and the model's p)."""
    model, batches, loss_name, ggn, _, pieces = case
    num_samples = 64
    op = FisherOperator(
        model,
        batches,
        loss_from_output=loss_name,
        num_samples=num_samples,
        seed=5,
        dtype=torch.float64,
    )
    generator = torch.Generator().manual_seed(4)
    for _ in range(4):
        v = torch.randn(ggn.shape[0], generator=generator, dtype=torch.float64)
        estimate = float(v @ op.matvec(v))
        exact = float(v @ ggn @ v)
        variance = 0.0
        for f, jacobian, _ in pieces:
            u = (jacobian @ v).reshape(f.shape)
            if loss_name == "cross_entropy":
                p = torch.softmax(f, dim=1)
                centred = u - (p * u).sum(1, keepdim=True)  # r·u = -(u_y - p·u)
                mean = (p * centred**2).sum(1)
                var_terms = (p * centred**4).sum(1) - mean**2
                num_terms = f.shape[0]
            else:  # r = √(2/K)·ε: (r·u)² = (2/K)(ε·u)², variance 2·((2/K)‖u‖²)²
                num_terms, k = f.shape[0], f.shape[1]
                var_terms = 2 * (2 / k * (u**2).sum(1)) ** 2
            variance += float(var_terms.sum()) / (num_terms**2 * num_samples)
        stderr = variance**0.5 / len(pieces)
        assert abs(estimate - exact) <= 4 * stderr, (estimate, exact, stderr)
        assert stderr < 0.5 * exact  # the test has power: F is far from 0 or 2G


def test_true_fisher_is_seeded_fixed_and_leaves_global_rng_alone():
    model = tanh_mlp().eval()
    batches = classification_batches(1, 16, (10,), 4)
    state = torch.random.get_rng_state()
    first = FisherOperator(model, batches, loss_from_output="cross_entropy", seed=3)
    v = torch.randn(first.dim, generator=torch.Generator().manual_seed(0))
    product = first.matvec(v)
    assert torch.equal(first.matvec(v), product)  # one fixed matrix across products
    first.release()
    assert torch.equal(first.matvec(v), product)  # draws are the same after a release
    again = FisherOperator(model, batches, loss_from_output="cross_entropy", seed=3)
    other = FisherOperator(model, batches, loss_from_output="cross_entropy", seed=4)
    assert torch.equal(again.matvec(v), product)
    assert not torch.equal(other.matvec(v), product)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_ggn_lambda_max_top5_and_trace_meet_the_numerical_contract(case):
    model, batches, loss_name, ggn, _, _ = case
    eigenvalues = torch.linalg.eigvalsh(ggn).flip(0)
    op = GGNOperator(model, batches, loss_from_output=loss_name)
    top1 = lc.lanczos(op, k=1)
    assert top1.converged
    assert abs(top1.eigenvalues[0].item() / eigenvalues[0].item() - 1) <= 1e-3
    top5 = lc.lanczos(op, k=5)
    assert float(((top5.eigenvalues - eigenvalues[:5]).abs() / eigenvalues[:5]).max()) <= 1e-2
    trace = lc.hutchinson_trace(op, num_probes=30, seed=0)
    assert abs(trace.estimate - float(torch.trace(ggn))) <= 3 * trace.stderr
    assert float(eigenvalues[-1]) >= -1e-10 * float(eigenvalues[0])  # PSD, unlike H


def test_ggn_equals_hessian_for_least_squares_on_a_linear_model():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    targets = torch.randn(40, generator=generator, dtype=torch.float64)
    model = nn.Linear(6, 1).double()
    design = torch.cat([inputs, torch.ones(40, 1, dtype=torch.float64)], dim=1)
    batches = [(inputs[:20], targets[:20]), (inputs[20:], targets[20:])]  # (20,) targets
    op = GGNOperator(model, batches, loss_from_output="mse", dtype=torch.float64)
    identity = torch.eye(7, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(identity), 2 / 40 * design.T @ design)
    assert (
        abs(op.loss - float(((model(inputs).squeeze(-1) - targets) ** 2).mean().detach())) < 1e-12
    )


def test_ggn_and_hessian_agree_up_to_the_residual_term_on_an_mlp():
    """H = G + Σ ∂ℓ/∂f · ∇²f, so λmax(H) ≤ λmax(G) + ‖H - G‖₂ (Weyl)."""
    model = tanh_mlp().eval()
    batches = classification_batches(2, 24, (10,), 4)
    ggn, _, _ = dense_matrices(model, batches, "cross_entropy")
    hessian = dense_hessian(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), batches)
    op = GGNOperator(model, batches, loss_from_output="cross_entropy", dtype=torch.float64)
    lam_g = lc.lanczos(op, k=1).eigenvalues[0].item()
    lam_h = float(torch.linalg.eigvalsh(hessian)[-1])
    assert lam_h <= lam_g + float(torch.linalg.matrix_norm(hessian - ggn, ord=2)) + 1e-8


def test_measuring_leaves_the_model_and_global_rng_untouched():
    model = small_cnn().train()  # BatchNorm updates running stats in train mode
    model[9] = nn.Sequential(nn.Dropout(0.3), model[9])
    before = copy.deepcopy(model.state_dict())
    state = torch.random.get_rng_state()
    batches = classification_batches(2, 8, (1, 8, 8), 3)
    op = FisherOperator(model, batches, kind="empirical", loss_from_output="cross_entropy")
    op.matmat(torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(0)))
    ggn = GGNOperator(model, batches, loss_from_output="cross_entropy")
    v = torch.randn(ggn.dim, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ggn.matvec(v), ggn.matvec(v))  # dropout mask fixed per batch
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert model.training and torch.equal(torch.random.get_rng_state(), state)


def test_params_restricts_the_operator_to_a_block_of_the_dense_ggn(case):
    model, batches, loss_name, ggn, _, _ = case
    names = [n for n, _ in model.named_parameters()]
    last = dict(model.named_parameters())
    chosen = {n: last[n] for n in names[-2:]}
    op = GGNOperator(model, batches, chosen, loss_from_output=loss_name, dtype=torch.float64)
    start = ggn.shape[0] - op.dim
    identity = torch.eye(op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(identity), ggn[start:, start:])
    assert op.param_names == names[-2:]


def test_cross_entropy_over_sequence_positions_matches_dense_truth():
    """Classes on dimension 1 with an extra (sequence) dimension: terms are positions."""
    torch.manual_seed(0)
    model = nn.Conv1d(3, 5, kernel_size=3, padding=1)
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(4, 3, 7, generator=generator),
            torch.randint(0, 5, (4, 7), generator=generator),
        )
    ]
    ggn, _, _ = dense_matrices(model, batches, "cross_entropy")
    op = GGNOperator(model, batches, loss_from_output="cross_entropy", dtype=torch.float64)
    identity = torch.eye(op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(identity), ggn)
    fisher = FisherOperator(
        model, batches, loss_from_output="cross_entropy", num_samples=4000, dtype=torch.float64
    )
    estimate = fisher.matmat(identity)
    assert relative_error(estimate, ggn) < 0.1  # MC error ~ 1/√(4000·28 terms) ≪ 0.1


def test_bad_arguments_raise_value_errors_naming_them():
    model = tanh_mlp()
    batches = classification_batches(1, 8, (10,), 4)
    with pytest.raises(ValueError, match="loss_from_output must be one of"):
        GGNOperator(model, batches, loss_from_output="huber")
    with pytest.raises(ValueError, match="product_method"):
        GGNOperator(model, batches, loss_from_output="mse", product_method="fast")
    with pytest.raises(ValueError, match="batches must hold at least one"):
        GGNOperator(model, [], loss_from_output="mse")
    with pytest.raises(ValueError, match="kind must be one of"):
        FisherOperator(model, batches, kind="exact", loss_from_output="mse")
    with pytest.raises(ValueError, match="kind='true' samples targets"):
        FisherOperator(model, batches, loss_from_output=lambda f, b: f.sum())
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="num_samples must be an integer"):
            FisherOperator(model, batches, loss_from_output="mse", num_samples=bad)
    assert (
        FisherOperator(model, batches, loss_from_output="mse", num_samples=np.int64(3)).num_samples
        == 3
    )
    with pytest.raises(ValueError, match="seed must be an integer"):
        FisherOperator(model, batches, loss_from_output="mse", seed=False)


def test_outputs_that_cannot_be_split_raise_clear_value_errors():
    model = tanh_mlp()
    classes = classification_batches(1, 8, (10,), 4)
    with pytest.raises(ValueError, match="needs targets with as many entries"):
        GGNOperator(model, classes, loss_from_output="mse").matvec(torch.zeros(724))
    vector_out = GGNOperator(
        model, classes, output_fn=lambda m, b: m(b[0])[:, 0], loss_from_output="cross_entropy"
    )
    with pytest.raises(ValueError, match="needs outputs with a class dimension"):
        vector_out.matvec(torch.zeros(724))
    no_targets = GGNOperator(
        model, [{"x": classes[0][0]}], output_fn=lambda m, b: m(b["x"]), loss_from_output="mse"
    )
    with pytest.raises(ValueError, match=r"read targets from batch\[1\]"):
        no_targets.matvec(torch.zeros(724))
    dict_out = GGNOperator(
        model, classes, output_fn=lambda m, b: {"y": m(b[0])}, loss_from_output="mse"
    )
    with pytest.raises(ValueError, match="output_fn must return a floating-point tensor"):
        dict_out.matvec(torch.zeros(724))


@pytest.mark.parametrize("module", [ggn_module, fisher_module, output_space])
def test_docstring_examples_run(module):
    assert doctest.testmod(module, raise_on_error=False).failed == 0


def test_forward_mode_uses_the_same_dropout_mask_as_the_kept_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Dropout(0.5), nn.Linear(20, 4)).train()
    batches = classification_batches(2, 16, (10,), 4)
    block = torch.randn(304, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    products = [
        GGNOperator(
            model, batches, loss_from_output="cross_entropy", dtype=torch.float64, product_method=m
        ).matmat(block)
        for m in ("reuse_graph", "forward_mode")
    ]
    assert relative_error(products[1], products[0]) < 1e-12
    model.eval()
    without_dropout = GGNOperator(
        model, batches, loss_from_output="cross_entropy", dtype=torch.float64
    )
    assert relative_error(without_dropout.matmat(block), products[0]) > 1e-3  # masks matter


def test_cross_entropy_accepts_probability_targets_like_class_indices():
    model = tanh_mlp().eval()
    indices = classification_batches(2, 16, (10,), 4)
    soft = [(x, nn.functional.one_hot(y, 4).float()) for x, y in indices]
    block = torch.randn(724, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for kind in ("empirical", "true"):
        products = [
            FisherOperator(
                model, b, kind=kind, loss_from_output="cross_entropy", dtype=torch.float64
            ).matmat(block)
            for b in (indices, soft)
        ]
        assert relative_error(products[1], products[0]) < 1e-12
    ggn = GGNOperator(model, soft, loss_from_output="cross_entropy")
    assert abs(ggn.loss - GGNOperator(model, indices, loss_from_output="cross_entropy").loss) < 1e-6
