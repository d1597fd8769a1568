"""The two tiers: what each measures, against float64 dense truth, and what it costs."""

import copy
import math
import warnings

import pytest
import torch

from lightning_curvature import CurvatureMonitor, DenseOperator, lanczos
from lightning_curvature._lightning import pl
from lightning_curvature.estimators import hutchinson_trace
from lightning_curvature.measure.tiers import MeasureSettings, WarmStart, measure
from lightning_curvature.operators import PreconditionedOperator
from lightning_curvature.optim.stability import StabilityRule
from tests.lightning_models import Classifier, classification_data, loader, mlp, trainer
from tests.truth import cross_entropy_loss, dense_hessian, matrix_with_spectrum


class ParameterRecorder(pl.Callback):
    """θ before and after every optimizer step, as flat float64 vectors."""

    def __init__(self):
        self.before, self.after = {}, {}

    @staticmethod
    def flat(module):
        return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before[trainer.global_step + 1] = self.flat(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = (self.flat(module), copy.deepcopy(module.net))


@pytest.mark.parametrize(
    ("optimizer", "kwargs"), [("sgd", {"momentum": 0.9}), ("adam", {})], ids=["momentum", "adam"]
)
def test_directional_and_batch_sharpness_match_the_dense_hessian(tmp_path, optimizer, kwargs):
    torch.manual_seed(0)
    recorder = ParameterRecorder()
    monitor = CurvatureMonitor(every_n_steps=3, log_spaced=False, k=1, trace=False)
    module = Classifier(mlp(), optimizer, lr=0.05, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [recorder, monitor], max_steps=9).fit(
            module, loader(classification_data())
        )
    batch = next(iter(loader(classification_data())))
    assert [int(h["step"]) for h in monitor.history] == [3, 6, 9]
    for logged in monitor.history:
        step = int(logged["step"])
        theta, net = recorder.after[step]
        hessian = dense_hessian(net, cross_entropy_loss, [batch])
        u = theta - recorder.before[step]
        directional = (u @ hessian @ u / (u @ u)).item()
        net64 = copy.deepcopy(net).double()
        loss = cross_entropy_loss(net64, (batch[0].double(), batch[1]))
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, net64.parameters())])
        batch_sharpness = (g @ hessian @ g / (g @ g)).item()
        lr = logged["curvature/learning_rate"]
        assert logged["curvature/directional_sharpness"] == pytest.approx(directional, rel=1e-4)
        assert logged["curvature/batch_sharpness"] == pytest.approx(batch_sharpness, rel=1e-4)
        # ·η is one product of Python floats: exact to float64 rounding, whatever the
        # float32 products cost the sharpness itself (checked just above).
        float64_rounding = 4 * torch.finfo(torch.float64).eps
        for name in ("directional_sharpness", "batch_sharpness"):
            assert logged[f"curvature/{name}_x_lr"] == pytest.approx(
                logged[f"curvature/{name}"] * lr, rel=float64_rounding
            )


def _dense(eigenvalues, seed=0):
    return DenseOperator(matrix_with_spectrum(torch.tensor(eigenvalues), seed=seed))


def test_the_full_tier_counts_every_run_in_num_matvecs():
    # Independent count: the estimators run alone, with the seeds measure() uses.
    spectrum = [10.0, 6.0, 3.0, *torch.linspace(-2.0, 1.0, 57).tolist()]
    settings = MeasureSettings(k=3, tol=1e-6, lambda_min=True, num_probes=8, seed=5)
    record, _ = measure(_dense(spectrum), 0, settings, tier="full")
    top = lanczos(_dense(spectrum), k=3, tol=1e-6, seed=5)
    bottom = lanczos(_dense(spectrum), k=1, tol=1e-6, seed=6, which="smallest")
    assert record.num_matvecs == top.num_matvecs + bottom.num_matvecs + 8
    assert record.lambda_min == pytest.approx(-2.0, abs=1e-4)
    assert record.lambda_min_converged is True
    assert record.eigenvalues == pytest.approx((10.0, 6.0, 3.0), rel=1e-5)
    trace = hutchinson_trace(_dense(spectrum), num_probes=8, seed=7)
    assert abs(record.trace - sum(spectrum)) <= 3 * max(record.trace_stderr, 1e-9)
    assert record.trace_stderr < trace.stderr  # the top Ritz space is taken exactly


def test_num_iters_caps_every_lanczos_run_of_a_measurement():
    spectrum = torch.linspace(-1.0, 1.0, 200).tolist()  # no gap: nothing converges early
    settings = MeasureSettings(k=2, num_iters=7, tol=1e-12, lambda_min=True, trace=False)
    diagonal = torch.linspace(0.5, 2.0, 200, dtype=torch.float64)
    record, _ = measure(_dense(spectrum), 0, settings, tier="full", preconditioner=diagonal)
    assert record.num_matvecs <= 3 * 7
    assert record.converged is False and record.lambda_min_converged is False
    # Nothing unconverged is shown.
    assert "curvature/lambda_max" not in record.scalars()
    assert "curvature/lambda_min" not in record.scalars()
    assert "curvature/eigenvalue_1" not in record.scalars()


