"""Benchmark: the exact chain solve against a dense solve and Krylov solvers, as depth grows.

Run from the repository root::

    python benchmarks/bench_solvers.py            # the run recorded in RESULTS.md (minutes)
    python benchmarks/bench_solvers.py --quick    # a smoke run

Tall-skinny tanh chains (``L`` Linear layers of width ``w``, cross-entropy over ``w``
classes, a batch of 4 random inputs, float64, default PyTorch initialisation). For each
(w, L) we solve ``(H + εI)x = b`` (ε = 0.1, one random ``b``) three ways and time each:

- ``chain``: :func:`lightning_curvature.mlp_chain_solve` (no diagnostics, no residual check,
  no refinement: the structured factorisation and solve alone); ``refined``: with its
  default iterative refinement (``refine=3``, through the engine's HVP) and residual check;
- ``dense``: the Hessian by ``torch.func.hessian`` of the flat loss, then
  ``torch.linalg.solve`` (skipped past 3,000 parameters or once a row took too long);
- ``minres``: :func:`lightning_curvature.solve` on the engine's ``HessianOperator``, run to
  the chain's residual (at least 1e-10), and ``cg`` on the same system when it is positive
  definite (the chain's inertia says whether).

Each time is the best of a few runs; every answer's true relative residual
``‖(H + εI)x − b‖/‖b‖`` is checked with the engine's Hessian-vector product. The figure is
``benchmarks/figures/solvers.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_curvature as lc
from benchmarks.bench_engine import machine

DAMPING = 0.1
BATCH = 4
DENSE_MAX_DIM = 3000
SLOW_SECONDS = 20.0  # a method that took this long is not run at larger depths


def chain(width: int, depth: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    modules: list[nn.Module] = []
    for index in range(depth):
        modules.append(nn.Linear(width, width))
        if index < depth - 1:
            modules.append(nn.Tanh())
    return nn.Sequential(*modules).double()


def best_time(fn, repeats: int):
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def true_residual(model, batch, x, b) -> float:
    with lc.HessianOperator(model, loss_fn, [batch], dtype=torch.float64) as op:
        residual = op.matvec(x) + DAMPING * x - b
    return float(torch.linalg.vector_norm(residual) / torch.linalg.vector_norm(b))


def dense_solve(model, batch, b):
    params = dict(model.named_parameters())
    names = list(params)
    shapes = [params[n].shape for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def flat_loss(flat):
        values, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            values[name] = flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return loss_fn(lambda x: torch.func.functional_call(model, values, (x,)), batch)

    start = time.perf_counter()
    hessian = torch.func.hessian(flat_loss)(theta)
    hessian.diagonal().add_(DAMPING)
    built = time.perf_counter()
    x = torch.linalg.solve(hessian, b)
    return x, built - start, time.perf_counter() - built


def run(widths, depths, repeats):
    rows = []
    slow: set[tuple[str, int]] = set()
    for width in widths:
        for depth in depths:
            model = chain(width, depth)
            generator = torch.Generator().manual_seed(1)
            batch = (
                torch.randn(BATCH, width, generator=generator, dtype=torch.float64),
                torch.randint(0, width, (BATCH,), generator=generator),
            )
            dim = sum(p.numel() for p in model.parameters())
            b = torch.randn(dim, generator=generator, dtype=torch.float64)
            row = {"width": width, "depth": depth, "dim": dim}

            seconds, res = best_time(
                lambda model=model, batch=batch, b=b: lc.mlp_chain_solve(
                    model,
                    "cross_entropy",
                    batch,
                    b,
                    DAMPING,
                    diagnostics=False,
                    check_residual=False,
                    refine=0,
                ),
                repeats,
            )
            row["chain_s"] = seconds
            row["chain_residual"] = true_residual(model, batch, res.x, b)
            seconds, refined = best_time(
                lambda model=model, batch=batch, b=b: lc.mlp_chain_solve(
                    model, "cross_entropy", batch, b, DAMPING, diagnostics=False
                ),
                1,
            )
            row["refined_s"], row["refined_residual"] = seconds, refined.relative_residual
            if res.block_size <= 300 or depth <= 32:  # eigvalsh of each pivot: costly at w=32
                inertia = lc.mlp_chain_solve(
                    model, "cross_entropy", batch, b, DAMPING, check_residual=False
                )
                row["negative_eigenvalues"] = inertia.negative_eigenvalues
                row["worst_pivot_condition"] = max(inertia.pivot_condition_numbers)
            row["state_size"], row["block_size"] = res.state_size, res.block_size
            target = max(row["chain_residual"], 1e-10)

            if dim <= DENSE_MAX_DIM and ("dense", width) not in slow:
                seconds, (x, build_s, solve_s) = best_time(
                    lambda m=model, bt=batch, v=b: dense_solve(m, bt, v), 1
                )
                row["dense_s"], row["dense_build_s"], row["dense_solve_s"] = (
                    seconds,
                    build_s,
                    solve_s,
                )
                row["dense_residual"] = true_residual(model, batch, x, b)
                row["dense_vs_chain_error"] = float(
                    torch.linalg.vector_norm(x - res.x) / torch.linalg.vector_norm(x)
                )
                if seconds > SLOW_SECONDS:
                    slow.add(("dense", width))

            methods = ["minres"] + (["cg"] if row.get("negative_eigenvalues") == 0 else [])
            for method in methods:
                if (method, width) in slow:
                    continue
                op = lc.HessianOperator(model, loss_fn, [batch], dtype=torch.float64)
                start = time.perf_counter()
                krylov = lc.solve(op, b, DAMPING, tol=target, max_iters=4000, method=method)
                seconds = time.perf_counter() - start
                op.release()
                row[f"{method}_s"] = seconds
                row[f"{method}_iters"] = krylov.iterations
                row[f"{method}_residual"] = krylov.relative_residual
                row[f"{method}_converged"] = krylov.converged
                if seconds > SLOW_SECONDS:
                    slow.add((method, width))
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(row) -> str:
    def cell(key, fmt="{:.3g}"):
        return fmt.format(row[key]) if key in row else "—"

    krylov = (
        f"{cell('minres_s')} s, {cell('minres_iters', '{}')} it, "
        f"res {cell('minres_residual', '{:.1e}')}"
        + ("" if row.get("minres_converged", True) else " (not converged)")
    )
    ratio = f"{row['dense_s'] / row['chain_s']:.3g}×" if "dense_s" in row else "—"
    return (
        f"| {row['width']} | {row['depth']} | {row['dim']} | {row['chain_s']:.3g} | "
        f"{row['chain_residual']:.1e} | {row['refined_s']:.3g} ({row['refined_residual']:.1e}) | "
        f"{cell('dense_s')} ({cell('dense_solve_s')}) | {ratio} | "
        f"{cell('dense_vs_chain_error', '{:.1e}')} | {krylov} | {cell('cg_s')} | "
        f"{cell('negative_eigenvalues', '{}')} | {cell('worst_pivot_condition', '{:.2g}')} |"
    )


HEADER = (
    "| w | L | params | chain s | chain residual | refined s (residual) "
    "| dense s (of which solve) | dense/chain "
    "| ‖x_dense − x_chain‖ | MINRES (s, iterations, residual) | CG s | neg. eigenvalues "
    "| worst pivot cond |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def slopes(rows, key):
    """Log-log slope of time against depth over the largest half of the depths measured."""
    out = {}
    for width in sorted({r["width"] for r in rows}):
        points = [(r["depth"], r[key]) for r in rows if r["width"] == width and key in r]
        points = points[len(points) // 2 :] if len(points) >= 4 else points
        if len(points) >= 2:
            x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
            out[width] = float(np.polyfit(x, y, 1)[0])
    return out


def figure(rows, path: Path) -> None:
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    colours = {8: "tab:blue", 16: "tab:orange", 32: "tab:green"}
    styles = {
        "chain_s": ("-", "o", "chain (exact)"),
        "dense_s": ("--", "s", "dense"),
        "minres_s": (":", "^", "MINRES"),
    }
    for width in sorted({r["width"] for r in rows}):
        for key, (line, marker, label) in styles.items():
            points = [(r["depth"], r[key]) for r in rows if r["width"] == width and key in r]
            if points:
                ax.plot(
                    *zip(*points, strict=True),
                    line,
                    marker=marker,
                    color=colours.get(width),
                    label=f"{label}, w={width}",
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("depth L (Linear layers)")
    ax.set_ylabel("seconds per solve")
    ax.set_title("(H + εI)⁻¹b on tall-skinny tanh chains, float64")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--no-figure", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    widths, depths, repeats = args.widths, args.depths, 2
    if args.quick:
        widths, depths, repeats = [8], [4, 8, 16], 1
    print(f"Machine: {machine()}\n")
    warm = chain(4, 2)  # first calls into torch.func and LAPACK are slow: not timed
    warm_batch = (torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 1]))
    lc.mlp_chain_solve(warm, "cross_entropy", warm_batch, torch.ones(40, dtype=torch.float64))
    dense_solve(warm, warm_batch, torch.ones(40, dtype=torch.float64))
    print(HEADER)
    rows = run(widths, depths, repeats)
    for key in ("chain_s", "dense_s", "minres_s"):
        print(
            f"\nlog-log slope of {key} vs L (largest half of depths): "
            + ", ".join(f"w={w}: {s:.2f}" for w, s in slopes(rows, key).items())
        )
    if not (args.quick or args.no_figure):
        figure(rows, Path(__file__).resolve().parent / "figures" / "solvers.png")


if __name__ == "__main__":
    main()
