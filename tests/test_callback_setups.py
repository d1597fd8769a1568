"""CurvatureMonitor in less common set-ups: warm starts, sharded strategies, the unified
`lightning` package, and (where there is one) a GPU."""

import copy
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from lightning_curvature import CurvatureMonitor
from tests.lightning_models import Classifier, classification_data, loader, mlp, trainer
from tests.truth import cross_entropy_loss, dense_hessian

ROOT = Path(__file__).resolve().parents[1]


def test_warm_and_cold_starts_agree_within_the_numerical_contract(tmp_path):
    results = {}
    for warm in (True, False):
        torch.manual_seed(0)
        module = Classifier(mlp(), "sgd", lr=0.1)
        data = loader(classification_data())
        monitor = CurvatureMonitor(
            every_n_steps=3,
            full_every=1,
            log_spaced=False,
            warm_start=warm,
            tol=1e-4,
            max_overhead=None,
        )
        trainer(tmp_path / str(warm), [monitor], max_steps=12).fit(module, data)
        hessian = dense_hessian(module.net, cross_entropy_loss, [next(iter(data))])
        truth = torch.linalg.eigvalsh(hessian).flip(0)[:5]
        top = torch.tensor(
            [monitor.history[-1][f"curvature/eigenvalue_{i}"] for i in range(1, 6)],
            dtype=torch.float64,
        )
        assert float(((top - truth).abs() / truth.abs()).max()) <= 1e-2
        assert abs(top[0].item() / truth[0].item() - 1) <= 1e-3
        results[warm] = monitor.history
    # Same training run, same probe batch: the two agree to the contract at every step.
    for warm, cold in zip(results[True], results[False], strict=True):
        assert warm["curvature/lambda_max"] == pytest.approx(cold["curvature/lambda_max"], rel=1e-3)


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_sharded_strategies_get_a_clear_warning_and_the_monitor_switches_off(strategy):
    fake_strategy = type(strategy, (), {})()
    fake_trainer = types.SimpleNamespace(strategy=fake_strategy)
    monitor = CurvatureMonitor()
    with pytest.warns(UserWarning, match=f"{strategy} shards the parameters"):
        monitor.setup(fake_trainer, Classifier(mlp()), "fit")
    assert "ModelParallelStrategy with fully_shard (FSDP2)" in monitor.disabled_reason


@pytest.mark.parametrize(
    "kwargs", [{"per_layer": True}, {"curvature": "ggn", "loss_from_output": "cross_entropy"}]
)
def test_under_fsdp2_only_the_whole_hessian_is_measured_and_the_rest_is_refused(kwargs):
    fake_trainer = types.SimpleNamespace(strategy=type("ModelParallelStrategy", (), {})())
    monitor = CurvatureMonitor(**kwargs)
    with pytest.warns(UserWarning, match="curvature='hessian' and per_layer=False"):
        monitor.setup(fake_trainer, Classifier(mlp()), "fit")
    assert monitor.disabled_reason is not None


def test_manual_optimization_without_loss_fn_switches_off_with_advice():
    module = Classifier(mlp())
    module.automatic_optimization = False
    monitor = CurvatureMonitor()
    fake_trainer = types.SimpleNamespace(strategy=object())
    with pytest.warns(UserWarning, match="loss_fn"):
        monitor.setup(fake_trainer, module, "fit")
    assert monitor.disabled_reason is not None


SCRIPT = """
import torch, lightning.pytorch as L
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import lightning_curvature as lc
from lightning_curvature._lightning import LIGHTNING_PACKAGE
assert LIGHTNING_PACKAGE == "lightning.pytorch", LIGHTNING_PACKAGE

class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

data = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,))), batch_size=16)
monitor = lc.CurvatureMonitor(every_n_steps=2, max_overhead=None, on_error="raise")
trainer = L.Trainer(max_steps=4, logger=False, enable_progress_bar=False, callbacks=[monitor],
                    enable_checkpointing=False, enable_model_summary=False)
trainer.fit(Module(), data)
assert trainer.callback_metrics["curvature/lambda_max"] > 0
print("ok", len(monitor.history))
"""


def test_works_with_the_unified_lightning_package():
    pytest.importorskip("lightning.pytorch")
    env = {**os.environ, "LIGHTNING_CURVATURE_BACKEND": "lightning", "PYTHONPATH": str(ROOT)}
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().endswith("ok 3")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_estimator_loops_sync_with_the_host_only_at_their_checks():
    import lightning_curvature as lc
    from lightning_curvature.estimators._common import ACCELERATOR_CHECK_EVERY as CHECK_EVERY

    generator = torch.Generator(device="cuda").manual_seed(0)
    matrix = torch.randn(2000, 2000, device="cuda", generator=generator)
    op = lc.DenseOperator(matrix + matrix.T)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = lc.lanczos(op, k=3, num_iters=40, tol=0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.num_iters == 40
    # One transfer per check and a few at the end, never one per iteration.
    assert len(syncs) <= 40 // CHECK_EVERY * 3 + 10
    assert len(syncs) < 40


@needs_cuda
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_monitor_on_gpu_keeps_vectors_on_the_device(tmp_path, precision):
    monitor = CurvatureMonitor(
        every_n_steps=4, log_spaced=False, max_overhead=None, on_error="raise"
    )
    run = trainer(
        tmp_path,
        [monitor],
        max_steps=4,
        accelerator="gpu",
        precision=precision,
        deterministic=False,
    )
    module = Classifier(mlp())
    run.fit(module, loader(classification_data()))
    assert monitor._warm.top.device.type == "cuda"
    # The dense float64 Hessian of the same weights, on the CPU.
    batch = next(iter(loader(classification_data())))
    net = copy.deepcopy(module.net).cpu()
    truth = torch.linalg.eigvalsh(dense_hessian(net, cross_entropy_loss, [batch]))[-1].item()
    assert run.callback_metrics["curvature/lambda_max"].item() == pytest.approx(truth, rel=1e-3)
