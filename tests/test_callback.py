"""CurvatureMonitor in real Trainers: the numbers, the dashboard, the safety contract."""

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_curvature import CurvatureMonitor
from lightning_curvature._lightning import pl
from lightning_curvature.monitor.alerts import AlertRules
from tests.lightning_models import (
    DESIGN_TAGS,
    Classifier,
    classification_data,
    cnn_with_batchnorm_and_dropout,
    image_data,
    loader,
    mlp,
    read_events,
    trainer,
)
from tests.truth import cross_entropy_loss, dense_hessian


def fit(tmp_path, module, data, monitor=None, max_steps=20, **kwargs):
    torch.manual_seed(0)
    run = trainer(tmp_path, [monitor] if monitor else [], max_steps=max_steps, **kwargs)
    run.fit(module, data)
    return run


def scalars(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_logs_every_design_tag_and_the_dashboard_to_tensorboard(tmp_path):
    torch.manual_seed(0)
    module = Classifier(mlp(), "sgd", lr=0.1, momentum=0.9)
    monitor = CurvatureMonitor(
        every_n_steps=5, full_every=1, k=3, spectral_density=True, max_overhead=None
    )
    run = fit(tmp_path, module, loader(classification_data()), monitor)
    events = read_events(run.logger.log_dir)
    tags = set(events.Tags()["scalars"])
    assert DESIGN_TAGS | {f"curvature/eigenvalue_{i}" for i in (1, 2, 3)} <= tags
    # Log-spaced early, then every 5 steps: 1, 2, 4, 5, 10, 15, 20.
    assert [s for s, _ in scalars(events, "curvature/lambda_max")] == [1, 2, 4, 5, 10, 15, 20]
    assert "curvature/ritz_values" in events.Tags()["histograms"]
    assert "curvature/spectral_density" in events.Tags()["images"]
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    # eigenvalue_1 is λmax, and the eigenvalues are descending.
    top = [dict(scalars(events, f"curvature/eigenvalue_{i}"))[20] for i in (1, 2, 3)]
    assert top[0] == pytest.approx(dict(scalars(events, "curvature/lambda_max"))[20])
    assert top[0] >= top[1] >= top[2]
    # The monitor also feeds callback_metrics, so EarlyStopping/ModelCheckpoint can use it.
    assert "curvature/lambda_max" in run.callback_metrics


def test_logged_lambda_max_and_trace_match_the_dense_hessian(tmp_path):
    torch.manual_seed(0)
    module = Classifier(mlp(), "sgd", lr=0.2)
    data = loader(classification_data())
    monitor = CurvatureMonitor(
        every_n_steps=10, log_spaced=False, num_probes=200, max_overhead=None
    )
    run = fit(tmp_path, module, data, monitor, max_steps=10)
    probe = next(iter(data))  # the fixed probe set is the first training batch
    hessian = dense_hessian(module.net, cross_entropy_loss, [probe])
    eigenvalues = torch.linalg.eigvalsh(hessian)
    logged = run.callback_metrics
    assert logged["curvature/lambda_max"].item() == pytest.approx(eigenvalues[-1].item(), rel=1e-3)
    stderr = logged["curvature/trace_stderr"].item()
    assert abs(logged["curvature/trace"].item() - eigenvalues.sum().item()) <= 4 * stderr
    assert logged["curvature/lambda_max_x_lr"].item() == pytest.approx(
        eigenvalues[-1].item() * 0.2, rel=1e-3
    )
    assert logged["curvature/stability_threshold"].item() == pytest.approx(2.0)
    with torch.no_grad():
        probe_loss = cross_entropy_loss(module.net.double(), (probe[0].double(), probe[1]))
    assert logged["curvature/probe_loss"].item() == pytest.approx(probe_loss.item(), rel=1e-5)


def test_momentum_and_adam_get_their_own_thresholds(tmp_path):
    sgd = fit(
        tmp_path / "sgd",
        Classifier(mlp(), "sgd", lr=0.1, momentum=0.9),
        loader(classification_data()),
        CurvatureMonitor(every_n_steps=5, max_overhead=None),
        max_steps=5,
    )
    assert sgd.callback_metrics["curvature/stability_threshold"].item() == pytest.approx(3.8)
    adam = fit(
        tmp_path / "adam",
        Classifier(mlp(), "adam", lr=0.01),
        loader(classification_data()),
        CurvatureMonitor(every_n_steps=5, max_overhead=None),
        max_steps=5,
    )
    metrics = adam.callback_metrics
    assert metrics["curvature/stability_threshold"].item() == pytest.approx(38.0)
    ratio = metrics["curvature/stability_ratio"].item()
    sharp = metrics["curvature/preconditioned_lambda_max"].item()
    assert ratio == pytest.approx(sharp * 0.01 / 38.0, rel=1e-6)


@pytest.mark.parametrize(("optimizer", "first_alert_step"), [("sgd", 1), ("adam", 22)])
def test_threshold_alerts_wait_for_adams_bias_correction_to_settle(
    tmp_path, optimizer, first_alert_step
):
    # Adam's P holds 1 - β1ᵗ, which inflates P⁻¹H ten-fold at t = 1: its stability ratio
    # is logged from the start but trusted for alerts only once β1ᵗ <= 0.1, i.e. from
    # t = ceil(log 0.1 / log 0.9) = 22. SGD has no such factor and alerts at once.
    alerts = []
    monitor = CurvatureMonitor(
        every_n_steps=1,
        k=1,
        trace=False,
        max_overhead=None,
        alert_rules=AlertRules(
            edge_ratio=1e-9, edge_patience=1
        ),  # any ratio counts as "at the edge"
        on_alert=alerts.append,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = fit(
            tmp_path,
            Classifier(mlp(), optimizer, lr=0.01),
            loader(classification_data()),
            monitor,
            max_steps=25,
        )
    threshold_alerts = [a.step for a in alerts if a.kind == "edge_of_stability"]
    assert threshold_alerts == [first_alert_step]
    logged = [h["step"] for h in monitor.history if "curvature/stability_ratio" in h]
    assert logged[0] == 1  # the ratio itself is logged from the first step
    assert run.global_step == 25


def test_adam_preconditioned_lambda_max_matches_a_dense_computation(tmp_path):
    torch.manual_seed(0)
    module = Classifier(mlp(), "adam", lr=0.01)
    data = loader(classification_data())
    run = fit(
        tmp_path,
        module,
        data,
        CurvatureMonitor(every_n_steps=6, log_spaced=False, max_overhead=None),
        max_steps=6,
    )
    optimizer = run.optimizers[0]
    beta1, beta2 = optimizer.param_groups[0]["betas"]
    eps = optimizer.param_groups[0]["eps"]
    diagonal = []
    for p in module.parameters():
        state = optimizer.state[p]
        t = float(state["step"])
        v_hat = state["exp_avg_sq"] / (1 - beta2**t)
        diagonal.append(((1 - beta1**t) * (v_hat.sqrt() + eps)).reshape(-1))
    scale = torch.cat(diagonal).double().rsqrt()
    hessian = dense_hessian(module.net, cross_entropy_loss, [next(iter(data))])
    preconditioned = scale[:, None] * hessian * scale[None, :]
    truth = torch.linalg.eigvalsh(preconditioned)[-1].item()
    logged = run.callback_metrics["curvature/preconditioned_lambda_max"].item()
    assert logged == pytest.approx(truth, rel=1e-3)


def state_of(run, module):
    optimizer = run.optimizers[0]
    return {
        "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "rng": torch.get_rng_state(),
        "modes": [m.training for m in module.modules()],
    }


def assert_identical(a, b):
    assert a["params"].keys() == b["params"].keys()
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            other = b["optimizer"]["state"][index][name]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (index, name)
    assert torch.equal(a["rng"], b["rng"])
    assert a["modes"] == b["modes"]


def test_training_with_the_monitor_is_bit_identical_to_training_without(tmp_path):
    def run(monitor):
        pl.seed_everything(0, verbose=False)
        module = Classifier(cnn_with_batchnorm_and_dropout(), "adam", lr=0.01)
        data = loader(image_data(), batch_size=16, shuffle=True)
        result = trainer(tmp_path, [monitor] if monitor else [], max_steps=16, logger=False)
        result.fit(module, data)
        return state_of(result, module)

    without = run(None)
    monitor = CurvatureMonitor(
        every_n_steps=4,
        k=2,
        num_probes=3,
        spectral_density=True,
        lambda_min=True,
        max_overhead=None,
    )
    with_monitor = run(monitor)
    assert len(monitor.history) >= 4  # it really measured, in train mode with BN + dropout
    assert_identical(without, with_monitor)
    train_mode = CurvatureMonitor(
        every_n_steps=4, k=2, num_probes=3, mode="train", max_overhead=None
    )
    assert_identical(without, run(train_mode))
    assert len(train_mode.history) >= 4


def test_measuring_adds_nothing_to_the_modules_logged_metrics(tmp_path):
    def logged_steps(monitor, folder):
        run = fit(
            tmp_path / folder,
            Classifier(mlp()),
            loader(classification_data()),
            monitor,
            max_steps=10,
        )
        return [s for s, _ in scalars(read_events(run.logger.log_dir), "train_loss")]

    monitor = CurvatureMonitor(every_n_steps=2, log_spaced=False, max_overhead=None)
    assert logged_steps(monitor, "with") == logged_steps(None, "without")
    assert len(monitor.history) == 5


def test_scalars_are_logged_even_at_steps_that_log_every_n_steps_skips(tmp_path):
    run = fit(
        tmp_path,
        Classifier(mlp()),
        loader(classification_data()),
        CurvatureMonitor(every_n_steps=3, log_spaced=False, max_overhead=None),
        max_steps=12,
        log_every_n_steps=50,
    )
    steps = [s for s, _ in scalars(read_events(run.logger.log_dir), "curvature/lambda_max")]
    assert steps == [3, 6, 9, 12]


def test_gradient_accumulation_measures_once_per_optimizer_step(tmp_path):
    monitor = CurvatureMonitor(every_n_steps=2, log_spaced=False, max_overhead=None)
    fit(
        tmp_path,
        Classifier(mlp()),
        loader(classification_data(), batch_size=8),
        monitor,
        max_steps=6,
        accumulate_grad_batches=4,
    )
    assert [int(h["step"]) for h in monitor.history] == [2, 4, 6]


def test_fast_dev_run_and_sanity_check_are_skipped(tmp_path):
    monitor = CurvatureMonitor(every_n_steps=1, max_overhead=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(
            tmp_path,
            Classifier(mlp()),
            loader(classification_data()),
            monitor,
            fast_dev_run=3,
            max_steps=-1,
        )
    assert monitor.history == []


def test_a_failing_measurement_warns_once_skips_and_switches_off(tmp_path):
    calls = []

    def broken_loss(module, batch):
        calls.append(1)
        return cross_entropy_loss(module, batch) * float("nan")

    monitor = CurvatureMonitor(
        every_n_steps=1, log_spaced=False, loss_fn=broken_loss, max_failures=3, max_overhead=None
    )
    with pytest.warns(UserWarning) as record:
        run = fit(tmp_path, Classifier(mlp()), loader(classification_data()), monitor, max_steps=8)
    messages = [str(w.message) for w in record if "CurvatureMonitor" in str(w.message)]
    failures = [m for m in messages if "a measurement failed" in m]
    assert len(failures) == 1 and "FloatingPointError" in failures[0]  # warned once, with cause
    assert any("is off" in m for m in messages)
    assert monitor.disabled_reason is not None and monitor.history == []
    assert run.global_step == 8  # training went on to the end
    assert len(calls) == 3  # and the monitor stopped trying after max_failures


def test_on_error_raise_makes_failures_strict(tmp_path):
    def broken_loss(module, batch):
        raise RuntimeError("boom")

    monitor = CurvatureMonitor(every_n_steps=1, loss_fn=broken_loss, on_error="raise")
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, Classifier(mlp()), loader(classification_data()), monitor, max_steps=3)


def test_a_sharpness_spike_alerts_in_tensorboard_and_can_stop_training(tmp_path):
    scale = {"value": 1.0}

    def scaled_loss(module, batch):
        return scale["value"] * cross_entropy_loss(module, batch)

    fired = []

    def on_alert(alert):
        fired.append(alert)

    class Spike(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            scale["value"] = 50.0 if trainer.global_step >= 12 else 1.0

    monitor = CurvatureMonitor(
        every_n_steps=1,
        log_spaced=False,
        loss_fn=scaled_loss,
        on_alert=on_alert,
        stop_on_alert=True,
        alert_rules=AlertRules(spike_warmup_steps=0),
        max_overhead=None,
    )
    torch.manual_seed(0)
    run = trainer(tmp_path, [Spike(), monitor], max_steps=40)
    with pytest.warns(UserWarning, match="Sharpness spike"):
        run.fit(Classifier(mlp(), lr=0.01), loader(classification_data()))
    assert [a.kind for a in fired] == ["sharpness_spike"]
    assert fired[0].step == 13  # the first step measured with the scaled loss
    assert run.global_step == 13  # stop_on_alert stopped it
    events = read_events(run.logger.log_dir)
    assert "curvature/alerts/text_summary" in events.Tags()["tensors"]


def test_resume_from_a_checkpoint_continues_the_history(tmp_path):
    from lightning_curvature._lightning import pl as lightning

    checkpoint_dir = tmp_path / "ckpt"
    first = CurvatureMonitor(every_n_steps=2, log_spaced=False, max_overhead=None)
    saver = lightning.callbacks.ModelCheckpoint(
        dirpath=checkpoint_dir, save_last=True, every_n_train_steps=6
    )
    run = trainer(tmp_path, [first, saver], max_steps=6, enable_checkpointing=True)
    run.fit(Classifier(mlp()), loader(classification_data()))
    assert [int(h["step"]) for h in first.history] == [2, 4, 6]

    second = CurvatureMonitor(every_n_steps=2, log_spaced=False, max_overhead=None)
    resumed = trainer(tmp_path, [second], max_steps=10)
    resumed.fit(
        Classifier(mlp()),
        loader(classification_data()),
        ckpt_path=str(checkpoint_dir / "last.ckpt"),
    )
    assert [int(h["step"]) for h in second.history] == [2, 4, 6, 8, 10]
    # The probe set came back with the checkpoint: same batch, comparable curves.
    assert torch.equal(second.probes.stored[0][0], first.probes.stored[0][0])


def test_frozen_backbone_measures_only_the_adapter(tmp_path):
    torch.manual_seed(0)
    net = mlp()
    for p in net[0].parameters():
        p.requires_grad_(False)
    module = Classifier(net, "sgd", lr=0.1)
    data = loader(classification_data())
    run = fit(
        tmp_path,
        module,
        data,
        CurvatureMonitor(every_n_steps=5, log_spaced=False, max_overhead=None),
        max_steps=5,
    )
    names = [n for n, p in module.net.named_parameters() if p.requires_grad]
    hessian = dense_hessian(module.net, cross_entropy_loss, [next(iter(data))], param_names=names)
    truth = torch.linalg.eigvalsh(hessian)[-1].item()
    assert run.callback_metrics["curvature/lambda_max"].item() == pytest.approx(truth, rel=1e-3)


@pytest.mark.parametrize("precision", ["bf16-mixed"])
def test_mixed_precision_training_is_measured_in_float32(tmp_path, precision):
    monitor = CurvatureMonitor(every_n_steps=5, log_spaced=False, max_overhead=None)
    run = fit(
        tmp_path,
        Classifier(mlp()),
        loader(classification_data()),
        monitor,
        max_steps=5,
        precision=precision,
    )
    assert run.callback_metrics["curvature/converged"].item() == 1.0
    # Measured in float32 with autocast off: the dense float64 Hessian of the same weights.
    batch = next(iter(loader(classification_data())))
    truth = torch.linalg.eigvalsh(
        dense_hessian(run.lightning_module.net, cross_entropy_loss, [batch])
    )
    value = run.callback_metrics["curvature/lambda_max"].item()
    assert value == pytest.approx(truth[-1].item(), rel=1e-3)
    # The loss measured is the float32 one (as README says), not the autocast one the
    # optimizer descends: within float32's accuracy of the exact loss, far inside bf16's
    # rounding (2⁻⁸ relative per product).
    net = copy.deepcopy(run.lightning_module.net).double()
    with torch.no_grad():
        exact = cross_entropy_loss(net, (batch[0].double(), batch[1])).item()
    logged = run.callback_metrics["curvature/probe_loss"].item()
    assert logged == pytest.approx(exact, rel=1e-5)


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(10, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.1, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        tokens = self.embed(x).unsqueeze(1).expand(-1, 3, -1)
        return self.head(self.encoder(tokens).mean(1))


def test_a_fused_attention_transformer_is_measured(tmp_path):
    monitor = CurvatureMonitor(
        every_n_steps=4, log_spaced=False, max_overhead=None, k=1, trace=False, on_error="raise"
    )
    torch.manual_seed(0)
    module = Classifier(TinyTransformer(), "adamw", lr=1e-3)
    run = fit(tmp_path, module, loader(classification_data()), monitor, max_steps=4)
    # The truth: the dense float64 Hessian of the training objective (dropout off), through
    # the math attention kernel (fused kernels have no double backward).
    # (No BatchNorm here: eval mode is train mode without its three dropouts.)
    net = copy.deepcopy(module.net).eval()
    batch = next(iter(loader(classification_data())))
    truth = torch.linalg.eigvalsh(dense_hessian(net, cross_entropy_loss, [batch]))[-1].item()
    assert run.callback_metrics["curvature/lambda_max"].item() == pytest.approx(truth, rel=1e-3)


def test_an_explicit_schedule_is_never_skipped_and_warns_once_about_its_cost(tmp_path):
    # every_n_steps=1 costs far more than 5% on this tiny model: still every step is
    # measured, and one warning names the measured overhead.
    monitor = CurvatureMonitor(every_n_steps=1, log_spaced=False, max_overhead=0.05)
    with pytest.warns(UserWarning) as caught:
        fit(tmp_path, Classifier(mlp()), loader(classification_data()), monitor, max_steps=30)
    costly = [str(w.message) for w in caught if "above max_overhead" in str(w.message)]
    assert len(costly) == 1 and "every 1 steps" in costly[0]
    assert [int(h["step"]) for h in monitor.history] == list(range(1, 31))
    assert monitor.history[-1]["curvature/overhead"] > 0.05


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"num_batches": -1}, "num_batches"),
        ({"k": 0}, "k"),
        ({"k": 5, "num_iters": 3}, "num_iters"),
        ({"probe": "random"}, "probe"),
        ({"mode": "test"}, "mode"),
        ({"on_error": "ignore"}, "on_error"),
        ({"tol": 2.0}, "tol"),
        ({"max_overhead": 0.0}, "max_overhead"),
        ({"lr_factor_on_alert": 1.5}, "lr_factor_on_alert"),
        ({"loss_fn": "mse"}, "loss_fn"),
        ({"num_probes": 1}, "num_probes"),
        ({"alert_rules": {"edge_patience": 2}}, "alert_rules"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CurvatureMonitor(**kwargs)


class _TanhBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, y):
        return grad * (1 - y * y)

    @staticmethod
    def backward(ctx, *grads):
        # What PyTorch raises for kernels without a double backward (fused attention).
        raise RuntimeError("derivative for custom_tanh_backward is not implemented")


class _TanhWithoutDoubleBackward(torch.autograd.Function):
    """An op with a first derivative but no second, like fused attention kernels."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return _TanhBackward.apply(grad, y)


class NoDoubleBackward(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(10, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.second(_TanhWithoutDoubleBackward.apply(self.first(x)))


@pytest.mark.parametrize(
    ("make_module", "loss_fn", "cause", "fix"),
    [
        (
            lambda: Classifier(mlp()),
            lambda module, batch: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")),
            "OutOfMemoryError",
            "fewer or smaller probe batches",
        ),
    ],
    ids=["out_of_memory"],
)
def test_failures_name_the_cause_and_the_fix_and_training_goes_on(
    tmp_path, make_module, loss_fn, cause, fix
):
    monitor = CurvatureMonitor(
        every_n_steps=2, log_spaced=False, loss_fn=loss_fn, max_overhead=None
    )
    with pytest.warns(UserWarning) as record:
        run = fit(tmp_path, make_module(), loader(classification_data()), monitor, max_steps=6)
    failures = [str(w.message) for w in record if "a measurement failed" in str(w.message)]
    assert len(failures) == 1
    assert cause in failures[0] and fix in failures[0]
    assert run.global_step == 6


def test_an_op_without_double_backward_falls_back_to_finite_differences_once(tmp_path):
    # Its backward raises under double backward (as fused kernels do): the monitor says so
    # once and measures with finite differences of gradients instead of going dark.
    torch.manual_seed(0)
    module = Classifier(NoDoubleBackward(), lr=0.1)
    monitor = CurvatureMonitor(every_n_steps=2, log_spaced=False, k=1, trace=False)
    with pytest.warns(UserWarning) as caught:
        fit(tmp_path, module, loader(classification_data()), monitor, max_steps=6)
    fallbacks = [str(w.message) for w in caught if "finite difference" in str(w.message)]
    assert len(fallbacks) == 1
    assert [int(h["step"]) for h in monitor.history] == [2, 4, 6]
    # The truth: the same network with torch's own tanh, dense and in float64.
    plain = nn.Sequential(module.net.first, nn.Tanh(), module.net.second)
    batch = next(iter(loader(classification_data())))
    truth = torch.linalg.eigvalsh(dense_hessian(plain, cross_entropy_loss, [batch]))[-1].item()
    assert monitor.history[-1]["curvature/lambda_max"] == pytest.approx(truth, rel=1e-2)


def test_lr_factor_on_alert_reduces_every_learning_rate(tmp_path):
    monitor = CurvatureMonitor(
        every_n_steps=1,
        log_spaced=False,
        alert_rules=AlertRules(edge_ratio=0.01, edge_patience=2),
        lr_factor_on_alert=0.5,
        max_overhead=None,
    )
    module = Classifier(mlp(), "sgd", lr=0.4)
    with pytest.warns(UserWarning, match="Edge of stability"):
        run = fit(tmp_path, module, loader(classification_data()), monitor, max_steps=4)
    fired = [a for a in monitor.alerts.fired if a.kind == "edge_of_stability"]
    assert [a.step for a in fired] == [2]  # fires once, then stays quiet while above
    assert run.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.2)
