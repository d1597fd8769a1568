"""Six optimizers, each against its own stability threshold, seen through CurvatureMonitor.

Run from the repository root::

    python benchmarks/bench_optimizers.py            # the run in PHENOMENA.md
    python benchmarks/bench_optimizers.py --quick    # a smoke run

SGD, SGD with heavy-ball momentum 0.9, SGD with Nesterov momentum 0.9, RMSprop, Adagrad
and Adam train the same model on the same data from the same initialisation: the setup of
``bench_edge_of_stability.py`` (full-batch training, MSE against one-hot targets, 1,000 of
scikit-learn's digits, the demo's 64→64→64→10 tanh MLP). Full batch, because the
thresholds are statements about the deterministic iteration; with minibatches the
gradient noise moves every curve. Each optimizer has its own relevant sharpness and
threshold, and the monitor reads both from the optimizer (``curvature/sharpness_x_lr``,
``curvature/stability_threshold``, ``curvature/stability_ratio`` = their quotient):

=========================  ===============  ===================================
optimizer                  sharpness        threshold on sharpness·η
=========================  ===============  ===================================
SGD                        λmax(H)          2
heavy ball, β = 0.9        λmax(H)          2(1+β) = 3.8
Nesterov, β = 0.9          λmax(H)          2(1+β)/(1+2β) ≈ 1.357
RMSprop (α = 0.99)         λmax(P⁻¹H)       2
Adagrad                    λmax(P⁻¹H)       2
Adam (β1 = 0.9)            λmax(P⁻¹H)       2(1+β1)/(1−β1) = 38
=========================  ===============  ===================================

The learning rates are each optimizer's own, chosen large enough that the run reaches its
edge within the budget (see ``LEARNING_RATES``); the question is whether each then stays
at *its* threshold (stability ratio ≈ 1), and what accuracy it ends with.

Monitor settings: ``every_n_steps=20, log_spaced=False, k=1, trace=False,
max_overhead=None`` (an even grid, λmax and the preconditioned λmax only, no measurement
skipped for budget). The "Edge of stability" alerts fire by design and are counted.
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
    tail_stats,
    train,
)

from lightning_curvature.callback import CurvatureMonitor
from lightning_curvature.demo import DigitsClassifier, DigitsDataModule

# label -> (DigitsClassifier's optimizer name, learning rate)
LEARNING_RATES: dict[str, tuple[str, float]] = {
    "SGD": ("sgd", 0.5),
    "heavy ball 0.9": ("momentum", 0.5),
    "Nesterov 0.9": ("nesterov", 0.2),
    "RMSprop": ("rmsprop", 1e-3),
    "Adagrad": ("adagrad", 0.05),
    "Adam": ("adam", 1e-3),
}
NUM_SAMPLES = 1000
HIDDEN = [64, 64]
EVERY = 20
FIGURE = "optimizers.png"
TAIL = 0.4  # the "final part of training" of the table: the last 40% of the steps


def run(quick: bool, logdir: str | None) -> tuple[list, int]:
    max_steps = 600 if quick else 3000
    data = DigitsDataModule(num_samples=NUM_SAMPLES, full_batch=True, targets="onehot")
    runs = []
    for label, (name, lr) in LEARNING_RATES.items():
        monitor = CurvatureMonitor(
            every_n_steps=EVERY, log_spaced=False, k=1, trace=False, max_overhead=None
        )
        runs.append(
            train(
                label,
                lambda name=name, lr=lr: DigitsClassifier(
                    hidden_sizes=HIDDEN, activation="tanh", loss="mse", optimizer=name, lr=lr
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
        steps, ratio = r.series("curvature/stability_ratio")
        ratio_mean, ratio_std = tail_stats(steps, ratio, TAIL)
        preconditioned = bool(r.series("curvature/preconditioned_lambda_max")[0])
        rows.append(
            [
                r.label,
                f"{r.learning_rate:g}",
                "λmax(P⁻¹H)" if preconditioned else "λmax(H)",
                f"{e.threshold:.4g}",
                f"{e.step_at_90:.0f}",
                f"{e.tail_mean:.3g} ± {e.tail_std:.2g}",
                f"{ratio_mean:.3f} ± {ratio_std:.3f}",
                f"{max(ratio):.3f}",
                f"{r.final_loss:.2e}",
                f"{r.train_acc:.3f}",
                f"{r.val_acc:.3f}",
                f"{r.alerts['threshold']} / {r.alerts['spike']}",
                f"{r.seconds:.0f} ({r.measure_seconds:.0f})",
            ]
        )
    headers = [
        "optimizer",
        "η",
        "sharpness",
        "threshold",
        "first step ratio ≥ 0.9",
        f"sharpness·η, last {TAIL:.0%}",
        f"stability ratio, last {TAIL:.0%}",
        "max ratio",
        "final loss",
        "train acc",
        "val acc",
        "alerts: edge / spike",
        "s (of which measuring)",
    ]
    return markdown_table(headers, rows)


def figure(runs: list, quick: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ratio, ax_raw, ax_loss) = plt.subplots(1, 3, figsize=(13, 3.7))
    for index, r in enumerate(runs):
        color = f"C{index}"
        label = f"{r.label} (η = {r.learning_rate:g})"
        steps, ratio = r.series("curvature/stability_ratio")
        ax_ratio.plot(steps, ratio, color=color, lw=1.0, label=label)
        raw_steps, raw = r.series("curvature/lambda_max")
        ax_raw.plot(raw_steps, raw, color=color, lw=1.0, label=label)
        ax_loss.plot(r.loss_steps, r.losses, color=color, lw=0.8, label=label)
    ax_ratio.axhline(1.0, color="k", ls="--", lw=0.9)
    ax_ratio.set(
        xlabel="step",
        ylabel="sharpness·η / threshold",
        title="curvature/stability_ratio (1 = own edge)",
    )
    ax_raw.set(xlabel="step", ylabel="λmax(H)", title="raw λmax")
    ax_loss.set(yscale="log", xlabel="step", ylabel="train loss (MSE)", title="train loss")
    ax_ratio.legend(fontsize=7)
    fig.suptitle(
        "Six optimizers, full batch, MSE, 1000 digits, tanh MLP 64-64: each against its own "
        "stability threshold",
        fontsize=10,
    )
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
    print(run_header("Optimizers against their own stability thresholds", args.quick, seconds))
    print(
        f"Full batch of {NUM_SAMPLES} digits (held-out: the DigitsDataModule validation split), "
        f"MSE on one-hot targets, tanh MLP 64-{'-'.join(map(str, HIDDEN))}-10, {max_steps} "
        f"steps each, same initialisation; CurvatureMonitor(every_n_steps={EVERY}, "
        f"log_spaced=False, k=1, trace=False, max_overhead=None). "
        f"Figure: {shown(path)}\n"
    )
    print(table(runs))


if __name__ == "__main__":
    main()
