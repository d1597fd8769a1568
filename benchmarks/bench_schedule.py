"""Does the calibrated schedule keep its overhead budget, and does it choose the same
cadence run after run?

Run from the repository root::

    python benchmarks/bench_schedule.py            # the run recorded in RESULTS.md
    python benchmarks/bench_schedule.py --quick    # a smoke run

A plain PyTorch loop (the schedule knows no Lightning): the 85k-parameter tanh MLP on
scikit-learn's digits, minibatch SGD with momentum, batch 64, as in ``bench_overhead.py``.
Each run trains ``--steps`` steps while :class:`MeasurementSchedule` (defaults: cadence
calibrated to ``max_overhead=0.05``, log-spaced steps, a full measurement every 8th
cadence point) decides; a track measurement is λmax alone (Lanczos, k=1, warm-started), a
full one the default top-5 and Hutchinson trace. The same loop without measuring gives
the wall time the overhead is relative to.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import machine

from lightning_curvature.measure.tiers import MeasureSettings, measure
from lightning_curvature.monitor.schedule import MeasurementSchedule
from lightning_curvature.operators import HessianOperator

TRACK = MeasureSettings(k=1, trace=False)
FULL = MeasureSettings()


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    inputs, targets = load_digits(return_X_y=True)
    x = torch.tensor(inputs / 16.0, dtype=torch.float32)
    y = torch.tensor(targets)
    generator = torch.Generator().manual_seed(0)
    out = []
    while len(out) < steps:
        order = torch.randperm(len(x), generator=generator)
        out += [(x[i], y[i]) for i in order.split(64) if len(i) == 64]
    return out[:steps]


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def train(data, schedule: MeasurementSchedule | None) -> tuple[float, list[str]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    probe = [data[0]]
    vectors, notes = None, []
    started = time.perf_counter()
    if schedule is not None:
        schedule.start(0)
    for step, batch in enumerate(data, start=1):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
        if schedule is None:
            continue
        decision = schedule.decide(step)
        notes += [n for n in (decision.info, decision.warning) if n]
        if decision.measure:
            with schedule.timed(decision):
                op = HessianOperator(model, loss_fn, probe)
                settings = FULL if decision.full else TRACK
                try:
                    _, vectors = measure(op, step, settings, init=vectors)
                finally:
                    op.release()
    return time.perf_counter() - started, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps, repeats = (300, 1) if args.quick else (args.steps, args.repeats)
    data = batches(steps)
    print(f"Machine: {machine()}. {steps} steps, batch 64, digits MLP 85k.\n")
    train(data[:50], None)  # warm-up
    print("| run | cadence | points (track/full) | overhead by the schedule | wall × plain |")
    print("|---|---:|---:|---:|---:|")
    for repeat in range(repeats):
        plain, _ = train(data, None)
        schedule = MeasurementSchedule()
        seconds, notes = train(data, schedule)
        print(
            f"| {repeat + 1} | {schedule.cadence} | {schedule.num_track + schedule.num_full} "
            f"({schedule.num_track}/{schedule.num_full}) | {schedule.overhead:.3f} | "
            f"{seconds / plain:.3f} |"
        )
        for note in notes:
            print(f"  {note}")
    print(f"\n{schedule.summary()}")
    explicit = MeasurementSchedule(every_n_steps=5, log_spaced=False)
    _, notes = train(data[:200], explicit)
    print(f"\nevery_n_steps=5, log_spaced=False, 200 steps: {explicit.summary()}")
    print("  warnings: " + (" | ".join(notes) if notes else "none"))


if __name__ == "__main__":
    main()
