"""Overhead of CurvatureMonitor in a real Lightning Trainer: wall time with and without it.

Run from the repository root (after ``pip install -e ".[bench]"``)::

    python benchmarks/bench_overhead.py            # the run recorded in RESULTS.md
    python benchmarks/bench_overhead.py --quick    # a smoke run

Two models on scikit-learn's bundled digits (minibatch SGD with momentum, batch 64): a
tanh MLP 64→256→256→10 (85k parameters) and a small CNN on the 8×8 images. Each is trained
for a fixed number of steps without the monitor, with the monitor at its defaults (5%
overhead budget), and with ``every_n_steps`` of 1, 16, 64 and 256 with the budget off (the
raw cost of that schedule), both for λmax alone (``k=1, trace=False``: what Cockpit's
factors track) and for the full default measurement (top-5 and the trace). Cockpit's
published factors for tracking λmax are 21× at every step, 6.1× every 4, 2.3× every 16,
1.3× every 64 and 1.1× every 256.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import CurvatureMonitor
from lightning_curvature._lightning import pl

COCKPIT = {1: 21.0, 4: 6.1, 16: 2.3, 64: 1.3, 256: 1.1}


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 256),
        nn.Tanh(),
        nn.Linear(256, 256),
        nn.Tanh(),
        nn.Linear(256, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 16, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def data() -> DataLoader:
    inputs, targets = load_digits(return_X_y=True)
    images = torch.tensor(inputs / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    dataset = TensorDataset(images, torch.tensor(targets))
    return DataLoader(
        dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def train_seconds(make_net, steps: int, monitor: CurvatureMonitor | None) -> float:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor] if monitor else [],
    )
    module = Module(make_net())
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    steps = 256 if args.quick else 1024
    print(f"Training steps per run: {steps} (batch 64, digits). Device: CPU, 2 threads.\n")
    print(
        "| model | monitor | wall s | × no monitor | measurements | matvecs each "
        "| measuring / rest of the run | Cockpit λmax |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    # "λmax only" is what Cockpit's published factors track; "full" is our default
    # measurement (top-5, trace with 10 probes), with the overhead budget switched off.
    lambda_max_only = {"k": 1, "trace": False}
    for name, make_net in (("MLP 85k", mlp), ("CNN 45k", cnn)):
        train_seconds(make_net, 20, None)  # warm-up
        baseline = statistics.median(train_seconds(make_net, steps, None) for _ in range(3))
        print(f"| {name} | none | {baseline:.2f} | 1.00 | 0 | — | — | — |")
        configs = [("defaults (5% budget)", {}, None)]
        for what, extra in (("λmax only", lambda_max_only), ("full", {})):
            configs += [
                (
                    f"{what}, every {n}",
                    {"every_n_steps": n, "log_spaced": False, "max_overhead": None, **extra},
                    n,
                )
                for n in (1, 16, 64, 256)
            ]
        for label, kwargs, every in configs:
            monitor = CurvatureMonitor(**kwargs)
            seconds = train_seconds(make_net, steps, monitor)
            matvecs = statistics.mean(h["curvature/num_matvecs"] for h in monitor.history)
            cockpit = f"{COCKPIT[every]:.1f}×" if every in COCKPIT else "—"
            print(
                f"| {name} | {label} | {seconds:.2f} | {seconds / baseline:.2f} | "
                f"{len(monitor.history)} | {matvecs:.1f} | "
                f"{monitor.measure_seconds / (seconds - monitor.measure_seconds):.3f} | {cockpit} |"
            )


if __name__ == "__main__":
    main()
