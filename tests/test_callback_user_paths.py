"""CurvatureMonitor as a new user meets it: the arguments, LightningModules written as people
write them, the end-of-run line and the dashboard's edge line."""

import math
import re
import warnings

import pytest
import torch
from torch import nn

import lightning_curvature.callback as callback_module
from lightning_curvature import CurvatureMonitor
from lightning_curvature._lightning import pl
from lightning_curvature.monitor.alerts import AlertRules
from lightning_curvature.monitor.tensorboard import dashboard_layout
from tests.lightning_models import (
    Classifier,
    classification_data,
    loader,
    mlp,
    read_events,
    trainer,
)
from tests.truth import cross_entropy_loss, dense_hessian


def fit(tmp_path, module, monitor, max_steps=10, data=None, **kwargs):
    torch.manual_seed(0)
    run = trainer(tmp_path, [monitor], max_steps=max_steps, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(module, data or loader(classification_data()))
    return run


@pytest.fixture
def info_lines(monkeypatch):
    """What the monitor says through rank_zero_info (its calibration and end-of-run lines)."""
    lines = []
    monkeypatch.setattr(callback_module, "rank_zero_info", lines.append)
    return lines


def test_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        CurvatureMonitor(5)  # every_n_steps? full_every? Say which.
    assert CurvatureMonitor(every_n_steps=5).schedule.cadence == 5


@pytest.mark.parametrize(
    ("name", "value"),
    [("loss_from_output", "cross_entropy"), ("output_fn", lambda module, batch: batch[0])],
)
def test_an_output_space_loss_is_refused_with_the_hessian(name, value):
    # With curvature="hessian" the loss is training_step's: an output-space loss given with
    # it was silently ignored, so the user measured another matrix than they meant.
    with pytest.raises(ValueError, match=rf"{name} is used only with curvature='ggn' or 'fisher'"):
        CurvatureMonitor(**{name: value})
    CurvatureMonitor(curvature="ggn", **{"loss_from_output": "cross_entropy", name: value})


class NoForward(pl.LightningModule):
    """training_step calls the network directly: the module defines no forward."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return nn.functional.cross_entropy(self.net(inputs), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_module_without_forward_is_caught_at_setup_under_ggn(tmp_path):
    monitor = CurvatureMonitor(
        every_n_steps=2, curvature="ggn", loss_from_output="cross_entropy", max_overhead=None
    )
    with pytest.warns(UserWarning, match="define forward, or pass") as record:
        trainer(tmp_path, [monitor], max_steps=6).fit(NoForward(), loader(classification_data()))
    assert monitor.history == []
    # Caught at setup, before any measurement could fail on NotImplementedError.
    assert not [w for w in record if "a measurement failed" in str(w.message)]
    # With output_fn it measures.
    monitor = CurvatureMonitor(
        every_n_steps=2,
        curvature="ggn",
        loss_from_output="cross_entropy",
        output_fn=lambda module, batch: module.net(batch[0]),
        max_overhead=None,
    )
    fit(tmp_path / "with_output_fn", NoForward(), monitor, max_steps=6)
    assert [int(h["step"]) for h in monitor.history] == [1, 2, 4, 6]


def test_the_overhead_is_logged_from_the_first_measurement(tmp_path):
    monitor = CurvatureMonitor(every_n_steps=3, k=1, trace=False, max_overhead=None)
    run = fit(tmp_path, Classifier(mlp()), monitor, max_steps=6)
    events = read_events(run.logger.log_dir)
    logged = {e.step: e.value for e in events.Scalars("curvature/overhead")}
    assert sorted(logged) == [1, 2, 3, 6]  # every measurement, the first included
    assert all(math.isfinite(v) and v > 0 for v in logged.values())


def test_the_end_of_run_line_comes_even_when_the_monitor_switched_itself_off(tmp_path, info_lines):
    def nan_loss(module, batch):
        return cross_entropy_loss(module, batch) * float("nan")

    monitor = CurvatureMonitor(every_n_steps=1, loss_fn=nan_loss, max_failures=2)
    fit(tmp_path, Classifier(mlp()), monitor, max_steps=6)
    (line,) = [text for text in info_lines if "Curvature measurements" in text]
    assert "0 (0 track, 0 full, 2 failed)" in line
    assert "The monitor is off: 2 measurements in a row failed" in line


def test_adams_first_steps_are_left_out_of_the_peak_stability_ratio(tmp_path, info_lines):
    # Adam's P holds 1 − β1ᵗ, which inflates P⁻¹H up to ten-fold at t = 1; the edge alert
    # trusts the ratio from β1ᵗ <= 0.1 on, t >= ceil(log 0.1 / log 0.9) = 22, and so does
    # the summary's peak.
    settled = math.ceil(math.log(0.1) / math.log(0.9))
    monitor = CurvatureMonitor(every_n_steps=4, k=1, trace=False, max_overhead=None)
    fit(tmp_path, Classifier(mlp(), "adam", lr=0.01), monitor, max_steps=40)
    ratios = {int(h["step"]): h["curvature/stability_ratio"] for h in monitor.history}
    assert max(ratios, key=ratios.get) < settled  # the artifact the summary used to report
    peak_step = max((s for s in ratios if s >= settled), key=ratios.get)
    (line,) = [text for text in info_lines if "Peak stability ratio" in text]
    assert f"Peak stability ratio {ratios[peak_step]:.3g} at step {peak_step} " in line


def test_the_stability_ratio_chart_has_a_line_at_one(tmp_path):
    monitor = CurvatureMonitor(every_n_steps=2, k=1, trace=False, max_overhead=None)
    run = fit(tmp_path, Classifier(mlp()), monitor, max_steps=6)
    events = read_events(run.logger.log_dir)
    ratio_steps = [e.step for e in events.Scalars("curvature/stability_ratio")]
    edge = [(e.step, e.value) for e in events.Scalars("curvature/stability_edge")]
    assert edge == [(step, 1.0) for step in ratio_steps]
    (chart,) = [
        patterns
        for title, (_, patterns) in dashboard_layout("curvature")["curvature"].items()
        if title.startswith("stability ratio")
    ]
    for tag in ("curvature/stability_ratio", "curvature/stability_edge"):
        assert any(re.search(pattern, tag) for pattern in chart)


@pytest.mark.parametrize(("lr", "alerts"), [(1e-5, []), (0.02, [13])])
def test_a_sharpness_jump_alerts_only_where_it_matters_for_stability(tmp_path, lr, alerts):
    # λmax jumps 50× at step 13 (the measured loss is scaled up from there). With η = 1e-5
    # λmax·η stays about 1e-4 of SGD's threshold 2, no risk to training: quiet. With
    # η = 0.02 the same jump takes it to about a third of the edge: one alert.
    scale = {"value": 1.0}

    def scaled_loss(module, batch):
        return scale["value"] * cross_entropy_loss(module, batch)

    class Jump(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            scale["value"] = 50.0 if trainer.global_step >= 12 else 1.0

    fired = []
    monitor = CurvatureMonitor(
        every_n_steps=1,
        log_spaced=False,
        k=1,
        trace=False,
        loss_fn=scaled_loss,
        on_alert=fired.append,
        alert_rules=AlertRules(spike_warmup_steps=0),
        max_overhead=None,
    )
    torch.manual_seed(0)
    run = trainer(tmp_path, [Jump(), monitor], max_steps=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(Classifier(mlp(), lr=lr), loader(classification_data()))
    history = {int(h["step"]): h for h in monitor.history}
    jump = history[13]["curvature/lambda_max"] / history[12]["curvature/lambda_max"]
    assert jump == pytest.approx(50.0, rel=0.05)
    ratio = history[13]["curvature/stability_ratio"]
    assert ratio < 1e-3 if not alerts else ratio > 2 * monitor.alerts.rules.spike_min_ratio
    assert [a.step for a in fired if a.kind == "sharpness_spike"] == alerts


class SkipsEveryFifthBatch(Classifier):
    """A common pattern: training_step returns None to skip a batch."""

    def training_step(self, batch, batch_idx):
        if batch_idx % 5 == 0:
            return None
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("probe", ["fixed", "current"])
def test_a_training_step_that_skips_batches_is_measured_on_batches_it_trains_on(tmp_path, probe):
    data = loader(classification_data())
    monitor = CurvatureMonitor(
        every_n_steps=2, log_spaced=False, k=1, trace=False, probe=probe, max_overhead=None
    )
    module = SkipsEveryFifthBatch(mlp())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, module, monitor, max_steps=8, data=data)  # one epoch: batches 0-7
    assert not [w for w in caught if "CurvatureMonitor" in str(w.message)]
    assert monitor.disabled_reason is None
    # Batches 0 and 5 are skipped, global_step advancing all the same. Every scheduled step
    # is measured, but for step 6 with probe="current": its batch, 5, was not trained on.
    expected = [2, 4, 6, 8] if probe == "fixed" else [2, 4, 8]
    assert [int(h["step"]) for h in monitor.history] == expected
    # Measured on what it trains on: the fixed probe is batch 1, the first trained on;
    # the current probe at step 8 is the batch of step 8, batch 7.
    batches = list(data)
    probe_batch = batches[1] if probe == "fixed" else batches[7]
    hessian = dense_hessian(module.net, cross_entropy_loss, [probe_batch])
    truth = torch.linalg.eigvalsh(hessian)[-1].item()
    assert monitor.history[-1]["curvature/lambda_max"] == pytest.approx(truth, rel=1e-3)


def test_a_probe_that_training_step_gives_no_loss_for_says_which_batch_idx_and_the_fix(
    tmp_path,
):
    # probe_dataloader's batches are measured as batch_idx 0, 1, ...: index 0 is skipped.
    monitor = CurvatureMonitor(
        every_n_steps=2,
        k=1,
        trace=False,
        probe_dataloader=loader(classification_data(seed=1)),
        max_overhead=None,
    )
    with pytest.warns(UserWarning) as record:
        trainer(tmp_path, [monitor], max_steps=8).fit(
            SkipsEveryFifthBatch(mlp()), loader(classification_data())
        )
    (failure,) = [str(w.message) for w in record if "a measurement failed" in str(w.message)]
    assert "training_step(batch, batch_idx=0) returned None" in failure
    assert "loss_fn" in failure and "on_error" not in failure


def test_the_default_schedule_ends_a_short_run_with_a_full_measurement(tmp_path):
    # Whatever cadence this machine's timing calibrates, the first measurement, every 8th
    # after it and the run's last step (300, from max_steps) are full.
    monitor = CurvatureMonitor(k=2, num_probes=2)
    fit(tmp_path, Classifier(mlp()), monitor, max_steps=300)
    steps = [int(h["step"]) for h in monitor.history]
    full = [int(h["step"]) for h in monitor.history if "curvature/trace" in h]
    assert steps[-1] == 300 and steps[:6] == [1, 2, 4, 8, 16, 32]
    assert full == sorted({*steps[::8], 300})
    assert len(full) >= 2


def test_probe_batches_of_an_older_checkpoint_load_as_batch_idx_zero():
    monitor = CurvatureMonitor()
    batch = (torch.ones(2, 3), torch.zeros(2))
    monitor.load_state_dict({"probe_batches": [batch]})  # the list older versions wrote
    assert monitor.probes.stored == [batch] and monitor.probes.stored_indices == [0]
    (indexed,) = monitor.probes.batches(torch.device("cpu"), indexed=True)
    assert indexed.batch_idx == 0 and torch.equal(indexed.batch[0], batch[0])


@pytest.mark.parametrize(("num_batches", "samples"), [(1, 16), (2, 32)])
def test_under_gradient_accumulation_the_probe_is_a_micro_batch_or_the_effective_batch(
    tmp_path, num_batches, samples
):
    # Micro-batches of 16, two per optimizer step. The probe is the first micro-batch;
    # num_batches=accumulate_grad_batches makes it the first step's effective batch: the
    # mean loss over samples 0-31, which is the loss on those 32 samples as one batch.
    monitor = CurvatureMonitor(
        every_n_steps=2,
        log_spaced=False,
        k=1,
        trace=False,
        num_batches=num_batches,
        max_overhead=None,
    )
    module = Classifier(mlp())
    fit(
        tmp_path,
        module,
        monitor,
        max_steps=4,
        data=loader(classification_data(), batch_size=16),
        accumulate_grad_batches=2,
    )
    inputs, targets = classification_data().tensors
    probe = (inputs[:samples], targets[:samples])
    truth = torch.linalg.eigvalsh(dense_hessian(module.net, cross_entropy_loss, [probe]))[-1]
    assert [int(h["step"]) for h in monitor.history] == [2, 4]
    assert monitor.history[-1]["curvature/lambda_max"] == pytest.approx(truth.item(), rel=1e-3)
