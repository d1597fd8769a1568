"""HVP benchmark: the ways to compute one Hessian-vector product, their cost against one
gradient, the accuracy of finite differences in float32 and float64, and the cost of the
check that runs before an operator's first product.

Run from the repository root (a few minutes on a 2-core CPU)::

    python benchmarks/bench_hvp.py            # the run recorded in RESULTS.md
    python benchmarks/bench_hvp.py --quick    # a smoke run

Models and data (scikit-learn's bundled digits, one probe batch of 512 images):

* the digits MLP 64→256→256→10 (85,002 parameters), with ReLU and with tanh, after 100
  full-batch SGD steps (so the Hessian is that of a network in training);
* a small CNN (conv 1→16 3×3, BatchNorm, ReLU, conv 16→32 3×3, BatchNorm, ReLU, global
  average pool, linear 32→10; 5,258 parameters) in train mode (batch statistics);
* the tanh MLP with its first activation replaced by a custom autograd Function whose
  backward is marked ``@once_differentiable`` (double backward silently drops its path).

Each timing is the median CPU time of several repeats after a warm-up, in one process, on
one torch thread (CPU time, not wall time: the benchmark machine is shared). The printout
is markdown; RESULTS.md records it with the machine named.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import machine

import lightning_curvature as lc

METHODS = ("reuse_graph", "recompute", "forward_over_reverse", "finite_difference")


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs), targets)


def digits_batch(images: bool, size: int = 512):
    digits = load_digits()
    inputs = torch.as_tensor(digits.data[:size], dtype=torch.float32) / 16.0
    if images:
        inputs = inputs.reshape(-1, 1, 8, 8)
    return inputs, torch.as_tensor(digits.target[:size], dtype=torch.int64)


def mlp(activation: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 256), activation(), nn.Linear(256, 256), activation(), nn.Linear(256, 10)
    )


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def trained(model: nn.Module, batch, steps: int = 100) -> nn.Module:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median CPU seconds of this process per call: on a shared machine, wall time measures
    the neighbours' load as much as the work."""
    fn()  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        seconds.append(time.process_time() - start)
    return statistics.median(seconds)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b) / torch.linalg.vector_norm(b))


