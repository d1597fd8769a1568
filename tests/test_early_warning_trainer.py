"""The early warning through a real Trainer: least squares on the digits, full-batch gradient
descent, the learning rate raised ×4 mid-run by a LambdaLR. H = 2/n·XᵀX is known in closed
form, so the stability ratio before the raise (0.75) and after it (3) is too; the loss then
diverges along the top eigenvector. The monitor, at its defaults, must alert at or before
the loss spikes, and say nothing on the same run without the raise."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_curvature import CurvatureMonitor
from lightning_curvature._lightning import TensorBoardLogger, pl
from lightning_curvature.demo.data import load_digits_tensors
from lightning_curvature.monitor.early_warning import PREDICTED

RAISE_AT = 60
NUM_SAMPLES = 256


class LeastSquares(pl.LightningModule):
    def __init__(self, lr: float, factor: float) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10, bias=False, dtype=torch.float64)
        self.lr, self.factor = lr, factor
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = ((self.linear(inputs) - targets) ** 2).sum(dim=1).mean()
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        factor = self.factor
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: factor if step >= RAISE_AT else 1.0
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@pytest.fixture(scope="module")
def digits():
    inputs, labels = load_digits_tensors()
    inputs = inputs[:NUM_SAMPLES].double()
    targets = nn.functional.one_hot(labels[:NUM_SAMPLES], 10).double()
    # The loss sums over the 10 outputs: H = 2/n·XᵀX on each output's weights.
    top = torch.linalg.eigvalsh(2 / NUM_SAMPLES * inputs.T @ inputs)[-1].item()
    return torch.utils.data.TensorDataset(inputs, targets), top


def fit(digits, factor: float, tmp_path):
    dataset, top = digits
    torch.manual_seed(0)
    module = LeastSquares(lr=1.5 / top, factor=factor)  # stability ratio 0.75 before
    monitor = CurvatureMonitor(trace=False)
    trainer = pl.Trainer(
        max_steps=120,
        callbacks=[monitor],
        logger=TensorBoardLogger(tmp_path, name="raise"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(dataset, batch_size=NUM_SAMPLES))
    lowest = [min(module.losses[: i + 1]) for i in range(len(module.losses))]
    spike = next(
        (
            i + 1  # training_step i + 1 reports the loss at the step-i weights
            for i, loss in enumerate(module.losses)
            if not math.isfinite(loss) or loss > 2 * lowest[i]
        ),
        None,
    )
    return monitor, spike, top


@pytest.mark.filterwarnings("ignore")
def test_a_raised_learning_rate_is_warned_before_the_loss_blows_up(digits, tmp_path):
    monitor, spike, top = fit(digits, 4.0, tmp_path)
    assert spike is not None and spike > RAISE_AT  # the truth: it does blow up
    first = monitor.alerts.fired[0]
    assert first.kind == PREDICTED and RAISE_AT <= first.step <= spike
    # The predicted ratio is the closed form's: 0.75 × 4.
    assert first.value == pytest.approx(3.0, rel=1e-3)
    # A measurement followed the alert, and confirmed it against the closed form.
    after = [h for h in monitor.history if h["step"] > first.step]
    assert after and after[0]["curvature/stability_ratio"] == pytest.approx(3.0, rel=1e-3)
    assert after[0]["curvature/lambda_max"] == pytest.approx(top, rel=1e-3)
    # The spike was recorded with the alert that came first.
    (recorded,) = monitor.logbook.early_warning.spikes
    assert recorded.first_alert == PREDICTED and recorded.lead_steps >= 0


@pytest.mark.filterwarnings("ignore")
def test_the_same_run_without_the_raise_raises_nothing(digits, tmp_path):
    monitor, spike, _ = fit(digits, 1.0, tmp_path)
    assert spike is None
    assert monitor.alerts.fired == [] and monitor.logbook.early_warning.spikes == []
    ratios = [
        h["curvature/stability_ratio"] for h in monitor.history if "curvature/stability_ratio" in h
    ]
    assert ratios and max(ratios) == pytest.approx(0.75, rel=1e-3)


@pytest.mark.filterwarnings("ignore")
def test_critical_sharpness_through_the_monitor_is_the_closed_forms(digits, tmp_path):
    # Gradient descent on least squares (H constant): the update per unit η is d = −g, g the
    # gradient at θ_{s−1}, and at θ_s = θ_{s−1} − ηg the gradient is g − ηHg. The loss along
    # d first rises again at t_c = 2(g − ηHg)ᵀg / gᵀHg = 2(1 − ηq)/q, q = gᵀHg/gᵀg the
    # update's Rayleigh quotient (the monitor's directional sharpness): critical sharpness
    # 2/t_c = q/(1 − ηq).
    dataset, top = digits
    torch.manual_seed(0)
    module = LeastSquares(lr=1.5 / top, factor=1.0)
    monitor = CurvatureMonitor(
        every_n_steps=10, log_spaced=False, trace=False, critical_sharpness=True
    )
    trainer = pl.Trainer(
        max_steps=30,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(dataset, batch_size=NUM_SAMPLES))
    rows = [h for h in monitor.history if "curvature/critical_sharpness" in h]
    assert [int(h["step"]) for h in rows] == [10, 20, 30]
    for row in rows:
        q, lr = row["curvature/directional_sharpness"], row["curvature/learning_rate"]
        # The search stops at a bracket of relative width 1e-2 and reports its midpoint.
        assert row["curvature/critical_sharpness"] == pytest.approx(q / (1 - lr * q), rel=5e-3)
        assert row["curvature/critical_sharpness_x_lr"] == pytest.approx(
            row["curvature/critical_sharpness"] * row["curvature/learning_rate"]
        )
