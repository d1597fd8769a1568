"""Sharded Lanczos under FSDP2 (``fully_shard``) on CPU processes over gloo: what one λmax
costs in products, all-reduces, bytes and per-rank memory as the world grows, against the
same model unsharded with exact (double-backward) products.

Run from the repository root::

    python benchmarks/bench_sharded.py            # world sizes 1, 2, 4
    python benchmarks/bench_sharded.py --quick    # world sizes 1, 2 on a smaller model

The model: a tanh MLP 64→512→512→10 (300k parameters) on 512 of scikit-learn's digits,
each rank probing 512 / world of them (the union is the same batch at every world size),
every Linear ``fully_shard``ed. One cold ``lanczos(op, k=1, tol=1e-3)``; every reduction the
estimator asks for is counted at the operator (``sum_over_shards``), and every product's
step reduction too. Per-rank memory is that of the Krylov basis and the working vectors:
the local dimension times the vectors held, in float32.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning_fabric.plugins.environments.lightning import find_free_network_port
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import machine

import lightning_curvature as lc
from lightning_curvature.operators.sharded import ShardedHessianOperator


def model(widths: list[int]) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def probe(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = load_digits(return_X_y=True)
    return torch.tensor(inputs[:size] / 16.0, dtype=torch.float32), torch.tensor(targets[:size])


def loss_fn(net: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(net(batch[0]), batch[1])


class Counted(ShardedHessianOperator):
    """The sharded operator, counting the estimator's reductions and their bytes."""

    reductions = 0
    reduced_bytes = 0

    def sum_over_shards(self, partial: torch.Tensor) -> torch.Tensor:
        self.reductions += 1
        self.reduced_bytes += partial.numel() * partial.element_size()
        return super().sum_over_shards(partial)


def rank_main(rank: int, world: int, port: int, widths: list[int], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    net = model(widths)
    mesh = init_device_mesh("cpu", (world,))
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    inputs, targets = probe(512)
    share = slice(rank * 512 // world, (rank + 1) * 512 // world)
    op = Counted(net, loss_fn, [(inputs[share], targets[share])])
    dist.barrier()
    started = time.perf_counter()
    result = lc.lanczos(op, k=1, tol=1e-3)
    seconds = time.perf_counter() - started
    held = result.num_iters + 4  # the basis and the product, residual and next vector
    report = {
        "world": world,
        "local_dim": op.dim,
        "total_dim": op.total_dim,
        "lambda_max": float(result.eigenvalues[0]),
        "products": result.num_matvecs,
        "iterations": result.num_iters,
        "reductions": op.reductions,
        "reduced_bytes": op.reduced_bytes,
        "basis_mb": held * op.dim * 4 / 2**20,
        "seconds": seconds,
    }
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    dist.destroy_process_group()


def unsharded(widths: list[int]) -> dict[str, float]:
    """The same λmax with exact products, and the float64 truth; product costs both ways."""
    net = model(widths)
    batch = probe(512)
    exact = lc.HessianOperator(net, loss_fn, [batch], verify=False)
    started = time.perf_counter()
    result = lc.lanczos(exact, k=1, tol=1e-3)
    seconds = time.perf_counter() - started
    net64 = model(widths).double()
    truth_op = lc.HessianOperator(net64, loss_fn, [(batch[0].double(), batch[1])], verify=False)
    truth = float(lc.lanczos(truth_op, k=1, tol=1e-10, num_iters=200).eigenvalues[0])
    v = torch.randn(exact.dim, generator=torch.Generator().manual_seed(0))
    finite = lc.HessianOperator(net, loss_fn, [batch], hvp_method="finite_difference")
    costs = {}
    for name, op in (("double backward", exact), ("finite difference", finite)):
        op.matvec(v)
        started_product = time.perf_counter()
        for _ in range(5):
            op.matvec(v)
        costs[name] = (time.perf_counter() - started_product) / 5
    reference = truth_op.matvec(v.double())
    errors = {
        name: float((op.matvec(v).double() - reference).norm() / reference.norm())
        for name, op in (("double backward", exact), ("finite difference", finite))
    }
    return {
        "lambda_max": float(result.eigenvalues[0]),
        "truth": truth,
        "products": result.num_matvecs,
        "seconds": seconds,
        "cost": costs,
        "error": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    widths = [64, 128, 128, 10] if args.quick else [64, 512, 512, 10]
    worlds = (1, 2) if args.quick else (1, 2, 4)
    torch.set_num_threads(1)
    print(f"{machine()}; gloo over loopback, one torch thread per process.\n")
    whole = unsharded(widths)
    print(
        f"Unsharded, exact products: λmax {whole['lambda_max']:.6f} in {whole['products']} "
        f"products, {whole['seconds']:.2f} s; float64 truth {whole['truth']:.6f}."
    )
    for name in ("double backward", "finite difference"):
        print(
            f"- one product by {name}: {1e3 * whole['cost'][name]:.1f} ms, relative error "
            f"{whole['error'][name]:.1e} against float64"
        )
    print(
        "\n| processes | local / total dim | λmax (rel. to truth) | products | reductions "
        "(per product) | bytes reduced | per-rank vectors MB | seconds |"
    )
    print("|---:|---|---|---:|---|---:|---:|---:|")
    for world in worlds:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            out = handle.name
        mp.spawn(rank_main, args=(world, find_free_network_port(), widths, out), nprocs=world)
        r = json.loads(Path(out).read_text())
        error = abs(r["lambda_max"] - whole["truth"]) / whole["truth"]
        print(
            f"| {world} | {r['local_dim']:,} / {r['total_dim']:,} | {r['lambda_max']:.6f} "
            f"({error:.1e}) | {r['products']} | {r['reductions']} "
            f"({r['reductions'] / r['products']:.1f}) | {r['reduced_bytes']:,} | "
            f"{r['basis_mb']:.2f} | {r['seconds']:.2f} |"
        )


if __name__ == "__main__":
    main()
