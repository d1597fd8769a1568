"""Run by tests/test_sharded_estimators.py: the estimators on vectors sharded across two CPU
processes (gloo), each holding a slice of every vector, against the same matrix whole.

The operator is a dense symmetric matrix with a known spectrum, sharded by rows: process r
holds its slice of every vector and the matching rows of the matrix. Each process writes
what it measured to ``OUT.rank<r>`` as JSON.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning_fabric.plugins.environments.lightning import find_free_network_port

import lightning_curvature as lc
from lightning_curvature.estimators.blockwise import blockwise_lambda_max
from lightning_curvature.operators import CurvatureOperator
from tests.truth import matrix_with_spectrum

SIZE = 301  # odd: the two shards differ in length (150 and 151)


def spectrum() -> torch.Tensor:
    """Separated top and bottom outliers over a bulk, as a network's Hessian has."""
    outliers = torch.tensor([40.0, 31.0, 25.0, 21.0, 18.0, -9.0, -6.0], dtype=torch.float64)
    bulk = torch.linspace(-2.0, 8.0, SIZE - outliers.numel(), dtype=torch.float64)
    return torch.cat([outliers, bulk])


def shard_slice(rank: int, world: int) -> slice:
    bounds = [SIZE * r // world for r in range(world + 1)]
    return slice(bounds[rank], bounds[rank + 1])


class RowShardedMatrix(CurvatureOperator):
    """A dense matrix whose vectors are sharded by rows across the processes."""

    def __init__(self, matrix: torch.Tensor, rank: int, world: int) -> None:
        self.rows = shard_slice(rank, world)
        super().__init__(self.rows.stop - self.rows.start, matrix.device, matrix.dtype)
        self.matrix, self.rank = matrix, rank
        self.reductions = 0

    @property
    def total_dim(self) -> int:
        return self.matrix.shape[0]

    @property
    def shard_index(self) -> int:
        return self.rank

    def sum_over_shards(self, partial: torch.Tensor) -> torch.Tensor:
        self.reductions += 1
        total = partial.clone()
        dist.all_reduce(total)
        return total

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        whole = block.new_zeros(self.total_dim, block.shape[1])
        whole[self.rows] = block
        dist.all_reduce(whole)  # every process gets the whole block
        return self.matrix[self.rows] @ whole


def run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    matrix = matrix_with_spectrum(spectrum(), seed=3)
    op = RowShardedMatrix(matrix, rank, world)
    report: dict = {"rows": [op.rows.start, op.rows.stop]}

    top = lc.lanczos(op, k=5, return_eigenvectors=True)
    report["top"] = {
        "eigenvalues": top.eigenvalues.tolist(),
        "error_bounds": top.error_bounds.tolist(),
        "converged": top.converged,
        "num_matvecs": top.num_matvecs,
        "vector_shards": top.eigenvectors.T.tolist(),
    }
    warm = lc.lanczos(op, k=1, init=top.eigenvectors[:, 0])
    report["warm"] = {"eigenvalue": float(warm.eigenvalues[0]), "num_matvecs": warm.num_matvecs}
    smallest = lc.lanczos(op, k=1, which="smallest")
    report["smallest"] = {
        "eigenvalue": float(smallest.eigenvalues[0]),
        "error_bound": float(smallest.error_bounds[0]),
        "converged": smallest.converged,
    }
    power = lc.power_iteration(op, num_iters=500, tol=1e-9)
    report["power"] = {"eigenvalue": power.eigenvalue, "residual": power.residual}
    plain = lc.hutchinson_trace(op, num_probes=300, seed=1)
    deflated = lc.hutchinson_trace(
        op, num_probes=30, seed=1, deflate=top.eigenvectors, deflate_values=top.eigenvalues
    )
    report["trace"] = {
        "plain": [plain.estimate, plain.stderr],
        "deflated": [deflated.estimate, deflated.stderr],
    }
    density = lc.spectral_density(op, num_runs=4, num_iters=40, seed=2)
    report["density"] = {"nodes_max": float(density.nodes.max()), "num_iters": density.num_iters}
    refused = {}
    for name, call in (
        ("hutch++", lambda: lc.hutchinson_trace(op, num_probes=30, method="hutch++")),
        ("blockwise", lambda: blockwise_lambda_max(op, [("a", slice(0, 10))])),
    ):
        try:
            call()
        except ValueError as error:
            refused[name] = str(error)
    report["refused"] = refused
    report["reductions"] = op.reductions
    with open(f"{out}.rank{rank}", "w") as handle:
        json.dump(report, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(2, find_free_network_port(), sys.argv[1]), nprocs=2)
