"""Run by tests/test_sharded_operator.py: ShardedHessianOperator on two CPU ranks over gloo.

``python tests/scripts/sharded_operator.py OUT`` spawns two processes; each builds the same
seeded model, shards it with FSDP2 (``fully_shard`` on a 2-rank CPU mesh), draws its OWN
probe batches, and applies the operator to fixed random vectors (the same global vectors on
every rank, each rank taking its shard). Every rank writes, per scenario, what the test
needs to check it against dense truth to ``OUT.rank<r>`` (JSON):

- ``lsq``: least squares, ``nn.Linear(8, 1)`` in float64, one batch per rank. Its weight has
  one row, so rank 1 holds empty shards (a vector of length 0).
- ``mlp64``, ``mlp32``, ``mlp_bf16``: a tanh MLP 6→8→3 with cross-entropy, two batches per
  rank (the gradients of several backward passes accumulate in the sharded ``.grad``), in
  float64, float32 and bfloat16, with ``.grad`` already set by a training step (it must
  survive).
- ``mlp_mixed``: the float32 MLP with ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``
  (FSDP2 runs the forward pass in bf16).
- ``dropout``: the float64 MLP with dropout in train mode: each batch's mask must be the
  same in every evaluation, or the differences would be noise.
- ``mismatch``: rank 0 passes two batches, rank 1 one: both must raise the same ValueError
  (not hang).
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning_fabric.plugins.environments.lightning import find_free_network_port
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lightning_curvature.operators.sharded import ShardedHessianOperator
from tests.truth import cross_entropy_loss

WORLD = 2
# name: (model kind, dtype of the parameters, dtype FSDP2 casts them to for forward or None)
SCENARIOS = {
    "lsq": ("lsq", torch.float64, None),
    "mlp64": ("mlp", torch.float64, None),
    "mlp32": ("mlp", torch.float32, None),
    "mlp_bf16": ("mlp", torch.bfloat16, None),
    "mlp_mixed": ("mlp", torch.float32, torch.bfloat16),
    "dropout": ("dropout", torch.float64, None),
}


def squared_error(model, batch):
    inputs, targets = batch
    return ((model(inputs) - targets) ** 2).mean()


def scenario(kind, dtype):
    """The model (seeded, the same on every rank), loss, batches per rank, and whether a
    training step sets ``.grad`` first."""
    torch.manual_seed(0)
    if kind == "lsq":
        return nn.Linear(8, 1).to(dtype), squared_error, 1, False
    layers = [nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)]
    if kind == "dropout":  # in train mode: a random mask in every forward pass
        layers.insert(2, nn.Dropout(0.5))
    return nn.Sequential(*layers).to(dtype), cross_entropy_loss, 2, True


def rank_batches(kind, rank, count, dtype):
    """This rank's own probe batches (different data on every rank)."""
    generator = torch.Generator().manual_seed(100 + rank)
    if kind == "lsq":
        x = torch.randn(16, 8, generator=generator, dtype=dtype)
        noise = torch.randn(16, 1, generator=generator, dtype=dtype)
        return [(x, x @ torch.ones(8, 1, dtype=dtype) + noise)]
    return [
        (
            torch.randn(10, 6, generator=generator, dtype=dtype),
            torch.randint(0, 3, (10,), generator=generator),
        )
        for _ in range(count)
    ]


def local_slice(full_flat, model_shapes, rank):
    """This rank's part of a vector in unsharded flat order: each parameter's rows as
    FSDP2 splits them (``torch.chunk`` on dim 0, rank 0 first)."""
    pieces, offset = [], 0
    for shape in model_shapes:
        numel = shape.numel()
        full = full_flat[offset : offset + numel].view(shape)
        offset += numel
        chunks = torch.chunk(full, WORLD, dim=0)
        mine = chunks[rank] if rank < len(chunks) else full[:0]
        pieces.append(mine.reshape(-1))
    return torch.cat(pieces)


def snapshot(params):
    """Every local shard and ``.grad`` shard, exactly (Python floats hold float32/64)."""

    def values(tensor):
        return None if tensor is None else tensor.to_local().detach().reshape(-1).tolist()

    return {"shards": [values(p) for p in params], "grads": [values(p.grad) for p in params]}


def run_scenario(kind, dtype, forward_dtype, rank, mesh):
    model, loss_fn, count, train_first = scenario(kind, dtype)
    state = {k: v.tolist() for k, v in model.state_dict().items()}
    shapes = [p.shape for p in model.parameters()]
    policy = MixedPrecisionPolicy(param_dtype=forward_dtype, reduce_dtype=dtype)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    batches = rank_batches(kind, rank, count, dtype)
    training_batch = rank_batches(kind, rank + 7, 1, dtype)[0]
    if train_first:  # a .grad the operator must leave as it is
        loss_fn(model, training_batch).backward()
    grads_before = [p.grad for p in model.parameters()]
    before = snapshot(list(model.parameters()))
    rng_before = torch.random.get_rng_state()

    op = ShardedHessianOperator(model, loss_fn, batches)
    generator = torch.Generator().manual_seed(7)  # the same global vectors on every rank
    global_block = torch.randn(op.total_dim, 2, generator=generator, dtype=torch.float64)
    block = torch.stack([local_slice(c, shapes, rank) for c in global_block.T], dim=1)
    block = block.to(op.dtype)
    products = op.matmat(block)
    report = {
        "state": state,
        "batches": [[t.tolist() for t in b] for b in batches],
        "local_numels": [p.to_local().numel() for p in op.params],
        "dim": op.dim,
        "total_dim": op.total_dim,
        "local_dims": op.local_dims,
        "dtype": str(op.dtype),
        "low_precision": str(op.low_precision),
        "v_local": block[:, 0].tolist(),
        "u_local": block[:, 1].tolist(),
        "hv_local": products[:, 0].tolist(),
        "hu_local": products[:, 1].tolist(),
        "vhv": op.inner(block[:, 0], products[:, 0]).item(),
        "inner_block": op.inner(block, products).tolist(),
        "inner_shapes": [
            list(op.inner(a, b).shape)
            for a in (block[:, 0], block)
            for b in (products[:, 0], products)
        ],
        "num_matvecs": op.num_matvecs,
        "repeated_exactly": torch.equal(op.matmat(block), products),
        "loss": op.loss,
        "gradient_local": op.gradient().tolist(),
    }
    op.release()
    report["before"], report["after"] = before, snapshot(list(model.parameters()))
    report["same_grad_objects"] = all(
        a is b for a, b in zip(grads_before, [p.grad for p in model.parameters()], strict=True)
    )
    report["rng_unchanged"] = torch.equal(rng_before, torch.random.get_rng_state())
    # Training goes on as if the operator had never run: the same step, the same gradient.
    for p in model.parameters():
        p.grad = None
    loss_fn(model, training_batch).backward()
    report["training_grads_after"] = snapshot(list(model.parameters()))["grads"]
    return report


def mismatched_batch_counts(rank, mesh):
    model, loss_fn, _, _ = scenario("mlp", torch.float64)
    fully_shard(model, mesh=mesh)
    batches = rank_batches("mlp", rank, 2 - rank, torch.float64)
    try:
        ShardedHessianOperator(model, loss_fn, batches)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


def worker(rank, port, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        reports = {name: run_scenario(*spec, rank, mesh) for name, spec in SCENARIOS.items()}
        reports["mismatch"] = mismatched_batch_counts(rank, mesh)
        with open(f"{out}.rank{rank}", "w") as handle:
            json.dump(reports, handle)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(find_free_network_port(), sys.argv[1]), nprocs=WORLD)