def cost_rows(model: nn.Module, batch, repeats: int) -> list[tuple[str, float]]:
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    v = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    block = torch.randn(dim, 8, generator=torch.Generator().manual_seed(1))
    gradient = timed(lambda: torch.autograd.grad(loss_fn(model, batch), params), repeats)
    rows = [("one gradient (forward + backward)", gradient)]
    for method in METHODS:
        op = lc.HessianOperator(model, loss_fn, [batch], hvp_method=method, verify=False)
        try:
            seconds = timed(lambda op=op: op.matvec(v), repeats)
        except RuntimeError as error:
            rows.append((f"matvec, `{method}`: {str(error).split(';')[0][:70]}", float("nan")))
            continue
        rows.append((f"matvec, `{method}`", seconds))
        seconds = timed(lambda op=op: op.matmat(block), max(2, repeats // 4))
        rows.append((f"matmat of 8, per vector, `{method}`", seconds / 8))
        if method in ("reuse_graph", "recompute"):  # one batched backward pass per block
            op.batch_columns = True
            seconds = timed(lambda op=op: op.matmat(block), max(2, repeats // 4))
            rows.append((f"matmat of 8, per vector, `{method}`, batched", seconds / 8))

    def first_product(verify: bool) -> None:
        lc.HessianOperator(model, loss_fn, [batch], verify=verify).matvec(v)

    without = timed(lambda: first_product(False), repeats)
    with_check = timed(lambda: first_product(True), repeats)
    rows.append(("first matvec incl. the graph, `verify=False`", without))
    rows.append(("first matvec incl. the graph and `check()`, `verify=True`", with_check))
    rows.append(("so `check()` costs (2 products + 3 gradients)", with_check - without))
    return rows


def accuracy_rows(model: nn.Module, batch, vectors: int) -> list[tuple[str, float, float]]:
    """Finite differences against the float64 double-backward product (itself checked
    against dense Hessians in the tests), median relative error over ``vectors`` vectors."""
    exact = lc.HessianOperator(model, loss_fn, [batch], dtype=torch.float64, verify=False)
    generator = torch.Generator().manual_seed(2)
    block = torch.randn(exact.dim, vectors, generator=generator, dtype=torch.float64)
    truth = exact.matmat(block)
    rows = []
    for dtype in (torch.float64, torch.float32):
        errors = {}
        for method in ("finite_difference", "reuse_graph"):
            op = lc.HessianOperator(
                model, loss_fn, [batch], dtype=dtype, hvp_method=method, verify=False
            )
            product = op.matmat(block.to(dtype))
            errors[method] = statistics.median(
                relative_error(product[:, j], truth[:, j]) for j in range(vectors)
            )
        check = lc.HessianOperator(model, loss_fn, [batch], dtype=dtype, verify=False).check()
        rows.append((str(dtype).removeprefix("torch."), errors, check))
    return rows


class OnceDifferentiableTanh(torch.autograd.Function):
    """tanh with a backward marked @once_differentiable: double backward drops its path."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


class CustomTanh(nn.Module):
    def forward(self, x):
        return OnceDifferentiableTanh.apply(x)


def broken_rows(model: nn.Module, batch) -> list[tuple[str, str]]:
    """The tanh MLP with its first activation swapped for the custom one: what the check
    sees, and λmax with and without the fallback, against the plain model in float64."""
    broken = nn.Sequential(*[CustomTanh() if i == 1 else m for i, m in enumerate(model)])
    exact = lc.lanczos(lc.HessianOperator(model, loss_fn, [batch], dtype=torch.float64), k=1)
    truth = float(exact.eigenvalues[0])
    rows = []
    for dtype in (torch.float32, torch.float64):
        silent = lc.HessianOperator(
            broken, loss_fn, [batch], dtype=dtype, hvp_method="reuse_graph", verify=False
        )
        check = silent.check()
        wrong = float(lc.lanczos(silent, k=1).eigenvalues[0])
        auto = lc.HessianOperator(broken, loss_fn, [batch], dtype=dtype)
        fixed = float(lc.lanczos(auto, k=1).eigenvalues[0])
        rows.append(
            (
                str(dtype).removeprefix("torch."),
                f"{check.symmetry_error:.1e} | {check.finite_difference_error:.1e} | "
                f"{check.passed} | {abs(wrong - truth) / truth:.1e} | {auto.method_used} | "
                f"{abs(fixed - truth) / truth:.1e}",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only-broken", action="store_true", help="the custom-Function rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    repeats = 3 if args.quick else 7
    flat, images = digits_batch(False), digits_batch(True)
    models = {
        "digits MLP, ReLU (85,002 parameters)": (trained(mlp(nn.ReLU), flat), flat),
        "digits MLP, tanh (85,002 parameters)": (trained(mlp(nn.Tanh), flat), flat),
        "small CNN with BatchNorm, train mode (5,258 parameters)": (
            trained(cnn(), images).train(),
            images,
        ),
    }
    print(f"Machine: {machine()}\n")
    if args.only_broken:
        for dtype, row in broken_rows(*models["digits MLP, tanh (85,002 parameters)"]):
            print(f"| {dtype} | {row} |")
        return
    for name, (model, batch) in models.items():
        rows = cost_rows(model, batch, repeats)
        gradient = rows[0][1]
        print(f"\n### {name}, batch 512: seconds per product\n")
        print("| what | ms | × gradient |\n|---|---:|---:|")
        for label, seconds in rows:
            print(f"| {label} | {seconds * 1e3:.2f} | {seconds / gradient:.2f} |")
    print("\n### Finite differences: relative error against the float64 double-backward product\n")
    print(
        "| model | dtype | `finite_difference` | `reuse_graph` | check: symmetry | "
        "check: FD error | check: FD uncertainty | check passed |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name, (model, batch) in models.items():
        for dtype, errors, check in accuracy_rows(model, batch, 3 if args.quick else 5):
            print(
                f"| {name.split(' (')[0]} | {dtype} | {errors['finite_difference']:.1e} | "
                f"{errors['reuse_graph']:.1e} | {check.symmetry_error:.1e} | "
                f"{check.finite_difference_error:.1e} | "
                f"{check.finite_difference_uncertainty:.1e} | {check.passed} |"
            )
    print("\n### A custom @once_differentiable tanh in the digits MLP (tanh)\n")
    print(
        "| dtype | check: symmetry | check: FD error | check passed | λmax error, "
        "`reuse_graph` unchecked | `auto` uses | λmax error, `auto` |"
    )
    print("|---|---:|---:|---|---:|---|---:|")
    for dtype, row in broken_rows(*models["digits MLP, tanh (85,002 parameters)"]):
        print(f"| {dtype} | {row} |")


if __name__ == "__main__":
    main()
