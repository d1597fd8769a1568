"""The Hessian, the Gauss-Newton matrix and the Fisher of the demo, side by side.

Run from the repository root (after ``pip install -e ".[bench]"``)::

    python benchmarks/bench_curvatures.py            # writes figures/curvatures.png
    python benchmarks/bench_curvatures.py --quick    # a smoke run

The progressive-sharpening demo (a 64→64→64→10 tanh MLP on the digits, MSE against one-hot
targets, minibatch SGD at η = 0.2, batch 64) trained once with three monitors in its
callbacks: ``CurvatureMonitor()`` on the Hessian, ``curvature="ggn"`` (tag prefix ``ggn``)
and ``curvature="fisher"`` (the true Fisher, one Monte Carlo draw; prefix ``fisher``), each
measuring λmax on the same fixed probe batch every ``--every`` steps. With MSE,
H = G + Σ_k (∂ℓ/∂f_k)·∇²f_k: the residual term shrinks as the fit improves, so λmax(H) and
λmax(G) meet, and E[F] = G (the true Fisher of the Gaussian likelihood behind MSE).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
from bench_engine import machine
from matplotlib.figure import Figure

from lightning_curvature import CurvatureMonitor
from lightning_curvature._lightning import pl
from lightning_curvature.demo import DigitsClassifier, DigitsDataModule

FIGURES = Path(__file__).resolve().parent / "figures"


def run(max_steps: int, every: int) -> dict[str, list[tuple[int, float]]]:
    common = dict(every_n_steps=every, log_spaced=False, k=1, trace=False)
    monitors = {
        "curvature": CurvatureMonitor(**common),
        "ggn": CurvatureMonitor(
            **common, curvature="ggn", loss_from_output="mse", tag_prefix="ggn"
        ),
        "fisher": CurvatureMonitor(
            **common, curvature="fisher", loss_from_output="mse", tag_prefix="fisher"
        ),
    }
    torch.manual_seed(0)
    model = DigitsClassifier(
        hidden_sizes=[64, 64], activation="tanh", loss="mse", optimizer="sgd", lr=0.2
    )
    data = DigitsDataModule(batch_size=64, targets="onehot")
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(monitors.values()),
        default_root_dir=tempfile.mkdtemp(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    return {
        prefix: [
            (int(h["step"]), h[f"{prefix}/lambda_max"])
            for h in monitor.history
            if f"{prefix}/lambda_max" in h
        ]
        for prefix, monitor in monitors.items()
    }


def figure(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    axis = fig.subplots()
    labels = {"curvature": "Hessian H", "ggn": "Gauss-Newton G", "fisher": "true Fisher F"}
    for prefix, points in curves.items():
        steps, values = zip(*points, strict=True)
        axis.plot(steps, values, label=labels[prefix], lw=1.5)
    axis.set_xlabel("step")
    axis.set_ylabel("λmax on the probe batch")
    axis.set_title("The demo's curvature three ways (MSE, SGD η = 0.2)")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps, every = (200, 50) if args.quick else (args.steps, args.every)
    started = time.perf_counter()
    curves = run(steps, every)
    seconds = time.perf_counter() - started
    print(f"Machine: {machine()}; {steps} steps, λmax every {every}, {seconds:.0f} s")
    print("| step | λmax(H) | λmax(G) | λmax(F) |")
    print("|---:|---:|---:|---:|")
    by_step = {prefix: dict(points) for prefix, points in curves.items()}
    for step in sorted(by_step["curvature"]):
        row = [by_step[p].get(step, float("nan")) for p in ("curvature", "ggn", "fisher")]
        print(f"| {step} | {row[0]:.4g} | {row[1]:.4g} | {row[2]:.4g} |")
    path = (
        Path(tempfile.gettempdir()) / "curvatures.png"
        if args.quick
        else FIGURES / ("curvatures.png")
    )
    figure(curves, path)
    print(f"Figure: {path}")


if __name__ == "__main__":
    main()
