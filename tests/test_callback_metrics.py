"""What ModelCheckpoint and EarlyStopping see: a curvature value in ``callback_metrics``
describes the current weights, or is absent. The scores are checked against the dense
float64 Hessian of the very weights a checkpoint holds."""

import warnings

import pytest
import torch

from lightning_curvature import CurvatureMonitor
from lightning_curvature._lightning import pl
from tests.lightning_models import Classifier, classification_data, loader, mlp, trainer
from tests.truth import cross_entropy_loss, dense_hessian

STEPS_PER_EPOCH = 8  # 256 samples in batches of 32
LR = 0.05


class GrowingLearningRate(Classifier):
    """SGD whose η triples every epoch (from LR), so the stability ratio crosses 1."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 3.0**epoch)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class EpochEndWeights(pl.Callback):
    """The network's weights at every epoch end, by global step."""

    def __init__(self):
        self.weights = {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights[trainer.global_step] = {
            k: v.detach().clone() for k, v in pl_module.net.state_dict().items()
        }


def dense_lambda_max(weights, probe):
    net = mlp()
    net.load_state_dict(weights)
    return torch.linalg.eigvalsh(dense_hessian(net, cross_entropy_loss, [probe]))[-1].item()


def test_the_readme_example_scores_checkpoints_and_stops_at_the_edge_on_current_weights(
    tmp_path,
):
    data = loader(classification_data())
    probe = next(iter(data))  # the fixed probe: the first training batch
    # The README's example: one measurement at the last step of every epoch.
    steps_per_epoch = len(data)
    assert steps_per_epoch == STEPS_PER_EPOCH
    monitor = CurvatureMonitor(every_n_steps=steps_per_epoch, k=1, trace=False)
    flattest = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "checkpoints",
        monitor="curvature/lambda_max",
        mode="min",
        save_top_k=2,
    )
    stop_at_the_edge = pl.callbacks.EarlyStopping(
        monitor="curvature/stability_ratio",
        mode="min",
        divergence_threshold=1.0,
        patience=10**9,
        strict=False,
    )
    weights = EpochEndWeights()
    torch.manual_seed(0)
    run = trainer(
        tmp_path,
        [monitor, flattest, stop_at_the_edge, weights],
        max_steps=-1,
        max_epochs=6,
        enable_checkpointing=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(GrowingLearningRate(mlp(), lr=LR), data)

    truth = {step: dense_lambda_max(w, probe) for step, w in weights.weights.items()}
    # η at the end of epoch e is the next epoch's, LR·3^(e+1) (the scheduler has stepped);
    # GD's stability ratio is λmax·η / 2.
    ratio = {s: truth[s] * LR * 3.0 ** (s // STEPS_PER_EPOCH) / 2 for s in truth}
    crossed = min(s for s in ratio if ratio[s] > 1.0)
    assert crossed > STEPS_PER_EPOCH  # the run really was below the edge before
    assert run.global_step == crossed  # stopped at the first epoch end past the edge
    # Every checkpoint considered was scored with the λmax of the weights it holds.
    assert len(flattest.best_k_models) == 2
    for path, score in flattest.best_k_models.items():
        saved = torch.load(path, weights_only=False)
        step = saved["global_step"]
        held = {k.removeprefix("net."): v for k, v in saved["state_dict"].items()}
        assert score.item() == pytest.approx(dense_lambda_max(held, probe), rel=1e-3)
        assert score.item() == pytest.approx(truth[step], rel=1e-3)
    # ... and they are the two flattest epoch ends.
    kept = sorted(torch.load(p, weights_only=False)["global_step"] for p in flattest.best_k_models)
    assert kept == sorted(sorted(truth, key=truth.get)[:2])


def test_callback_metrics_hold_only_values_measured_on_the_current_weights(tmp_path):
    def loss_failing_at_step_6(module, batch):
        nan = float("nan") if module.trainer.global_step == 6 else 1.0
        return cross_entropy_loss(module, batch) * nan

    class Seen(pl.Callback):
        """After the monitor: what callback_metrics holds at the end of every step."""

        def __init__(self):
            self.values = {}

        def on_train_batch_end(self, trainer, *args):
            self.values[trainer.global_step] = trainer.callback_metrics.get("curvature/lambda_max")

    monitor = CurvatureMonitor(
        every_n_steps=3,
        log_spaced=False,
        k=1,
        trace=False,
        loss_fn=loss_failing_at_step_6,
        max_overhead=None,
    )
    seen = Seen()
    torch.manual_seed(0)
    run = trainer(tmp_path, [monitor, seen], max_steps=13)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(Classifier(mlp()), loader(classification_data()))
    measured = {int(h["step"]): h["curvature/lambda_max"] for h in monitor.history}
    assert sorted(measured) == [3, 9, 12]  # 6 failed
    present = {step: value.item() for step, value in seen.values.items() if value is not None}
    assert present == pytest.approx(measured)  # nowhere else, and not after the failure
    assert "curvature/lambda_max" not in run.callback_metrics  # step 13 was not measured


def test_a_checkpoint_between_measurements_is_not_scored_with_older_curvature(tmp_path):
    # Measured every 5 steps, checkpointed every epoch (8 steps): only the epoch end at
    # step 40 was measured. The others used to be scored with the value of steps 5, 15, 20
    # and 30, on other weights; now they have no score, and Lightning skips them.
    data = loader(classification_data())
    probe = next(iter(data))
    monitor = CurvatureMonitor(
        every_n_steps=5, log_spaced=False, k=1, trace=False, max_overhead=None
    )
    every_checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", monitor="curvature/lambda_max", save_top_k=-1
    )
    torch.manual_seed(0)
    run = trainer(tmp_path, [monitor, every_checkpoint], max_steps=40, enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(Classifier(mlp()), data)
    scored = {}
    for path, score in every_checkpoint.best_k_models.items():
        saved = torch.load(path, weights_only=False)
        held = {k.removeprefix("net."): v for k, v in saved["state_dict"].items()}
        scored[saved["global_step"]] = (score.item(), dense_lambda_max(held, probe))
    assert list(scored) == [40]
    assert scored[40][0] == pytest.approx(scored[40][1], rel=1e-3)
