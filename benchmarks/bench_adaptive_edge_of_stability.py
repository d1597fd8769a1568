"""Adaptive edge of stability (Cohen et al., 2022), seen through CurvatureMonitor.

Run from the repository root::

    python benchmarks/bench_adaptive_edge_of_stability.py            # the run in PHENOMENA.md
    python benchmarks/bench_adaptive_edge_of_stability.py --quick    # a smoke run

Full-batch Adam (β1 = 0.9, β2 = 0.999, torch's default ε = 1e-8) on the setup of
``bench_edge_of_stability.py``: MSE against one-hot targets, 1,000 of scikit-learn's
digits, the demo's 64→64→64→10 tanh MLP. For Adam the sharpness that matters is the top
eigenvalue of the preconditioned Hessian P⁻¹H, P = (1−β1ᵗ)·diag(√v̂ + ε) read from the
optimizer's state; frozen, Adam is heavy-ball momentum on P⁻¹H and is stable while
λmax(P⁻¹H)·η < 2(1+β1)/(1−β1) = 38. The paper finds that λmax(P⁻¹H) rises to 38/η and
hovers there, while the raw λmax stays far below GD's 2/η. The monitor logs
``curvature/preconditioned_lambda_max``, ``curvature/sharpness_x_lr`` (it times η) and
``curvature/stability_threshold`` (38), which are what this script reads.

Choices, and why:

* ε = 1e-8 (torch's default, which the demo's ``optimizer="adam"`` uses): small against
  √v̂ for almost every weight, so P is Adam's real preconditioner. (Weights fed by pixels
  that are 0 in every image get no gradient at all; their v is 0 and their P is ε, but
  their rows of H are 0 too, so they add nothing to λmax(P⁻¹H).)
* η = 5e-4, 1e-3 and 2e-3 instead of the paper's smaller rates and longer runs: the
  plateau is reached within a few hundred steps, so a run takes about a minute on a CPU.
* Monitor: ``every_n_steps=20, log_spaced=False``, ``k=1, trace=False`` (λmax of H and of
  P⁻¹H are all that is read), ``max_overhead=None`` (no measurement skipped for budget);
  the probe batch is the whole training set (full batch), so both sharpnesses are those
  of the loss Adam minimises.

The monitor's "Edge of stability" alert fires by design; alerts are counted, not shown.
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

LEARNING_RATES = (5e-4, 1e-3, 2e-3)
NUM_SAMPLES = 1000
HIDDEN = [64, 64]
EVERY = 20
FIGURE = "adaptive_edge_of_stability.png"
TAIL = 0.4  # the "final part of training" of the table: the last 40% of the steps


def run(quick: bool, logdir: str | None) -> tuple[list, int]:
    max_steps = 600 if quick else 4000
    data = DigitsDataModule(num_samples=NUM_SAMPLES, full_batch=True, targets="onehot")
    runs = []
    for lr in LEARNING_RATES:
        monitor = CurvatureMonitor(
            every_n_steps=EVERY, log_spaced=False, k=1, trace=False, max_overhead=None
        )
        runs.append(
            train(
                f"Adam lr={lr:g}",
                lambda lr=lr: DigitsClassifier(
                    hidden_sizes=HIDDEN, activation="tanh", loss="mse", optimizer="adam", lr=lr
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
        steps, raw = r.series("curvature/lambda_max")
        raw_mean, _ = tail_stats(steps, raw, TAIL)
        rows.append(
            [
                f"{r.learning_rate:g}",
                f"{e.threshold:g}",
                f"{e.threshold / r.learning_rate:.3g}",
                f"{e.step_at_90:.0f}",
                f"{e.step_at_edge:.0f}",
                f"{e.tail_mean:.2f} ± {e.tail_std:.2f}",
                f"{e.max_value:.2f}",
                f"{raw[0]:.2f} → {raw_mean:.2f}",
                f"{raw_mean * r.learning_rate:.4f}",
                f"{r.final_loss:.2e}",
                f"{r.loss_increases(TAIL):.0%}",
                f"{r.train_acc:.3f} / {r.val_acc:.3f}",
                f"{r.alerts['threshold']} / {r.alerts['spike']}",
                f"{r.seconds:.0f} ({r.measure_seconds:.0f})",
            ]
        )
    headers = [
        "η",
        "threshold",
        "38/η",
        "first step λ(P⁻¹H)·η ≥ 0.9·38",
        "first step λ(P⁻¹H)·η ≥ 38",
        f"λ(P⁻¹H)·η over last {TAIL:.0%} (mean ± std)",
        "max λ(P⁻¹H)·η",
        f"raw λmax: first → mean of last {TAIL:.0%}",
        "raw λmax·η (GD's edge: 2)",
        "final loss",
        f"steps with loss up, last {TAIL:.0%}",
        "train / val acc",
        "alerts: edge / spike",
        "s (of which measuring)",
    ]
    return markdown_table(headers, rows)


def figure(runs: list, quick: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_pre, ax_raw, ax_loss) = plt.subplots(1, 3, figsize=(13, 3.8))
    for index, r in enumerate(runs):
        color = f"C{index}"
        label = f"η = {r.learning_rate:g}"
        steps, product = r.series("curvature/sharpness_x_lr")
        ax_pre.plot(steps, product, color=color, lw=1.0, label=label)
        raw_steps, raw = r.series("curvature/lambda_max")
        ax_raw.plot(raw_steps, raw, color=color, lw=1.0, label=label)
        ax_loss.plot(r.loss_steps, r.losses, color=color, lw=0.8, label=label)
    ax_pre.axhline(runs[0].threshold, color="k", ls="--", lw=0.9, label="38")
    ax_pre.set(
        xlabel="step",
        ylabel="λmax(P⁻¹H)·η (curvature/sharpness_x_lr)",
        title="preconditioned sharpness·η settles at 38",
    )
    ax_raw.set(xlabel="step", ylabel="λmax(H) (curvature/lambda_max)", title="raw λmax")
    ax_loss.set(yscale="log", xlabel="step", ylabel="train loss (MSE)", title="train loss")
    for ax in (ax_pre, ax_raw, ax_loss):
        ax.legend(fontsize=8)
    fig.suptitle(
        "Full-batch Adam (β1 = 0.9, ε = 1e-8), MSE, 1000 digits, tanh MLP 64-64: "
        "adaptive edge of stability",
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
    print(run_header("Adaptive edge of stability: full-batch Adam", args.quick, seconds))
    print(
        f"Adam (β1 = 0.9, β2 = 0.999, ε = 1e-8), full batch of {NUM_SAMPLES} digits, MSE on "
        f"one-hot targets, tanh MLP 64-{'-'.join(map(str, HIDDEN))}-10, {max_steps} steps per "
        f"η; CurvatureMonitor(every_n_steps={EVERY}, log_spaced=False, k=1, trace=False, "
        f"max_overhead=None). Figure: {shown(path)}\n"
    )
    print(table(runs))


if __name__ == "__main__":
    main()
