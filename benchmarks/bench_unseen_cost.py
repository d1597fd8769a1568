"""Where the cost the monitor's own clock does not see goes: training steps that run slower
while a monitor is attached.

Run from the repository root::

    python benchmarks/bench_unseen_cost.py [--repeats 2]

The run of ``bench_overhead.py`` (the 85k tanh MLP, batch 64, SGD with momentum, one torch
thread, no logger, 2,000 steps), with a first callback that times each training step from
its ``on_train_batch_start`` to its ``on_train_batch_end`` (forward, backward, optimizer;
the monitor's own ``on_train_batch_start`` work falls inside it, its measurement after).
For each configuration, alternated with runs without a monitor, it prints the wall time,
the monitor's own split (``measure_seconds`` M and ``train_seconds`` T of its clock), the
training time T against the run without a monitor, and the median step time by position
after a measurement (0 = the measured step, whose θ is copied first). A callback that does
nothing (Lightning's base ``Callback``) shows what any callback costs through Lightning's
per-step dispatch; one that only allocates and frees a Lanczos basis's worth of memory every
16 steps shows what the memory allocator alone does to the steps after it. Run it with
``MALLOC_MMAP_THRESHOLD_=65536`` (glibc: a fixed threshold, every large block mapped and
unmapped) to see the allocator's share vanish.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from bench_engine import machine
from bench_overhead import fit as overhead_fit

from lightning_curvature import CurvatureMonitor
from lightning_curvature._lightning import Callback


class StepTimes(Callback):
    """The seconds of each training step, by global step (it must come first in callbacks)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.seconds: dict[int, float] = {}

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        assert self.started is not None
        self.seconds[trainer.global_step - 1] = time.perf_counter() - self.started


class Churn(Callback):
    """Allocates and frees a (16, 85k) float32 block every 16 steps, as a Lanczos basis
    does, and does nothing else: what the memory allocator alone does to the next steps."""

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step % 16 == 0:
            block = torch.empty(16, 85002)
            block.fill_(1.0)
            del block


def fit(steps: int, extra: list[Callback]) -> tuple[float, StepTimes]:
    """``bench_overhead.py``'s run with the step timer first among the callbacks."""
    timer = StepTimes()
    wall, _, _ = overhead_fit(steps, [timer, *extra])
    return wall, timer


def by_position(seconds: dict[int, float], every: int) -> str:
    """Median step milliseconds at each position after a measurement (step s is measured
    when (s + 1) is a multiple of ``every``)."""
    positions: dict[int, list[float]] = {}
    for step, value in seconds.items():
        positions.setdefault((step + 1) % every, []).append(value)
    shown = [p for p in (0, 1, 2, 3, every // 2) if p in positions]
    return ", ".join(f"{p}: {1e3 * statistics.median(positions[p]):.2f}" for p in shown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fit(50, [])  # warm-up
    print(f"{machine()}; {args.steps} steps, runs alternated, medians of {args.repeats}.\n")
    print(
        "| monitor | wall s | none s | wall overhead | own (M/T) | T − none | median step ms "
        "(none) | step ms by position after a measurement |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    configs: list[tuple[str, int]] = [
        ("a callback that does nothing", 0),
        ("a callback that allocates and frees 5.4 MB every 16 steps", -16),
        ("`every_n_steps=16`", 16),
        ("`every_n_steps=64`", 64),
        ("`every_n_steps=4000` (only the last step)", 4000),
    ]
    for label, every in configs:
        rows: dict[str, list[Any]] = {"none": [], "with": []}
        for _ in range(args.repeats):
            rows["none"].append(fit(args.steps, []))
            if every > 0:
                monitor = CurvatureMonitor(every_n_steps=every, log_spaced=False)
                rows["with"].append((*fit(args.steps, [monitor]), monitor))
            else:
                callback = Churn() if every < 0 else Callback()
                rows["with"].append((*fit(args.steps, [callback]), None))
        none = statistics.median(wall for wall, _ in rows["none"])
        wall = statistics.median(row[0] for row in rows["with"])
        steps_none = statistics.median(
            statistics.median(t.seconds.values()) for _, t in rows["none"]
        )
        steps_with = statistics.median(
            statistics.median(row[1].seconds.values()) for row in rows["with"]
        )
        monitors = [row[2] for row in rows["with"] if row[2] is not None]
        own = train = "—"
        if monitors:
            clocks = [m.schedule.clock for m in monitors]
            own = f"{statistics.median(c.overhead for c in clocks):.3f}"
            train = f"{statistics.median(c.train_seconds for c in clocks) - none:+.2f} s"
        positions = by_position(rows["with"][0][1].seconds, abs(every)) if every else "—"
        print(
            f"| {label} | {wall:.2f} | {none:.2f} | {wall / none - 1:.3f} | {own} | {train} "
            f"| {1e3 * steps_with:.3f} ({1e3 * steps_none:.3f}) | {positions} |"
        )


if __name__ == "__main__":
    main()
