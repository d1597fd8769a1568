"""Overhead of CurvatureMonitor in a real Lightning Trainer, and the track tier's accuracy.

Run from the repository root (after ``pip install -e ".[bench]"``)::

    python benchmarks/bench_overhead.py            # the run recorded in RESULTS.md
    python benchmarks/bench_overhead.py --quick    # a smoke run (300 steps, one repeat)
    python benchmarks/bench_overhead.py --profile  # also cProfile one run every 16 steps

The run: a tanh MLP 64→256→256→10 (85k parameters) on scikit-learn's digits, batch 64,
SGD with momentum 0.9, 2,000 optimizer steps, one torch thread, no logger. Each schedule is
trained several times, interleaved with runs without the monitor (the machine is shared,
so its speed drifts); the table reports medians and ratios of medians:

* ``CurvatureMonitor()``: the defaults (cadence calibrated once to ``max_overhead=0.05``,
  log-spaced points 1, 2, 4, ... below it, a full measurement every 8th cadence point);
  the same with ``log_spaced=False``; and the log-spaced part alone, from the first run's
  own per-measurement seconds;
* an explicit ``every_n_steps`` of 16, 64 and 256 (``log_spaced=False``: 2000 // n points),
  and every 64 with ``full_every=1`` (every point a full one: top 5 and the trace).
  Cockpit's published factors for tracking λmax: 2.3× every 16, 1.3× every 64, 1.1× every
  256.

Then one untimed run checks the track tier: after each measurement a small callback reruns
a cold ``lanczos(op, k=1, tol=1e-4)`` on the same module and probe batch, and compares.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time
import warnings
from typing import Any

import torch
from bench_engine import machine
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import CurvatureMonitor, HessianOperator, lanczos
from lightning_curvature._lightning import Callback, pl

COCKPIT = {16: 2.3, 64: 1.3, 256: 1.1}
BATCH = 64
LR = 0.05
OPTIMIZER = "sgd"  # --optimizer adam: Adam at lr 1e-3 (its track tier measures λmax(P⁻¹H))


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return cross_entropy(self, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if OPTIMIZER == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


def cross_entropy(module: Module, batch: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(module.net(batch[0]), batch[1])


def data() -> DataLoader:
    inputs, targets = load_digits(return_X_y=True)
    dataset = TensorDataset(torch.tensor(inputs / 16.0, dtype=torch.float32), torch.tensor(targets))
    return DataLoader(
        dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def fit(steps: int, callbacks: list[Callback]) -> tuple[float, float, Module]:
    """Train a fresh, seeded module for ``steps`` steps; the wall and CPU seconds of ``fit``
    (on a shared machine the CPU time of this process is the steadier of the two)."""
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    module = Module()
    started, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data())
    return time.perf_counter() - started, time.process_time() - cpu, module


def is_full(row: dict[str, float]) -> bool:
    """A full measurement logs the top k (track logs only λmax)."""
    return "curvature/eigenvalue_1" in row or "curvature/trace" in row


def configs() -> list[tuple[str, dict[str, Any] | None]]:
    return [
        ("none", None),
        ("defaults: CurvatureMonitor()", {}),
        ("every_n_steps=64", {"every_n_steps": 64, "log_spaced": False}),
        ("none", None),
        ("defaults, log_spaced=False", {"log_spaced": False}),
        ("every_n_steps=16", {"every_n_steps": 16, "log_spaced": False}),
        ("every_n_steps=256", {"every_n_steps": 256, "log_spaced": False}),
        ("every 64, full tier only", {"every_n_steps": 64, "log_spaced": False, "full_every": 1}),
    ]


def overhead(steps: int, repeats: int) -> None:
    fit(50, [])  # warm-up: imports, allocator, Lightning's first-fit costs
    seconds: dict[str, list[float]] = {}
    cpu_seconds: dict[str, list[float]] = {}
    monitors: dict[str, list[CurvatureMonitor]] = {}
    for _ in range(repeats):
        for label, kwargs in configs():
            monitor = None if kwargs is None else CurvatureMonitor(**kwargs)
            wall, cpu, _ = fit(steps, [monitor] if monitor else [])
            seconds.setdefault(label, []).append(wall)
            cpu_seconds.setdefault(label, []).append(cpu)
            if monitor is not None:
                monitors.setdefault(label, []).append(monitor)
    baseline = statistics.median(seconds["none"])
    cpu_baseline = statistics.median(cpu_seconds["none"])
    print(f"\nLoad after the timed runs (uptime): {os.getloadavg()[0]:.1f}")
    print(f"{steps} steps; runs per row: {repeats} (none: {len(seconds['none'])}), interleaved.\n")
    print(
        "| monitor | wall s (median) | × no monitor | CPU s | CPU × | points (track + full) "
        "| cadence "
        "| matvecs per track / full (median) | monitor's own overhead | Cockpit λmax |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| none | {baseline:.2f} | 1.00 | {cpu_baseline:.2f} | 1.00 | — | — | — | — | — |")
    for label, runs in monitors.items():
        wall = statistics.median(seconds[label])
        cpu = statistics.median(cpu_seconds[label])
        first = runs[0]
        track = [r["curvature/num_matvecs"] for r in first.history if not is_full(r)]
        full = [r["curvature/num_matvecs"] for r in first.history if is_full(r)]
        own = statistics.median(m.schedule.overhead for m in runs)
        every = first.schedule.every_n_steps
        print(
            f"| {label} | {wall:.2f} | {wall / baseline:.3f} | {cpu:.2f} "
            f"| {cpu / cpu_baseline:.3f} | {len(first.history)} "
            f"({len(track)} + {len(full)}) | {first.schedule.cadence} "
            f"| {_median(track)} / {_median(full)} | {own:.3f} "
            f"| {f'{COCKPIT[every]:.1f}×' if every in COCKPIT else '—'} |"
        )
    defaults = monitors["defaults: CurvatureMonitor()"][0]
    cadence = defaults.schedule.cadence or 1
    log_rows = [r for r in defaults.history if r["step"] < cadence]
    log_seconds = sum(r["curvature/seconds"] for r in log_rows)
    print(
        f"\nDefaults, the log-spaced part alone (steps {[int(r['step']) for r in log_rows]}): "
        f"{len(log_rows)} points, {log_seconds:.3f} s of measuring = "
        f"{log_seconds / defaults.schedule.clock.train_seconds:.3f} of its training time "
        f"(the monitor's clock), {log_seconds / baseline:.3f} of the median run without "
        "monitor; the cadence part: "
        f"{len(defaults.history) - len(log_rows)} points, "
        f"{sum(r['curvature/seconds'] for r in defaults.history) - log_seconds:.3f} s."
    )
    print(f"Calibration (defaults, first run): {defaults.schedule.summary()}")


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.0f}" if values else "—"


class ColdCheck(Callback):
    """After each of the monitor's measurements (it runs first in ``callbacks``), a cold
    Lanczos on the same module and probe batches, at a tighter tolerance."""

    def __init__(self, monitor: CurvatureMonitor) -> None:
        self.monitor = monitor
        self.rows: list[tuple[int, bool, float, bool, int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        history = self.monitor.history
        if not history or int(history[-1]["step"]) != trainer.global_step:
            return
        row = history[-1]
        op = HessianOperator(
            pl_module, cross_entropy, self.monitor.probes.batches(pl_module.device)
        )
        cold = lanczos(op, k=1, tol=1e-4, seed=123)
        warm = row.get("curvature/lambda_max", float("nan"))
        self.rows.append(
            (
                trainer.global_step,
                is_full(row),
                warm,
                bool(row["curvature/converged"]),
                int(row["curvature/num_matvecs"]),
                float(cold.eigenvalues[0]),
            )
        )


def accuracy(steps: int) -> None:
    monitor = CurvatureMonitor(every_n_steps=64)
    check = ColdCheck(monitor)
    fit(steps, [monitor, check])
    track = [r for r in check.rows if not r[1]]
    errors = [abs(w - c) / abs(c) for _, _, w, _, _, c in track]
    matvecs = [m for *_, m, _ in track]
    print(
        "\nTrack tier against a cold lanczos(k=1, tol=1e-4) on the same module and probe "
        f"batch (every_n_steps=64 with log-spaced points, {steps} steps): {len(track)} track "
        f"points, {sum(r[3] for r in track)} converged; matvecs per track point (everything: "
        f"Lanczos + 1 directional + 1 batch sharpness): median {statistics.median(matvecs):.0f}, "
        f"max {max(matvecs)}; relative error against the cold run: median "
        f"{statistics.median(errors):.1e}, max {max(errors):.1e}; "
        f"{sum(e <= 1e-3 for e in errors)}/{len(errors)} within tol 1e-3."
    )
    print("\n| step | tier | λmax (monitor) | converged | matvecs | λmax cold | rel. error |")
    print("|---:|---|---:|---|---:|---:|---:|")
    for step, full, warm, converged, mv, cold in check.rows:
        tier = "full" if full else "track"
        err = abs(warm - cold) / abs(cold)
        print(f"| {step} | {tier} | {warm:.5f} | {converged} | {mv} | {cold:.5f} | {err:.1e} |")


def profile(steps: int) -> None:
    profiler = cProfile.Profile(time.process_time)  # CPU time: the machine is shared
    monitor = CurvatureMonitor(every_n_steps=16, log_spaced=False)
    profiler.enable()
    fit(steps, [monitor])
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(
        r"lightning_curvature|autograd", 30
    )
    print("\ncProfile (CPU seconds), every_n_steps=16 (cumulative; lightning_curvature, autograd):")
    print(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 steps, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    args = parser.parse_args()
    global OPTIMIZER
    OPTIMIZER = args.optimizer
    torch.set_num_threads(1)
    steps = 300 if args.quick else 2000
    print(f"## Overhead of the monitor\n\n{machine()}; load (uptime) {os.getloadavg()[0]:.1f}")
    optimizer = "Adam lr 0.001" if OPTIMIZER == "adam" else f"SGD lr {LR} momentum 0.9"
    print(f"MLP 64-256-256-10 tanh (85k), digits, batch {BATCH}, {optimizer}.")
    if not args.skip_overhead:
        overhead(steps, 1 if args.quick else args.repeats)
    if OPTIMIZER == "sgd":  # the cold check compares λmax(H), which Adam's track tier skips
        accuracy(steps)
    if args.profile:
        profile(steps)


if __name__ == "__main__":
    main()
