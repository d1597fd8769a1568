"""``analyze`` under ``torchrun``: the checkpoint's model sharded by FSDP2 (``fully_shard``)
over the processes, each holding a slice of every parameter and of every Krylov vector.

Every process loads the checkpoint and samples the same probe batches; process r keeps
batches r, r + world, ... (the Hessian is that of their mean, as unsharded: equal counts).
Products are finite differences on the shards
(:class:`~lightning_curvature.operators.sharded.ShardedHessianOperator`); the optimizer's
preconditioner is read from the checkpoint unsharded and sliced as FSDP2 slices the
parameters. Only process 0 writes and prints.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_curvature.cli._shared import CliError


def world_size() -> int:
    """The processes ``torchrun`` started (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_arguments(args: argparse.Namespace) -> None:
    """What a sharded analysis measures: the whole Hessian, on batches the processes share
    evenly."""
    world = world_size()
    if args.curvature != "hessian" or args.per_layer or args.solve:
        raise CliError(
            "under torchrun analyze measures the whole Hessian only: drop --curvature, "
            "--per-layer and --solve, or run it in one process"
        )
    if args.num_batches % world:
        raise CliError(
            f"--num-batches {args.num_batches} must be a multiple of the {world} processes "
            "(each takes the same number of probe batches)"
        )


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """The default process group for ``torchrun``'s processes, for the analysis."""
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()


def shard(model: nn.Module, device: torch.device) -> None:
    """``fully_shard`` the model, whole, over every process (a 1-D mesh)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh(device.type, (world_size(),)))


def my_batches(batches: Sequence[Any]) -> list[Any]:
    """This process's share of the probe batches."""
    import torch.distributed as dist

    return list(batches[dist.get_rank() :: world_size()])


def is_writer() -> bool:
    import torch.distributed as dist

    return dist.get_rank() == 0


def shard_flat(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> torch.Tensor:
    """This process's slice of a flat vector over whole parameters of ``shapes``: each
    parameter chunked on dim 0 as FSDP2 chunks it (``torch.chunk``: a rank past the
    chunks holds none), the slices concatenated."""
    import torch.distributed as dist

    rank, pieces, offset = dist.get_rank(), [], 0
    for shape in shapes:
        count = shape.numel()
        whole = flat[offset : offset + count].reshape(shape)
        offset += count
        chunks = torch.chunk(whole, world_size(), dim=0) if whole.ndim else (whole,)
        pieces.append(chunks[rank].reshape(-1) if rank < len(chunks) else flat.new_empty(0))
    return torch.cat(pieces)
