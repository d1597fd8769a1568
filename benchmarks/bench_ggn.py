"""GGN/Fisher benchmark: product cost against the Hessian's and curvlinops', and per-layer λmax
and traces against whole-model runs, in one process.

Run from the repository root::

    python benchmarks/bench_ggn.py            # the run recorded in RESULTS.md (~2-3 minutes)
    python benchmarks/bench_ggn.py --quick    # a smoke run
    python benchmarks/bench_ggn.py --device cuda

Models: the digits MLP 64→256→256→10 of ``bench_engine.py`` (85,002 parameters, 300 SGD
steps) and a small digits CNN (four 3×3 convolutions and a linear head, 8 parameter
tensors... see ``digits_cnn``), each on one probe batch of 512 images. Timings are medians
after a warm-up; accuracy is the relative error of float32 products against the float64
product of the same operator (checked against curvlinops' float64 product).
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from curvlinops import GGNLinearOperator
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import digits, digits_cnn, loss_fn, machine, trained_mlp

import lightning_curvature as lc
from lightning_curvature.estimators.blockwise import (
    blockwise_lambda_max,
    blockwise_trace,
)
from lightning_curvature.operators.base import OperatorWrapper
from lightning_curvature.operators.blocks import parameter_blocks
from lightning_curvature.operators.ggn import GGNOperator

DEVICE = torch.device("cpu")


def timed(function, repeats: int) -> tuple[float, object]:
    """Median CPU seconds of ``function`` (after a warm-up) and its last result.

    CPU time, not wall time: this machine's 2 cores are shared with other jobs, which
    stretches wall time several-fold and at random; with one torch thread the process's
    CPU time is the work done. On a GPU, wall time with a synchronize is used instead.
    """
    function()
    times, result = [], None
    for _ in range(repeats):
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
            started = time.perf_counter()
            result = function()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        else:
            started = time.process_time()
            result = function()
            times.append(time.process_time() - started)
    return statistics.median(times), result


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b) / torch.linalg.vector_norm(b))


def product_cost(model: nn.Module, batch: tuple, repeats: int, device: torch.device) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    v = torch.randn(dim, generator=torch.Generator().manual_seed(0)).to(device)
    block = torch.randn(dim, 8, generator=torch.Generator().manual_seed(1)).to(device)

    def gradient():
        return torch.autograd.grad(loss_fn(model, batch), params)

    gradient_s, _ = timed(gradient, repeats)
    reference = GGNOperator(
        model, [batch], loss_from_output="cross_entropy", dtype=torch.float64
    ).matvec(v.double())
    model64 = copy.deepcopy(model).double()
    curvlinops64 = GGNLinearOperator(
        model64,
        nn.CrossEntropyLoss(),
        list(model64.parameters()),
        [(batch[0].double(), batch[1])],
        check_deterministic=False,
    )
    check = relative(curvlinops64 @ v.double(), reference)
    rows = [("one gradient (forward + backward)", gradient_s, None, None)]
    operators = {
        "Hessian, `reuse_graph`": lc.HessianOperator(model, loss_fn, [batch]),
        "GGN, `reuse_graph` (double-backward trick)": GGNOperator(
            model, [batch], loss_from_output="cross_entropy"
        ),
        "GGN, `forward_mode` (torch.func jvp + vjp)": GGNOperator(
            model, [batch], loss_from_output="cross_entropy", product_method="forward_mode"
        ),
        "true Fisher, 1 sample": lc_fisher(model, batch, "true"),
        "empirical Fisher": lc_fisher(model, batch, "empirical"),
    }
    for label, op in operators.items():
        seconds, product = timed(lambda op=op: op.matvec(v), repeats)
        error = relative(product, reference) if label.startswith("GGN") else None
        block_s, _ = timed(lambda op=op: op.matmat(block), max(2, repeats // 3))
        rows.append((label, seconds, block_s / 8, error))
    curvlinops = GGNLinearOperator(
        model, nn.CrossEntropyLoss(), params, [batch], check_deterministic=False
    )
    seconds, product = timed(lambda: curvlinops @ v, repeats)
    block_s, _ = timed(lambda: curvlinops @ block, max(2, repeats // 3))
    rows.append(
        ("curvlinops `GGNLinearOperator`", seconds, block_s / 8, relative(product, reference))
    )

    first_s, _ = timed(
        lambda: GGNOperator(model, [batch], loss_from_output="cross_entropy").matvec(v), repeats
    )
    print(
        "\n| product | ms | × gradient | per vector in a block of 8, ms | rel. error vs float64 |"
    )
    print("|---|---:|---:|---:|---:|")
    for label, seconds, per_vector, error in rows:
        cells = [f"{seconds * 1e3:.2f}", f"{seconds / gradient_s:.2f}"]
        cells.append("" if per_vector is None else f"{per_vector * 1e3:.2f}")
        cells.append("" if error is None else f"{error:.1e}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(
        f"| GGN first product, incl. forward and kept graph | {first_s * 1e3:.2f} | "
        f"{first_s / gradient_s:.2f} | | |"
    )
    print(f"\ncurvlinops float64 against our float64 GGN: relative difference {check:.1e}.")


def lc_fisher(model, batch, kind):
    from lightning_curvature.operators.fisher import FisherOperator

    return FisherOperator(model, [batch], kind=kind, loss_from_output="cross_entropy")


def ggn_against_hessian(model: nn.Module, batch: tuple, rounds: int) -> None:
    """One GGN and one Hessian product, alternated ``rounds`` times on kept graphs: the
    ratio of their medians (alternation keeps the machine's drift out of the ratio)."""
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    hessian = lc.HessianOperator(model, loss_fn, [batch])
    ggn = GGNOperator(model, [batch], loss_from_output="cross_entropy")
    hessian.matvec(v), ggn.matvec(v)  # graphs built (and the Hessian's product checked)
    times: dict[str, list[float]] = {"hessian": [], "ggn": []}
    for _ in range(rounds):
        for name, op in (("hessian", hessian), ("ggn", ggn)):
            started = time.perf_counter()
            op.matvec(v)
            times[name].append(time.perf_counter() - started)
    h, g = statistics.median(times["hessian"]), statistics.median(times["ggn"])
    print(
        f"\nAlternated {rounds}×: Hessian product {1e3 * h:.2f} ms, GGN product "
        f"{1e3 * g:.2f} ms (medians): GGN / Hessian = {g / h:.2f}."
    )


class MaskedOnly(OperatorWrapper):
    """The operator without its direct diagonal blocks: each block's product is a full
    product on a masked vector (how per-layer λmax ran before)."""

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        return self.inner.matmat(block)


def per_layer(model: nn.Module, batch: tuple, repeats: int) -> None:
    names = [n for n, _ in model.named_parameters()]
    modules = sorted({n.rsplit(".", 1)[0] for n in names}, key=lambda m: names.index(m + ".weight"))
    four = [
        rf"^({modules[0]}|{modules[1]})\.",
        rf"^{modules[2]}\.",
        rf"^{modules[3]}\.",
        rf"^({modules[4]})\.",
    ]
    ten = [rf"^{re.escape(n)}$" for n in names]
    assert len(ten) == 10, names
    for label, make in (
        ("Hessian", lambda params=None: lc.HessianOperator(model, loss_fn, [batch], params)),
        (
            "GGN",
            lambda params=None: GGNOperator(
                model, [batch], params, loss_from_output="cross_entropy"
            ),
        ),
    ):
        print(f"\n**{label}** of the CNN:\n")
        print("| run | s | batched products | operator columns | × whole λmax time |")
        print("|---|---:|---:|---:|---:|")
        op = make()
        op.matvec(torch.zeros(op.dim, device=op.device))  # build the kept graph outside the timings
        whole_s, whole = timed(lambda op=op: lc.lanczos(op, k=1), repeats)
        print(
            f"| whole-model λmax (`lanczos`, k=1) | {whole_s:.3f} | {whole.num_matvecs} | "
            f"{whole.num_matvecs} | 1.00 |"
        )
        named = dict(model.named_parameters())
        for patterns in (four, ten):
            blocks = parameter_blocks(op.param_names, op.params, patterns)
            masked_s, masked = timed(
                lambda b=blocks, op=op: blockwise_lambda_max(MaskedOnly(op), b), repeats
            )
            print(
                f"| L = {len(blocks)} blocks, `blockwise_lambda_max` on masked full products "
                f"(before) | {masked_s:.3f} | {masked.num_steps} | {masked.num_matvecs} | "
                f"{masked_s / whole_s:.2f} |"
            )
            batched_s, result = timed(lambda b=blocks, op=op: blockwise_lambda_max(op, b), repeats)
            print(
                f"| L = {len(blocks)} blocks, `blockwise_lambda_max`, each layer applied "
                "directly | "
                f"{batched_s:.3f} | {result.num_steps} | {result.num_matvecs} | "
                f"{batched_s / whole_s:.2f} |"
            )
            subsets = [
                {n: named[n] for n in op.param_names if re.search(pattern, n)}
                for pattern in patterns
            ]
            # Each layer's operator is built inside the timing: its own forward, backward
            # and kept graph are part of what running L separate Lanczos processes costs.
            seq_s, results = timed(
                lambda subsets=subsets, make=make: [lc.lanczos(make(c), k=1) for c in subsets],
                repeats,
            )
            worst = max(
                abs(result.eigenvalues[i].item() / r.eigenvalues[0].item() - 1)
                for i, r in enumerate(results)
            )
            print(
                f"| L = {len(blocks)} blocks, `lanczos` on each layer alone "
                "(`params=`, incl. building it) | "
                f"{seq_s:.3f} | {sum(r.num_matvecs for r in results)} | "
                f"{sum(r.num_matvecs for r in results)} | {seq_s / whole_s:.2f} |"
            )
            print(
                f"| (largest relative difference, batched vs alone: {worst:.1e}; all "
                f"converged: {all(result.converged)}) | | | | |"
            )

        blocks = parameter_blocks(op.param_names, op.params)
        trace_s, _ = timed(lambda op=op: lc.hutchinson_trace(op, num_probes=30), repeats)
        before = op.num_matvecs
        split_s, _ = timed(lambda b=blocks, op=op: blockwise_trace(op, b, num_probes=30), repeats)
        per_call = (op.num_matvecs - before) // (repeats + 1)
        print(f"| trace, 30 probes: `hutchinson_trace` | {trace_s:.3f} | | 30 | |")
        print(
            f"| trace + {len(blocks)} per-layer traces: `blockwise_trace` | {split_s:.3f} | | "
            f"{per_call} | {split_s / trace_s:.2f} × the trace alone |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, a smoke run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--per-layer-only", action="store_true", help="the CNN's per-layer part")
    parser.add_argument(
        "--ggn-ratio-only", action="store_true", help="GGN against Hessian products, alternated"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    global DEVICE
    DEVICE = device
    torch.set_num_threads(1)
    repeats = 2 if args.quick else 7
    print(f"Machine: {machine()}. Device: {device}.\n")
    inputs, targets = digits(0)
    batch = (inputs[:512].to(device), targets[:512].to(device))

    if args.ggn_ratio_only:
        for label, net in (("MLP", trained_mlp([64, 256, 256, 10])), ("CNN", digits_cnn())):
            print(f"### {label}, batch 512", end="")
            ggn_against_hessian(net.to(device), batch, 40)
        return
    if args.per_layer_only:
        print("### Per-layer λmax and traces on the CNN")
        per_layer(digits_cnn().to(device), batch, max(2, repeats // 2))
        return
    mlp = trained_mlp([64, 256, 256, 10]).to(device)
    size = sum(p.numel() for p in mlp.parameters())
    print(f"### Product cost, digits MLP 64→256→256→10 ({size:,} parameters), batch 512")
    product_cost(mlp, batch, repeats * 2, device)
    cnn = digits_cnn().to(device)
    size = sum(p.numel() for p in cnn.parameters())
    print(f"\n### Product cost, digits CNN ({size:,} parameters), batch 512")
    product_cost(cnn, batch, repeats * 2, device)
    print("\n### Per-layer λmax and traces on the CNN")
    per_layer(cnn, batch, max(2, repeats // 2))


if __name__ == "__main__":
    main()
