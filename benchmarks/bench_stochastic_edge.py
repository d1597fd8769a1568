"""Edge of stochastic stability (Andreyev & Beneventano, 2024), seen through CurvatureMonitor.

Run from the repository root::

    python benchmarks/bench_stochastic_edge.py            # the run in PHENOMENA.md
    python benchmarks/bench_stochastic_edge.py --quick    # a smoke run (fewer steps)

Minibatch SGD (plain ``torch.optim.SGD``, no momentum) with MSE against one-hot targets on
1,024 of scikit-learn's digits and the demo's 64→64→64→10 tanh MLP, at batch 16, 64 and
256 with the same η and the same initialisation. The claim checked: under minibatch SGD it
is the *batch sharpness* — the mean over minibatches b of g_bᵀH_b g_b / g_bᵀg_b, the
curvature of each minibatch's loss along its own gradient — that rises to 2/η and settles
there, while λmax of the full loss stays below 2/η, the further below the smaller the batch.

The monitor reads all three from one track measurement (``curvature/lambda_max_x_lr``,
``curvature/batch_sharpness_x_lr``, ``curvature/directional_sharpness_x_lr``). Its probe
batches are ``probe_dataloader``: the training set in a fixed order, cut into batches of the
training batch size, so ``batch_sharpness`` is the mean over those minibatches (the paper's
quantity at the batch size trained with) and λmax is that of their mean loss: the whole
1,024 samples at batch 64 and 256, the first 256 samples (16 batches, to bound the cost)
at batch 16. ``every_n_steps`` fixed, ``log_spaced=False``, ``k=1, trace=False``,
``max_overhead=None`` (no measurement skipped).

A second callback recomputes batch sharpness at every measurement with plain autograd
(double backward on each probe batch): as the monitor defines it, the mean of the per-batch
ratios (an independent check of the logged number), and as the ratio of the means
E_b[g_bᵀH_b g_b] / E_b[g_bᵀg_b], where batches with large gradients weigh more.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _phenomena import (
    configure_torch,
    markdown_table,
    run_header,
    save_figure,
    shown,
    tail_stats,
    train,
)
from matplotlib.figure import Figure
from torch.nn import functional as F
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from lightning_curvature._lightning import Callback
from lightning_curvature.callback import CurvatureMonitor
from lightning_curvature.demo import DigitsClassifier, DigitsDataModule

BATCH_SIZES = (16, 64, 256)
LR = 1.0
NUM_SAMPLES = 1024
MAX_PROBE_BATCHES = 16
HIDDEN = [64, 64]
FIGURE = "stochastic_edge.png"
TAIL = 0.4
TAGS = {
    "λmax·η": "curvature/lambda_max_x_lr",
    "batch sharpness·η": "curvature/batch_sharpness_x_lr",
    "directional sharpness·η": "curvature/directional_sharpness_x_lr",
}


class BatchSharpnessCheck(Callback):
    """After each of the monitor's measurements (it runs first in ``callbacks``): batch
    sharpness from plain double backward on the same probe batches, two ways."""

    def __init__(self, monitor: CurvatureMonitor, lr: float) -> None:
        self.monitor, self.lr = monitor, lr
        self.rows: list[tuple[float, float, float, float]] = []  # step, monitor, mean, ratio

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        history = self.monitor.history
        if not history or int(history[-1]["step"]) != trainer.global_step:
            return
        logged = history[-1].get("curvature/batch_sharpness_x_lr", float("nan"))
        params = [p for p in pl_module.parameters() if p.requires_grad]
        curvatures, norms = [], []
        for inputs, targets in self.monitor.probes.batches(pl_module.device):
            loss = F.mse_loss(pl_module(inputs), targets)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            g = torch.cat([x.reshape(-1) for x in grads])
            hg = torch.autograd.grad(g @ g.detach(), params)  # ∇(gᵀg₀) = H g₀
            curvatures.append(float(g.detach() @ torch.cat([x.reshape(-1) for x in hg])))
            norms.append(float(g.detach() @ g.detach()))
        mean_of_ratios = statistics.fmean(c / n for c, n in zip(curvatures, norms, strict=True))
        ratio_of_means = sum(curvatures) / sum(norms)
        step = float(trainer.global_step)
        self.rows.append((step, logged, mean_of_ratios * self.lr, ratio_of_means * self.lr))


def run(quick: bool) -> tuple[list, int, int]:
    max_steps = 400 if quick else 3000
    every = 20 if quick else 50
    runs = []
    for batch_size in BATCH_SIZES:
        data = DigitsDataModule(batch_size=batch_size, num_samples=NUM_SAMPLES, targets="onehot")
        data.setup("fit")
        probe = DataLoader(
            data.train_set,
            sampler=BatchSampler(SequentialSampler(data.train_set), batch_size, drop_last=True),
            batch_size=None,
        )
        monitor = CurvatureMonitor(
            every_n_steps=every,
            log_spaced=False,
            k=1,
            trace=False,
            max_overhead=None,
            probe_dataloader=probe,
            num_batches=min(NUM_SAMPLES // batch_size, MAX_PROBE_BATCHES),
        )
        check = BatchSharpnessCheck(monitor, LR)
        result = train(
            f"SGD batch {batch_size}",
            lambda: DigitsClassifier(
                hidden_sizes=HIDDEN, activation="tanh", loss="mse", optimizer="sgd", lr=LR
            ),
            data,
            max_steps,
            monitor,
            extra_callbacks=[check],
        )
        result.extra["batch_size"] = batch_size
        result.extra["check"] = check.rows
        runs.append(result)
    return runs, max_steps, every


def table(runs: list) -> str:
    rows = []
    for r in runs:
        cells = [f"{r.extra['batch_size']}", f"{r.learning_rate:g}"]
        for tag in TAGS.values():
            steps, values = r.series(tag)
            mean, std = tail_stats(steps, values, TAIL)
            cells.append(f"{mean:.2f} ± {std:.2f}")
        steps, lam = r.series("curvature/lambda_max_x_lr")
        _, batch = r.series("curvature/batch_sharpness_x_lr")
        ratio = statistics.median(b / lm for b, lm in zip(batch, lam, strict=True))
        check = r.extra["check"]
        agreement = max(abs(m - mine) / abs(mine) for _, m, mine, _ in check)
        ratio_steps = [row[0] for row in check]
        mean, std = tail_stats(ratio_steps, [row[3] for row in check], TAIL)
        cells += [
            f"{mean:.2f} ± {std:.2f}",
            f"{agreement:.1e}",
            f"{ratio:.2f}",
            f"{max(lam):.2f}",
            f"{r.final_loss:.2e}",
            f"{r.train_acc:.3f} / {r.val_acc:.3f}",
            f"{len(r.history)}",
            f"{r.seconds:.0f} ({r.measure_seconds:.0f})",
        ]
        rows.append(cells)
    headers = [
        "batch",
        "η",
        *(f"{name}, last {TAIL:.0%} (mean ± std)" for name in TAGS),
        f"ratio-of-means batch sharpness·η, last {TAIL:.0%}",
        "monitor's batch sharpness vs autograd, max rel. diff.",
        "batch sharpness / λmax (median)",
        "max λmax·η",
        "final loss",
        "train / val acc",
        "measurements",
        "s (of which measuring)",
    ]
    return markdown_table(headers, rows)


def figure(runs: list, quick: bool) -> Path:
    fig = Figure(figsize=(12, 3.6))
    axes = fig.subplots(1, len(runs), sharey=True)
    for ax, r in zip(axes, runs, strict=True):
        for index, (name, tag) in enumerate(TAGS.items()):
            steps, values = r.series(tag)
            ax.plot(steps, values, color=f"C{index}", lw=1.0, label=name)
        check = r.extra["check"]
        ax.plot(
            [row[0] for row in check],
            [row[3] for row in check],
            color="C1",
            ls=":",
            lw=1.0,
            label="batch sharpness·η, ratio of means",
        )
        ax.axhline(2.0, color="k", ls="--", lw=0.8, label="2 (GD's edge)")
        ax.set(xlabel="step", title=f"batch {r.extra['batch_size']}, η = {r.learning_rate:g}")
    axes[0].set_ylabel("sharpness × η")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "Minibatch SGD, MSE, 1,024 digits, tanh MLP 64-64: λmax, batch and directional "
        "sharpness × η",
        fontsize=10,
    )
    fig.tight_layout()
    return save_figure(fig, FIGURE, quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with fewer steps")
    args = parser.parse_args()
    configure_torch()
    started = time.perf_counter()
    runs, max_steps, every = run(args.quick)
    seconds = time.perf_counter() - started
    path = figure(runs, args.quick)
    print(run_header("Edge of stochastic stability: minibatch SGD", args.quick, seconds))
    print(
        f"SGD (no momentum), η = {LR}, {NUM_SAMPLES} digits, MSE on one-hot targets, tanh MLP "
        f"64-{'-'.join(map(str, HIDDEN))}-10, {max_steps} steps per batch size; "
        f"CurvatureMonitor(every_n_steps={every}, log_spaced=False, k=1, trace=False, "
        "max_overhead=None, probe_dataloader=<training set in order, same batch size>). "
        f"Figure: {shown(path)}\n"
    )
    print(table(runs))


if __name__ == "__main__":
    main()
