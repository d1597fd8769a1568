"""Where a track point's time goes: the products, the Lanczos bookkeeping around them, and
the directional and batch sharpness, against a training step of the same model.

Run from the repository root::

    python benchmarks/bench_track_point.py [--steps 1600]

The run: ``bench_overhead.py``'s tanh MLP 64→256→256→10 (85k parameters), batch 64, SGD
with momentum, one torch thread, in a plain training loop (no Lightning, so a training step
is forward, backward and the optimizer alone). Every 16 steps the monitor's own
``Measurer`` takes a track measurement on a fixed probe batch, warm-started from the last.
The split is timed around the measurement's parts (no profiler); the bookkeeping alone is
also timed on an operator whose products cost nothing (a diagonal of the same size), so
what remains there is the estimator's own vector work and host logic.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Any

import torch
from bench_engine import machine
from bench_overhead import Module, cross_entropy, data

import lightning_curvature as lc
import lightning_curvature.measure.module as measure_module
import lightning_curvature.measure.tiers as tiers
import lightning_curvature.operators.hessian as hessian
from lightning_curvature.measure.module import Context
from lightning_curvature.measure.tiers import MeasureSettings
from lightning_curvature.monitor.measurer import Measurer

SPENT: dict[str, float] = defaultdict(float)


def timed_parts() -> None:
    """Wrap the parts of a measurement in timers (module attributes, so the code is the
    library's own)."""

    def wrap(owner: Any, name: str, key: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                SPENT[key] += time.perf_counter() - started

        setattr(owner, name, timed)

    wrap(tiers, "_top_eigenpairs", "lanczos, all")
    wrap(tiers, "_preconditioned_top", "lanczos on P⁻¹ᐟ²HP⁻¹ᐟ² (adaptive optimizers)")
    wrap(tiers, "_directional_quantities", "directional + batch sharpness")
    wrap(measure_module, "_operators", "building the operator")
    wrap(hessian.HessianOperator, "_matmat", "products (the first builds the graph)")


class FreeDiagonal:
    """A diagonal operator: its products cost one elementwise multiply."""

    def __init__(self, diagonal: torch.Tensor) -> None:
        self.diagonal, self.dim = diagonal, diagonal.numel()
        self.device, self.dtype = diagonal.device, diagonal.dtype

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.diagonal * v

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        return self.diagonal[:, None] * block


def bookkeeping(dim: int, repeats: int = 30) -> tuple[float, int]:
    generator = torch.Generator().manual_seed(0)
    diagonal = torch.rand(dim, generator=generator) ** 8 * 10
    diagonal[:3] = torch.tensor([20.0, 15.0, 12.0])
    op = FreeDiagonal(diagonal)
    start = torch.zeros(dim)
    start[0] = 1.0
    start += 0.05 * torch.randn(dim, generator=generator) / dim**0.5
    times, result = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        result = lc.lanczos(op, k=1, tol=1e-3, init=start[:, None], return_eigenvectors=True)
        times.append(time.perf_counter() - began)
    assert result is not None
    return statistics.median(times), result.num_matvecs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument(
        "--optimizer", choices=("sgd", "adam"), default="sgd", help="adam: lr 1e-3, its P⁻¹H"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    timed_parts()
    torch.manual_seed(0)
    module = Module()
    optimizer: torch.optim.Optimizer = (
        torch.optim.Adam(module.parameters(), lr=1e-3)
        if args.optimizer == "adam"
        else torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    )
    batches = list(data())
    names = [n for n, _ in module.named_parameters()]
    measurer = Measurer(Context(module, cross_entropy, names), MeasureSettings())
    step, points, step_seconds = 0, [], []
    while step < args.steps:
        for batch in batches:
            if step % 16 == 15:
                measurer.before_measured_step(step)
            began = time.perf_counter()
            optimizer.zero_grad()
            cross_entropy(module, batch).backward()
            optimizer.step()
            step_seconds.append(time.perf_counter() - began)
            step += 1
            if step % 16 == 0:
                tier = "full" if step == 16 else "track"
                began = time.perf_counter()
                outcome = measurer.measure(
                    [batches[0]], step, tier, optimizers=[optimizer], lr_schedulers=[]
                )
                if tier == "full":
                    SPENT.clear()
                else:
                    points.append((time.perf_counter() - began, outcome.record.num_matvecs))
            if step >= args.steps:
                break
    n, train = len(points), statistics.median(step_seconds)
    total = sum(seconds for seconds, _ in points) / n
    print(f"{machine()}; optimizer {args.optimizer}.\n")
    print(
        f"{n} track points, every 16 steps; a training step {1e3 * train:.2f} ms (median); a "
        f"track point {1e3 * statistics.median(s for s, _ in points):.1f} ms median, "
        f"{statistics.median(m for _, m in points):g} products median.\n"
    )
    print("| part (mean per track point) | ms | training steps |\n|---|---:|---:|")
    for key, seconds in SPENT.items():
        print(f"| {key} | {1e3 * seconds / n:.2f} | {seconds / n / train:.1f} |")
    lanczos = (SPENT["lanczos, all"] + SPENT["lanczos on P⁻¹ᐟ²HP⁻¹ᐟ² (adaptive optimizers)"]) / n
    products = SPENT["products (the first builds the graph)"] / n
    directional = SPENT["directional + batch sharpness"] / n
    # The directional products are inside "products" too: Lanczos's own are the rest.
    own = lanczos - (products - directional)
    print(f"| Lanczos bookkeeping (lanczos − its products) | {1e3 * own:.2f} | {own / train:.1f} |")
    print(f"| the whole measurement | {1e3 * total:.2f} | {total / train:.1f} |")
    seconds, matvecs = bookkeeping(sum(p.numel() for p in module.parameters()))
    print(
        f"\nBookkeeping alone, free products of the same size: a warm k=1 run takes "
        f"{1e3 * seconds:.2f} ms for {matvecs} products."
    )


if __name__ == "__main__":
    main()
