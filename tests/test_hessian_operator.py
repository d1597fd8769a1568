"""HessianOperator against dense float64 Hessians from torch.func.hessian, and its side effects."""

import copy

import pytest
import torch
from torch import nn

import lightning_curvature as lc
from tests.truth import (
    classification_batches,
    cross_entropy_loss,
    dense_hessian,
    finite_difference_hvp,
    relu_mlp,
    small_cnn,
    tanh_mlp,
)

METHODS = ["reuse_graph", "recompute", "forward_over_reverse"]


def mlp_batches():
    return classification_batches(2, 32, (10,), 4)


def cnn_batches():
    return classification_batches(2, 8, (1, 8, 8), 3)


def relative_error(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("make_model", "make_batches"),
    [(tanh_mlp, mlp_batches), (relu_mlp, mlp_batches), (small_cnn, cnn_batches)],
    ids=["tanh_mlp", "relu_mlp", "cnn_batchnorm_eval"],
)
def test_matvec_matches_dense_hessian(make_model, make_batches, method):
    model = make_model().eval()
    batches = make_batches()
    hessian = dense_hessian(model, cross_entropy_loss, batches)
    generator = torch.Generator().manual_seed(0)
    block = torch.randn(hessian.shape[0], 3, generator=generator, dtype=torch.float64)

    exact = lc.HessianOperator(
        model, cross_entropy_loss, batches, dtype=torch.float64, hvp_method=method
    )
    assert exact.dim == hessian.shape[0]
    assert relative_error(exact.matvec(block[:, 0]), hessian @ block[:, 0]) < 1e-12
    assert relative_error(exact.matmat(block), hessian @ block) < 1e-12

    fast = lc.HessianOperator(model, cross_entropy_loss, batches, hvp_method=method)
    assert fast.dtype == torch.float32
    product = fast.matvec(block[:, 0].float())
    assert product.dtype == torch.float32 and product.device == fast.device
    assert relative_error(product.double(), hessian @ block[:, 0]) < 1e-5
    assert fast.num_matvecs == 1 + 1  # the product and the check's one extra column
    assert fast.last_check.passed and fast.method_used == method


def test_least_squares_hessian_is_two_over_n_xtx():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    targets = torch.randn(40, generator=generator, dtype=torch.float64)
    model = nn.Linear(6, 1).double()

    def mse(m, batch):
        return ((m(batch[0]).squeeze(-1) - batch[1]) ** 2).mean()

    design = torch.cat([inputs, torch.ones(40, 1, dtype=torch.float64)], dim=1)  # weight, bias
    exact = 2 / 40 * design.T @ design
    # Two halves of equal size: the mean of their Hessians is the full-data Hessian.
    op = lc.HessianOperator(
        model, mse, [(inputs[:20], targets[:20]), (inputs[20:], targets[20:])], dtype=torch.float64
    )
    identity = torch.eye(7, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(identity), exact, rtol=1e-12, atol=1e-12)
    result = lc.lanczos(op, k=3)
    torch.testing.assert_close(
        result.eigenvalues, torch.linalg.eigvalsh(exact).flip(0)[:3], rtol=1e-10, atol=0
    )


def test_params_dict_restricts_to_one_block():
    model = tanh_mlp().eval()
    batches = mlp_batches()
    full = dense_hessian(model, cross_entropy_loss, batches)
    names = [n for n, _ in model.named_parameters()]
    # The block of the second layer: rows/cols of its weight and bias in the flat order.
    sizes = [p.numel() for p in model.parameters()]
    start = sum(sizes[:2])
    stop = start + sizes[2] + sizes[3]
    block_params = {n: p for n, p in model.named_parameters() if n.startswith("2.")}
    op = lc.HessianOperator(
        model, cross_entropy_loss, batches, params=block_params, dtype=torch.float64
    )
    assert op.param_names == names[2:4]
    assert op.dim == stop - start
    torch.testing.assert_close(
        op.matmat(torch.eye(op.dim, dtype=torch.float64)),
        full[start:stop, start:stop],
        rtol=1e-10,
        atol=1e-12,
    )
    # An iterable of the same parameters gives the same operator.
    same = lc.HessianOperator(
        model, cross_entropy_loss, batches, params=list(block_params.values()), dtype=torch.float64
    )
    assert same.param_names == op.param_names