def test_a_warm_started_track_measurement_is_cheap_and_agrees_with_a_cold_full_one():
    # A slowly drifting operator, as between two scheduled steps.
    spectrum = torch.tensor([9.0, 7.5, *torch.linspace(0.0, 5.0, 300).tolist()])
    before = _dense(spectrum, seed=1)
    drift = torch.randn(302, 302, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    after = DenseOperator(before.matrix + 1e-3 * (drift + drift.T))
    settings = MeasureSettings(k=5, tol=1e-3)
    _, warm = measure(before, 0, settings, tier="full")
    track, _ = measure(after, 1, settings, tier="track", warm=warm)
    cold, _ = measure(DenseOperator(after.matrix), 1, settings, tier="full", warm=WarmStart())
    assert track.converged and track.num_matvecs <= 8
    assert track.lambda_max == pytest.approx(cold.lambda_max, rel=1e-3)
    truth = torch.linalg.eigvalsh(after.matrix)[-1].item()
    assert track.lambda_max == pytest.approx(truth, rel=1e-3)


def test_adahessian_gets_adams_rule_with_its_own_preconditioner(tmp_path):
    from lightning_curvature.optim import AdaHessian, HessianBackwardMixin
    from lightning_curvature.optim.preconditioners import preconditioner_diagonal
    from lightning_curvature.optim.stability import stability_rule

    class WithAdaHessian(HessianBackwardMixin, Classifier):
        def configure_optimizers(self):
            return AdaHessian(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    module = WithAdaHessian(mlp())
    monitor = CurvatureMonitor(every_n_steps=3, log_spaced=False, k=1, trace=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = trainer(tmp_path, [monitor], max_steps=6)
        run.fit(module, loader(classification_data()))
    optimizer = run.optimizers[0]
    rule = stability_rule(optimizer)
    assert rule.known and rule.preconditioned and rule.threshold == pytest.approx(38.0)
    params = list(module.parameters())
    torch.testing.assert_close(
        preconditioner_diagonal(optimizer, params), optimizer.preconditioner_diagonal(params)
    )
    # The logged preconditioned sharpness is λmax(P^-1/2 H P^-1/2), from the dense Hessian.
    batch = next(iter(loader(classification_data())))
    hessian = dense_hessian(module.net, cross_entropy_loss, [batch])
    scale = optimizer.preconditioner_diagonal(params).double().rsqrt()
    truth = torch.linalg.eigvalsh(scale[:, None] * hessian * scale[None, :])[-1].item()
    last = monitor.history[-1]
    assert last["curvature/preconditioned_lambda_max"] == pytest.approx(truth, rel=1e-3)
    assert last["curvature/stability_threshold"] == pytest.approx(38.0)


def test_an_adaptive_optimizers_track_point_measures_its_relevant_sharpness_alone():
    """Under Adam the track tier runs one Lanczos, on P⁻¹ᐟ²HP⁻¹ᐟ²; λmax(H) waits for the
    full tier, and the warm start for it is kept for that tier."""
    spectrum = torch.tensor([9.0, 7.5, *torch.linspace(0.0, 5.0, 120).tolist()])
    op = _dense(spectrum, seed=3)
    diagonal = torch.linspace(0.5, 2.0, 122, dtype=torch.float64)
    scale = diagonal.rsqrt()
    truth = torch.linalg.eigvalsh(scale[:, None] * op.matrix * scale[None, :])[-1].item()
    rule = StabilityRule(
        optimizer="Adam",
        threshold=38.0,
        learning_rate=1e-2,
        preconditioned=True,
        known=True,
        note="",
    )
    settings = MeasureSettings(k=2, tol=1e-6, trace=False)
    full, warm = measure(op, 0, settings, tier="full", rule=rule, preconditioner=diagonal)
    assert full.lambda_max == pytest.approx(9.0, rel=1e-6) and full.lambda_max_converged
    before = op.num_matvecs
    track, kept = measure(
        op, 1, settings, tier="track", rule=rule, preconditioner=diagonal, warm=warm
    )
    scaled = PreconditionedOperator(_dense(spectrum, seed=3), diagonal)
    alone = lanczos(scaled, k=1, tol=1e-6, seed=4, init=warm.preconditioned)
    assert track.num_matvecs == op.num_matvecs - before == alone.num_matvecs
    assert track.preconditioned_lambda_max == pytest.approx(truth, rel=1e-6)
    assert track.converged and track.sharpness == track.preconditioned_lambda_max
    assert math.isnan(track.lambda_max) and not track.lambda_max_converged
    tags = track.scalars()
    assert "curvature/lambda_max" not in tags and "curvature/lambda_max_x_lr" not in tags
    assert tags["curvature/stability_ratio"] == pytest.approx(truth * 1e-2 / 38.0, rel=1e-6)
    assert kept.top is warm.top  # the full tier's λmax(H) warm start survives
    # Without an adaptive optimizer the track tier measures λmax itself.
    plain, _ = measure(op, 2, settings, tier="track")
    assert plain.lambda_max == pytest.approx(9.0, rel=1e-6) and plain.sharpness == plain.lambda_max
