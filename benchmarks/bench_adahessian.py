"""Benchmark: AdaHessian against torch-optimizer's Adahessian, Adam and SGD on digits.

Run from the repository root::

    python benchmarks/bench_adahessian.py          # the run recorded in RESULTS.md (minutes)
    python benchmarks/bench_adahessian.py --quick  # a smoke run

Data: scikit-learn's ``load_digits`` (1,797 8×8 images, 10 classes), standardised, split
1,437 train / 360 test with a fixed seed. Models: an MLP 64-64-10 with tanh, and a small CNN
(Conv 1→8 3×3, tanh, 2×2 max-pool, Conv 8→16 3×3, tanh, Linear 64→10). Minibatches of 64,
float32, one thread.

1. **Time per step** (mean over steps after a warm-up: with ``update_each`` the steps
   differ, and the mean is what a run pays): forward, backward (with
   ``create_graph=True`` for the AdaHessian variants) and ``optimizer.step()``, for Adam,
   torch-optimizer's ``Adahessian`` and ``lc.optim.AdaHessian`` (1 probe per step), plus
   ``lc.optim.AdaHessian(update_each=4)``.
2. **Loss curves** of SGD (momentum 0.9), Adam and ``lc.optim.AdaHessian``, each at the best
   of three learning rates (by final training loss), same initialisation and batch order;
   the training loss every step (smoothed over 20 steps in the figure) and the test
   accuracy at the end. The figure is ``benchmarks/figures/adahessian.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch_optimizer
from matplotlib.figure import Figure
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_engine import machine
from lightning_curvature.optim import AdaHessian

BATCH = 64
LEARNING_RATES = {
    "SGD": (0.03, 0.1, 0.3),
    "Adam": (1e-3, 3e-3, 1e-2),
    "AdaHessian": (0.05, 0.15, 0.5),
}


def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    inputs = (data.data - data.data.mean()) / data.data.std()
    order = np.random.default_rng(0).permutation(len(inputs))
    inputs = torch.tensor(inputs[order], dtype=torch.float32)
    targets = torch.tensor(data.target[order], dtype=torch.long)
    return (inputs[:1437], targets[:1437]), (inputs[1437:], targets[1437:])


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, 10),
    )


def make_optimizer(name: str, params, lr: float):
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "AdaHessian":
        return AdaHessian(params, lr=lr)
    if name == "AdaHessian (update_each=4)":
        return AdaHessian(params, lr=lr, update_each=4)
    if name == "torch_optimizer.Adahessian":
        return torch_optimizer.Adahessian(params, lr=lr, hessian_power=1.0)
    raise ValueError(name)


def batches(train, steps: int, seed: int = 0):
    inputs, targets = train
    generator = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < steps:
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order) - BATCH + 1, BATCH):
            index = order[start : start + BATCH]
            out.append((inputs[index], targets[index]))
    return out[:steps]


def train(build, name, lr, data, steps):
    torch.manual_seed(0)
    model = build()
    optimizer = make_optimizer(name, model.parameters(), lr)
    hessian = "hessian" in name.lower()
    losses, times = [], []
    for step, (inputs, targets) in enumerate(batches(data[0], steps)):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(inputs), targets)
        needs_graph = hessian and (name != "AdaHessian (update_each=4)" or step % 4 == 0)
        loss.backward(create_graph=needs_graph)
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if not np.isfinite(losses[-1]):
            break
    with torch.no_grad():
        inputs, targets = data[1]
        accuracy = float((model(inputs).argmax(1) == targets).float().mean())
    return losses, accuracy, times


def time_per_step(build, data, steps):
    rows = {}
    for name, lr in (
        ("Adam", 1e-3),
        ("torch_optimizer.Adahessian", 0.15),
        ("AdaHessian", 0.15),
        ("AdaHessian (update_each=4)", 0.15),
    ):
        _, _, times = train(build, name, lr, data, steps)
        rows[name] = statistics.mean(times[10:])
    return rows


def curves(build, data, steps):
    results = {}
    for name, lrs in LEARNING_RATES.items():
        best = None
        for lr in lrs:
            losses, accuracy, _ = train(build, name, lr, data, steps)
            final = float(np.mean(losses[-50:])) if len(losses) == steps else float("inf")
            if best is None or final < best["final"]:
                best = {"lr": lr, "losses": losses, "accuracy": accuracy, "final": final}
        results[name] = best
    return results


def figure(all_curves, path: Path) -> None:
    fig = Figure(figsize=(10, 4))
    for index, (model_name, results) in enumerate(all_curves.items()):
        ax = fig.add_subplot(1, len(all_curves), index + 1)
        for name, best in results.items():
            losses = np.asarray(best["losses"])
            window = 20
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(
                np.arange(window, len(losses) + 1),
                smooth,
                label=f"{name} (lr {best['lr']:g}, test acc {best['accuracy']:.3f})",
            )
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (20-step mean)")
        ax.set_title(f"digits, {model_name}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = 60 if args.quick else 600
    data = digits()
    print(f"Machine: {machine()}\n")
    all_curves = {}
    for model_name, build in (("MLP 64-64-10", mlp), ("CNN", cnn)):
        timing = time_per_step(build, data, 40 if args.quick else 200)
        print(f"### {model_name}: milliseconds per step (mean)\n")
        print("| optimizer | ms/step | vs Adam |\n|---|---|---|")
        for name, seconds in timing.items():
            print(f"| {name} | {1e3 * seconds:.2f} | {seconds / timing['Adam']:.2f}× |")
        results = curves(build, data, steps)
        all_curves[model_name] = results
        print(f"\n### {model_name}: {steps} steps, best of three learning rates\n")
        print("| optimizer | lr | final train loss (last 50 steps) | test accuracy |")
        print("|---|---|---|---|")
        for name, best in results.items():
            print(f"| {name} | {best['lr']:g} | {best['final']:.4f} | {best['accuracy']:.3f} |")
        print(flush=True)
    if not args.quick:
        figure(all_curves, Path(__file__).resolve().parent / "figures" / "adahessian.png")


if __name__ == "__main__":
    main()
