"""The LightningCLI configs in configs/: each runs a few steps and logs the curvature tags it
promises, with numbers checked against the dense float64 Hessian of ``tests.truth``."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import functional as F

from lightning_curvature import CurvatureMonitor, Triggers
from lightning_curvature._lightning import pl
from lightning_curvature.cli import main
from lightning_curvature.demo import DigitsDataModule
from lightning_curvature.monitor.alerts import AlertRules
from tests.lightning_models import DESIGN_TAGS, read_events
from tests.truth import adam_preconditioner, dense_hessian, preconditioned_lambda_max

pytest.importorskip("sklearn")
pytest.importorskip("jsonargparse")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run_config(tmp_path, *configs: str, max_steps: int, extra: tuple[str, ...] = ()):
    """``fit`` through LightningCLI for ``max_steps``, logging under ``tmp_path``; ``extra``
    arguments come before the overrides (a logger must be named before its save_dir)."""
    cli_module = importlib.import_module(pl.__name__ + ".cli")
    args = ["fit"]
    for name in configs:
        args += ["--config", str(CONFIGS / name)]
    args += [
        *extra,
        f"--trainer.max_steps={max_steps}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
        cli = cli_module.LightningCLI(args=args, save_config_kwargs={"overwrite": True})
    return cli


def monitor_of(trainer) -> CurvatureMonitor:
    (monitor,) = [c for c in trainer.callbacks if isinstance(c, CurvatureMonitor)]
    return monitor


def mse(net, batch):
    return F.mse_loss(net(batch[0]), batch[1])


def probe_batch(**data_kwargs):
    data = DigitsDataModule(**data_kwargs)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_monitor_yaml_writes_out_every_default_of_curvature_monitor():
    written = yaml.safe_load((CONFIGS / "monitor.yaml").read_text())
    (callback,) = written["trainer"]["callbacks"]
    assert callback["class_path"] == "lightning_curvature.CurvatureMonitor"
    defaults = {
        name: p.default
        for name, p in inspect.signature(CurvatureMonitor.__init__).parameters.items()
        if name != "self"
    }
    # The grouped rules default to None, "AlertRules()": the YAML spells out its fields.
    defaults["alert_rules"] = dataclasses.asdict(AlertRules())
    defaults["triggers"] = dataclasses.asdict(Triggers())
    assert callback["init_args"] == defaults


def test_monitor_yaml_adds_the_monitor_to_any_model(tmp_path):
    cli = run_config(
        tmp_path,
        "monitor.yaml",
        max_steps=2,
        extra=(
            "--model=lightning_curvature.demo.DigitsClassifier",
            "--data=lightning_curvature.demo.DigitsDataModule",
            "--trainer.logger=TensorBoardLogger",
        ),
    )
    monitor = monitor_of(cli.trainer)
    assert monitor.schedule.every_n_steps is None and monitor.settings.k == 5
    tags = set(read_events(cli.trainer.logger.log_dir).Tags()["scalars"])
    assert DESIGN_TAGS | {f"curvature/eigenvalue_{i}" for i in range(1, 6)} <= tags


def test_demo_yaml_logs_lambda_max_of_the_dense_hessian(tmp_path):
    # A narrower MLP than the config's, so the dense Hessian is small.
    cli = run_config(
        tmp_path, "demo.yaml", max_steps=1, extra=("--model.init_args.hidden_sizes=[16]",)
    )
    trainer, model = cli.trainer, cli.model
    tags = set(read_events(trainer.logger.log_dir).Tags()["scalars"])
    assert DESIGN_TAGS | {f"curvature/eigenvalue_{i}" for i in range(1, 6)} <= tags
    assert "curvature/preconditioned_lambda_max" not in tags
    # Measured at step 1 on the first training batch, the model as it is now.
    hessian = dense_hessian(model.net, mse, [probe_batch(batch_size=64, targets="onehot")])
    exact = torch.linalg.eigvalsh(hessian)[-1].item()
    logged = trainer.callback_metrics
    assert logged["curvature/lambda_max"].item() == pytest.approx(exact, rel=1e-3)
    assert logged["curvature/lambda_max_x_lr"].item() == pytest.approx(0.2 * exact, rel=1e-3)
    assert logged["curvature/stability_threshold"].item() == 2.0


def test_adam_yaml_logs_the_preconditioned_sharpness_against_38(tmp_path):
    # A narrower MLP than the config's, so the dense Hessian is small.
    cli = run_config(
        tmp_path, "adam.yaml", max_steps=4, extra=("--model.init_args.hidden_sizes=[16]",)
    )
    trainer, model = cli.trainer, cli.model
    events = read_events(trainer.logger.log_dir)
    tags = set(events.Tags()["scalars"])
    adam_tags = {"curvature/preconditioned_lambda_max", "curvature/sharpness_x_lr"}
    assert DESIGN_TAGS | {"curvature/eigenvalue_1"} | adam_tags <= tags
    assert [e.step for e in events.Scalars("curvature/preconditioned_lambda_max")] == [1, 2, 4]
    assert {e.value for e in events.Scalars("curvature/stability_threshold")} == {38.0}

    # P from Adam's state after step 4, the last measurement.
    optimizer = trainer.optimizers[0]
    params = [p for p in model.parameters() if p.requires_grad]
    t = optimizer.state[params[0]]["step"].item()
    v = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in params])
    full_batch = probe_batch(num_samples=500, full_batch=True, targets="onehot")
    hessian = dense_hessian(model.net, mse, [full_batch])
    exact = preconditioned_lambda_max(hessian, adam_preconditioner(v, t))
    logged = trainer.callback_metrics
    assert logged["curvature/preconditioned_lambda_max"].item() == pytest.approx(exact, rel=1e-3)
    assert logged["curvature/stability_ratio"].item() == pytest.approx(
        exact * 1e-3 / 38.0, rel=1e-3
    )


def test_adapters_yaml_measures_only_the_adapters(tmp_path):
    cli = run_config(tmp_path, "adapters.yaml", max_steps=1)
    trainer, model = cli.trainer, cli.model
    trainable = [n for n, p in model.net.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".down", ".up")) for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1320
    tags = set(read_events(trainer.logger.log_dir).Tags()["scalars"])
    assert DESIGN_TAGS | {"curvature/eigenvalue_1"} <= tags

    def cross_entropy(net, batch):
        return F.cross_entropy(net(batch[0]), batch[1])

    hessian = dense_hessian(model.net, cross_entropy, [probe_batch(batch_size=64)])
    assert hessian.shape == (1320, 1320)  # the adapters' Hessian, not the frozen backbone's
    exact = torch.linalg.eigvalsh(hessian)[-1].item()
    logged = trainer.callback_metrics["curvature/lambda_max"].item()
    assert logged == pytest.approx(exact, rel=1e-3)
    # Heavy-ball momentum 0.9: SGD's threshold 2(1 + β) = 3.8.
    assert trainer.callback_metrics["curvature/stability_threshold"].item() == pytest.approx(3.8)


def test_lightning_curvature_fit_runs_a_config(tmp_path):
    code = main(
        [
            *("fit", "--config", str(CONFIGS / "demo.yaml"), "--trainer.max_steps=1"),
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
        ]
    )
    assert code == 0
    (run,) = (tmp_path / "demo").iterdir()
    assert "curvature/lambda_max" in read_events(run).Tags()["scalars"]
    assert (run / "config.yaml").is_file()


def test_lightning_curvature_fit_reports_a_bad_config_value(tmp_path, capsys):
    config = str(CONFIGS / "demo.yaml")
    code = main(["fit", "--config", config, "--model.init_args.loss=hinge"])
    assert code == 2
    assert "hinge" in capsys.readouterr().err