class AdapterModel(nn.Module):
    """A frozen base with a trainable low-rank adapter on its first layer (LoRA-style)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.base = tanh_mlp()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.down = nn.Parameter(torch.randn(2, 10) * 0.3)
        self.up = nn.Parameter(torch.randn(20, 2) * 0.3)

    def forward(self, x):
        hidden = self.base[0](x) + x @ self.down.T @ self.up.T
        for layer in list(self.base)[1:]:
            hidden = layer(hidden)
        return hidden


def test_default_params_are_only_the_trainable_adapters():
    model = AdapterModel()
    batches = mlp_batches()
    op = lc.HessianOperator(model, cross_entropy_loss, batches, dtype=torch.float64)
    assert op.param_names == ["down", "up"]
    assert op.dim == 2 * 10 + 20 * 2
    exact = dense_hessian(model, cross_entropy_loss, batches, param_names=["down", "up"])
    torch.testing.assert_close(
        op.matmat(torch.eye(op.dim, dtype=torch.float64)), exact, rtol=1e-10, atol=1e-12
    )


def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "modes": [m.training for m in model.modules()],
        "cpu_rng": torch.get_rng_state(),
    }


def assert_same(before, after):
    assert before["state"].keys() == after["state"].keys()
    for key in before["state"]:
        assert torch.equal(before["state"][key], after["state"][key]), key
    for name, grad in before["grads"].items():
        if grad is None:
            assert after["grads"][name] is None, name
        else:
            assert torch.equal(grad, after["grads"][name]), name
    assert before["modes"] == after["modes"]
    assert torch.equal(before["cpu_rng"], after["cpu_rng"])


class DropoutBatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * 6 * 6, 3))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("method", ["reuse_graph", "recompute"])
def test_products_leave_model_buffers_grads_modes_and_rng_untouched(method):
    model = DropoutBatchNormNet()
    model.train()  # BatchNorm would update running stats; dropout would draw from the RNG
    model.head.eval()  # a mixed mode that must survive too
    batches = classification_batches(2, 8, (1, 8, 8), 3)
    # Pre-existing gradients from "training" must survive, and absent ones stay absent.
    cross_entropy_loss(model, batches[0]).backward()
    model.features[0].bias.grad = None
    torch.manual_seed(99)
    before = snapshot(model)
    op = lc.HessianOperator(model, cross_entropy_loss, batches, hvp_method=method)
    lc.lanczos(op, k=2, num_iters=6)
    lc.hutchinson_trace(op, num_probes=4)
    assert_same(before, snapshot(model))


def test_forward_over_reverse_leaves_an_eval_model_untouched_and_refuses_train_batchnorm():
    model = DropoutBatchNormNet().eval()
    model.head.train()  # dropout draws from the RNG
    batches = classification_batches(1, 8, (1, 8, 8), 3)
    cross_entropy_loss(model, batches[0]).backward()
    before = snapshot(model)
    op = lc.HessianOperator(model, cross_entropy_loss, batches, hvp_method="forward_over_reverse")
    lc.lanczos(op, k=2, num_iters=6)
    assert_same(before, snapshot(model))
    model.train()
    op = lc.HessianOperator(model, cross_entropy_loss, batches, hvp_method="forward_over_reverse")
    with pytest.raises(RuntimeError, match="mutates its buffers"):
        op.matvec(torch.ones(op.dim))


def test_train_mode_dropout_gives_one_fixed_symmetric_operator():
    model = DropoutBatchNormNet().train()
    batches = classification_batches(1, 8, (1, 8, 8), 3)
    for method in ["reuse_graph", "recompute"]:
        op = lc.HessianOperator(
            model, cross_entropy_loss, batches, dtype=torch.float64, hvp_method=method
        )
        matrix = op.matmat(torch.eye(op.dim, dtype=torch.float64))
        again = op.matmat(torch.eye(op.dim, dtype=torch.float64))
        torch.testing.assert_close(matrix, again, rtol=0, atol=0)
        torch.testing.assert_close(matrix, matrix.T, rtol=1e-9, atol=1e-12)
    reused = lc.HessianOperator(model, cross_entropy_loss, batches, dtype=torch.float64)
    recomputed = lc.HessianOperator(
        model, cross_entropy_loss, batches, dtype=torch.float64, hvp_method="recompute"
    )
    v = torch.ones(reused.dim, dtype=torch.float64)
    torch.testing.assert_close(reused.matvec(v), recomputed.matvec(v), rtol=1e-12, atol=1e-12)


def test_a_gradient_that_does_not_depend_on_the_parameters_counts_as_zero():
    model = nn.Linear(5, 1)
    unused = nn.Linear(5, 1)  # its parameters never enter the loss
    container = nn.ModuleDict({"used": model, "unused": unused})

    def linear_loss(m, batch):
        return m["used"](batch).sum()  # linear in the parameters: zero Hessian

    op = lc.HessianOperator(container, linear_loss, [torch.randn(4, 5)])
    assert op.dim == 12
    assert torch.equal(op.matvec(torch.ones(12)), torch.zeros(12))
    assert lc.lanczos(op, k=1).eigenvalues[0].item() == 0.0


def test_unused_parameters_get_zero_rows():
    container = nn.ModuleDict({"used": tanh_mlp(), "unused": nn.Linear(3, 3)})

    def loss(m, batch):
        return cross_entropy_loss(m["used"], batch)

    op = lc.HessianOperator(container, loss, mlp_batches(), dtype=torch.float64)
    product = op.matvec(torch.ones(op.dim, dtype=torch.float64))
    assert torch.equal(product[-12:], torch.zeros(12, dtype=torch.float64))
    assert product[:-12].abs().sum() > 0


class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


def test_fused_attention_works_through_the_math_kernel():
    # The fused SDPA kernels (flash on CPU too) have no double backward; the operator must
    # still give exact products. Truth: central differences of float64 gradients (forward
    # AD through nn.MultiheadAttention gives an asymmetric torch.func.hessian here).
    model = TinyAttention().train()
    batches = classification_batches(1, 4, (5, 16), 3)
    op = lc.HessianOperator(model, cross_entropy_loss, batches, dtype=torch.float64)
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    truth = finite_difference_hvp(model, cross_entropy_loss, batches, v)
    assert relative_error(op.matvec(v), truth) < 1e-7
    fast = lc.HessianOperator(model, cross_entropy_loss, batches)
    assert relative_error(fast.matvec(v.float()).double(), truth) < 1e-4
    matrix = op.matmat(torch.eye(op.dim, dtype=torch.float64)[:, :50])
    torch.testing.assert_close(matrix[:50], matrix[:50].T, rtol=1e-10, atol=1e-12)


def test_recurrent_model_has_a_hessian():
    torch.manual_seed(0)

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 6, batch_first=True)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = Recurrent()
    batches = classification_batches(1, 5, (4, 3), 2)
    op = lc.HessianOperator(model, cross_entropy_loss, batches, dtype=torch.float64)
    exact = dense_hessian(model, cross_entropy_loss, batches)
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert relative_error(op.matvec(v), exact @ v) < 1e-10


def test_a_bf16_model_is_measured_in_float32_on_a_copy():
    model = tanh_mlp().to(torch.bfloat16)
    before = copy.deepcopy(model.state_dict())
    batches = [(x.to(torch.bfloat16), y) for x, y in mlp_batches()]
    op = lc.HessianOperator(model, cross_entropy_loss, batches)
    assert op.dtype == torch.float32
    product = op.matvec(torch.ones(op.dim))
    assert product.dtype == torch.float32 and bool(torch.isfinite(product).all())
    for key, value in model.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, before[key])
    exact = dense_hessian(model.float(), cross_entropy_loss, [(x.float(), y) for x, y in batches])
    assert relative_error(product.double(), exact @ torch.ones(op.dim, dtype=torch.float64)) < 1e-4


def test_loss_is_the_mean_over_batches_and_a_mapping_loss_works():
    model = tanh_mlp()
    batches = mlp_batches()

    def step_like(m, batch):
        return {"loss": cross_entropy_loss(m, batch), "log": 1}

    op = lc.HessianOperator(model, step_like, batches)
    expected = sum(float(cross_entropy_loss(model, b)) for b in batches) / 2
    assert op.loss == pytest.approx(expected, rel=1e-6)


def test_non_finite_loss_raises_a_clear_error():
    model = tanh_mlp()
    batches = [(torch.full((4, 10), float("nan")), torch.zeros(4, dtype=torch.long))]
    op = lc.HessianOperator(model, cross_entropy_loss, batches)
    with pytest.raises(FloatingPointError, match="loss on the probe batches"):
        op.matvec(torch.ones(op.dim))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"model": "not a model"}, "model"),
        ({"loss_fn": 3}, "loss_fn"),
        ({"batches": []}, "batches"),
        ({"batches": torch.ones(3)}, "batches"),
        ({"params": []}, "params"),
        ({"params": [nn.Parameter(torch.ones(2))]}, "params"),
        ({"dtype": torch.float16}, "dtype"),
        ({"hvp_method": "magic"}, "hvp_method"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(kwargs, argument):
    arguments = {"model": tanh_mlp(), "loss_fn": cross_entropy_loss, "batches": mlp_batches()}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        lc.HessianOperator(**arguments)


def test_frozen_parameters_cannot_be_selected_explicitly():
    model = AdapterModel()
    with pytest.raises(ValueError, match="does not require grad"):
        lc.HessianOperator(model, cross_entropy_loss, mlp_batches(), params=[model.base[0].weight])


def test_wrong_vector_shape_is_rejected():
    op = lc.HessianOperator(tanh_mlp(), cross_entropy_loss, mlp_batches())
    with pytest.raises(ValueError, match="shape"):
        op.matvec(torch.ones(op.dim + 1))


def test_release_frees_the_graph_and_products_still_work():
    op = lc.HessianOperator(tanh_mlp(), cross_entropy_loss, mlp_batches())
    v = torch.ones(op.dim)
    first = op.matvec(v)
    with op:
        pass  # leaving the context releases the graph
    assert op._gradients is None
    torch.testing.assert_close(op.matvec(v), first, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_products_on_gpu_match_cpu_and_stay_on_the_device():
    model = small_cnn().eval()
    batches = cnn_batches()
    cpu = lc.HessianOperator(model, cross_entropy_loss, batches, dtype=torch.float64)
    gpu_model = copy.deepcopy(model).cuda()
    gpu = lc.HessianOperator(gpu_model, cross_entropy_loss, batches, dtype=torch.float64)
    assert gpu.device.type == "cuda"
    v = torch.randn(cpu.dim, dtype=torch.float64)
    product = gpu.matvec(v.cuda())
    assert product.device.type == "cuda"
    assert relative_error(product.cpu(), cpu.matvec(v)) < 1e-10
    result = lc.lanczos(gpu, k=3, return_eigenvectors=True)
    assert result.eigenvectors.device.type == "cuda"
    torch.testing.assert_close(
        result.eigenvalues, lc.lanczos(cpu, k=3).eigenvalues, rtol=1e-6, atol=0
    )
