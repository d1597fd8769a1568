"""Does the monitor's own overhead (``curvature/overhead``, the end-of-fit line) tell the
truth? The same run with and without ``CurvatureMonitor()`` at its defaults, alternated,
fastest of several each, against what the monitor's clock said.

Run from the repository root::

    python benchmarks/bench_honest_overhead.py [--steps 2000] [--repeats 4]

The run is ``bench_overhead.py``'s: a tanh MLP 64→256→256→10 (85k parameters) on the
digits, batch 64, SGD with momentum, no logger, one torch thread. One discarded warm-up fit
comes first (imports, allocator, Lightning's first-fit costs are no one's overhead). The
claim checked: the monitor's clock and the wall clock agree within a few points.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_engine import machine
from bench_overhead import fit

from lightning_curvature import CurvatureMonitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fit(50, [])
    without, with_monitor, own, points = [], [], [], []
    for _ in range(args.repeats):
        without.append(fit(args.steps, [])[0])
        monitor = CurvatureMonitor()
        with_monitor.append(fit(args.steps, [monitor])[0])
        own.append(monitor.schedule.overhead)
        points.append(len(monitor.history))
    wall = min(with_monitor) / min(without) - 1
    print(f"{machine()}; {args.steps} steps, {args.repeats} alternated runs each.\n")
    print("| | fastest wall s | runs (s) |")
    print("|---|---:|---|")
    print(f"| without | {min(without):.2f} | {', '.join(f'{s:.2f}' for s in without)} |")
    print(f"| defaults | {min(with_monitor):.2f} | {', '.join(f'{s:.2f}' for s in with_monitor)} |")
    print(
        f"\nWall-clock overhead (fastest/fastest − 1): {wall:.3f}; the monitor's own: median "
        f"{statistics.median(own):.3f} (runs: {', '.join(f'{o:.3f}' for o in own)}); "
        f"points per run: {points}."
    )


if __name__ == "__main__":
    main()
