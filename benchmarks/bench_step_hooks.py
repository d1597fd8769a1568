"""What the monitor costs at a step where it does not measure: its hooks, in a Trainer and in
a hot loop, against a callback with two empty hooks.

Run from the repository root::

    python benchmarks/bench_step_hooks.py [--repeats 4]

The run of ``bench_overhead.py`` (the 85k tanh MLP, batch 64, SGD with momentum, one torch
thread, no logger, 2,000 steps). Alternated, fastest of ``--repeats`` each: no callback, a
callback with two empty hooks (``on_train_batch_start`` and ``on_train_batch_end``: what
Lightning's dispatch costs any callback that has them), and a ``CurvatureMonitor`` that
never measures (``every_n_steps=4000``, ``log_spaced=False``), whose per-step work its own
clock times. Then the same per-step work repeated in a hot loop on the last trainer state:
in a Trainer each hook runs with caches that the forward and backward passes have just
filled, so the same code takes several times longer there.
"""

from __future__ import annotations

import argparse
import timeit
from typing import Any

import torch
from bench_engine import machine
from bench_overhead import fit

from lightning_curvature import CurvatureMonitor
from lightning_curvature._lightning import Callback


class EmptyHooks(Callback):
    def on_train_batch_start(self, *args: Any) -> None:
        pass

    def on_train_batch_end(self, *args: Any) -> None:
        pass


class LastState(Callback):
    """Keeps what the monitor's hooks were last called with (after the monitor's own)."""

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, i: int):
        self.call = (trainer, module, outputs, batch, i)


def hot_loop_us(monitor: CurvatureMonitor, state: LastState, number: int = 20000) -> float:
    """Microseconds for one step's hooks, repeated back to back (caches warm)."""
    trainer, module, outputs, batch, index = state.call
    start = trainer.global_step

    def one_step() -> None:
        monitor.on_train_batch_start(trainer, module, batch, index)
        monitor.on_train_batch_end(trainer, module, outputs, batch, index)

    # global_step stays put, so decide() sees no new step: the early warning still reads
    # the loss and the learning rate, as at every step.
    assert trainer.global_step == start
    return 1e6 * min(timeit.repeat(one_step, number=number, repeat=3)) / number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fit(50, [])  # warm-up
    walls: dict[str, list[float]] = {"none": [], "empty": [], "monitor": []}
    own: list[float] = []
    for _ in range(args.repeats):
        walls["none"].append(fit(args.steps, [])[0])
        walls["empty"].append(fit(args.steps, [EmptyHooks()])[0])
        monitor = CurvatureMonitor(every_n_steps=4000, log_spaced=False)
        walls["monitor"].append(fit(args.steps, [monitor])[0])
        own.append(monitor.schedule.clock.measure_seconds / args.steps)
    # One more run, not timed, keeps the last step's arguments for the hot loop.
    monitor, state = CurvatureMonitor(every_n_steps=4000, log_spaced=False), LastState()
    fit(args.steps, [monitor, state])
    none = min(walls["none"])
    print(f"{machine()}; {args.steps} steps, fastest of {args.repeats} alternated runs.\n")
    print("| callbacks | wall s | × none | µs a step over none (wall) | the monitor's own clock |")
    print("|---|---:|---:|---:|---:|")
    for label, key in (
        ("none", "none"),
        ("two empty hooks", "empty"),
        ("`CurvatureMonitor` that never measures", "monitor"),
    ):
        wall = min(walls[key])
        extra = 1e6 * (wall - none) / args.steps
        clock = f"{1e6 * min(own):.1f} µs a step" if key == "monitor" else "—"
        print(f"| {label} | {wall:.3f} | {wall / none:.4f} | {extra:+.1f} | {clock} |")
    print(
        f"\nThe same hooks back to back in a hot loop: {hot_loop_us(monitor, state):.1f} µs a "
        "step (the Trainer's figure above includes cold caches)."
    )


if __name__ == "__main__":
    main()
