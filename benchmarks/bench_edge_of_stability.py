"""Edge of stability (Cohen et al., ICLR 2021), seen through CurvatureMonitor.

Run from the repository root::

    python benchmarks/bench_edge_of_stability.py            # the run in PHENOMENA.md
    python benchmarks/bench_edge_of_stability.py --quick    # a smoke run (fewer steps)

Full-batch gradient descent (``torch.optim.SGD``, no momentum) with MSE against one-hot
targets, on 1,000 of scikit-learn's digits and the demo's 64→64→64→10 tanh MLP
(``lightning_curvature.demo``), at several learning rates η from the same initialisation.
The paper's two claims are checked on the monitor's own ``curvature/lambda_max`` and
``curvature/lambda_max_x_lr``:

* progressive sharpening: λmax rises from its value at initialisation until it reaches
  2/η;
* the edge of stability: it then hovers at 2/η (λmax·η ≈ 2) while the loss keeps falling,
  non-monotonically.

Monitor settings, and why:

* ``every_n_steps=25, log_spaced=False``: an even grid dense enough to see the approach
  to 2/η; the log-spaced early steps add nothing on a curve that starts flat.
* ``k=1, trace=False``: only λmax is needed; with the warm start (the previous top
  eigenvector) Lanczos then takes a handful of Hessian-vector products per measurement.
* ``max_overhead=None``: the default 5% budget would skip measurements whenever the
  tiny model's step is cheaper than a measurement, leaving holes in the curve.
* the probe batch is the monitor's default ``probe="fixed"``: the first training batch,
  which in full-batch training is the whole training set, so λmax is the sharpness of
  the very loss gradient descent minimises.

The monitor's "Edge of stability" alert fires in these runs by design; the alerts are
counted (a column of the table), not shown.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _phenomena import (
    configure_torch,
    edge_summary,
    markdown_table,
    run_header,
    save_figure,
    shown,
    train,
)

from lightning_curvature.callback import CurvatureMonitor
from lightning_curvature.demo import DigitsClassifier, DigitsDataModule

LEARNING_RATES = (0.25, 0.4, 0.5, 1.0)
NUM_SAMPLES = 1000
HIDDEN = [64, 64]
FIGURE = "edge_of_stability.png"
TAIL = 0.4  # the "final part of training" of the table: the last 40% of the steps


def run(quick: bool, logdir: str | None) -> tuple[list, float]:
    max_steps = 1500 if quick else 10_000
    every = 25
    data = DigitsDataModule(num_samples=NUM_SAMPLES, full_batch=True, targets="onehot")
    runs = []
    for lr in LEARNING_RATES:
        monitor = CurvatureMonitor(
            every_n_steps=every, log_spaced=False, k=1, trace=False, max_overhead=None
        )
        runs.append(
            train(
                f"GD lr={lr:g}",
                lambda lr=lr: DigitsClassifier(
                    hidden_sizes=HIDDEN, activation="tanh", loss="mse", optimizer="sgd", lr=lr
                ),
                data,
                max_steps,
                monitor,
                logdir=logdir,
            )
        )
    return runs, max_steps


def table(runs: list) -> str:
    rows = []
    for r in runs:
        e = edge_summary(r, TAIL)
        rows.append(
            [
                f"{r.learning_rate:g}",
                f"{e.threshold / r.learning_rate:.3g}",
                f"{e.first_sharpness:.3f}",
                f"{e.step_at_90:.0f}",
                f"{e.step_at_edge:.0f}",
                f"{e.tail_mean:.3f} ± {e.tail_std:.3f}",
                f"{e.max_value:.3f}",
                f"{r.final_loss:.2e}",
                f"{r.loss_increases(TAIL):.0%}",
                f"{r.train_acc:.3f} / {r.val_acc:.3f}",
                f"{r.alerts['threshold']} / {r.alerts['spike']}",
                f"{len(r.history)}",
                f"{r.seconds:.0f} ({r.measure_seconds:.0f})",
            ]
        )
    headers = [
        "η",
        "2/η",
        "λmax at first measurement",
        "first step λmax·η ≥ 0.9·2",
        "first step λmax·η ≥ 2",
        f"λmax·η over last {TAIL:.0%} (mean ± std)",
        "max λmax·η",
        "final loss",
        f"steps with loss up, last {TAIL:.0%}",
        "train / val acc",
        "alerts: edge / spike",
        "measurements",
        "s (of which measuring)",
    ]
    return markdown_table(headers, rows)


def figure(runs: list, quick: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_sharp, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    for index, r in enumerate(runs):
        color = f"C{index}"
        steps, sharp = r.series("curvature/lambda_max")
        ax_sharp.plot(steps, sharp, color=color, lw=1.2, label=f"η = {r.learning_rate:g}")
        ax_sharp.axhline(2.0 / r.learning_rate, color=color, ls="--", lw=0.9)
        ax_loss.plot(r.loss_steps, r.losses, color=color, lw=0.8, label=f"η = {r.learning_rate:g}")
    ax_sharp.set(
        xlabel="step",
        ylabel="λmax (curvature/lambda_max)",
        title="λmax rises to 2/η (dashed) and stays there",
    )
    ax_loss.set(yscale="log", xlabel="step", ylabel="train loss (MSE)", title="train loss")
    ax_sharp.legend(fontsize=8)
    ax_loss.legend(fontsize=8)
    fig.suptitle("Full-batch GD, MSE, 1000 digits, tanh MLP 64-64: edge of stability", fontsize=10)
    fig.tight_layout()
    path = save_figure(fig, FIGURE, quick)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with fewer steps")
    parser.add_argument("--logdir", default=None, help="also write TensorBoard runs here")
    args = parser.parse_args()
    configure_torch()
    started = time.perf_counter()
    runs, max_steps = run(args.quick, args.logdir)
    seconds = time.perf_counter() - started
    path = figure(runs, args.quick)
    print(run_header("Edge of stability: full-batch gradient descent", args.quick, seconds))
    print(
        f"SGD (no momentum), full batch of {NUM_SAMPLES} digits, MSE on one-hot targets, "
        f"tanh MLP 64-{'-'.join(map(str, HIDDEN))}-10, {max_steps} steps per η; "
        "CurvatureMonitor(every_n_steps=25, log_spaced=False, k=1, trace=False, "
        f"max_overhead=None). Figure: {shown(path)}\n"
    )
    print(table(runs))


if __name__ == "__main__":
    main()
