"""Parameters sharded by FSDP2 (``fully_shard``): each is a ``DTensor`` whose local part is
this rank's shard. Every layer that reads parameters, gradients or optimizer state as flat
vectors reads the local parts, so its vectors are this rank's shards (the operators' own
vectors under :class:`~lightning_curvature.operators.sharded.ShardedHessianOperator`)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (nothing is, unless torch's tensor API is loaded)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor``; any other tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def holds_shards(params: Iterable[torch.Tensor]) -> bool:
    """Whether any of ``params`` is sharded."""
    return any(is_sharded(p) for p in params)


def sharded_parameters(module: nn.Module, group: Any = None) -> tuple[list[str], list[Any]]:
    """The names and ``DTensor``\\ s of ``module``'s trainable parameters, checked to be
    sharded on dim 0 over all ranks of ``group`` (what ``fully_shard`` on a 1-D mesh makes).

    Raises:
        ValueError: naming the first parameter that is not (replicated or hybrid-sharded
            parameters would be counted once per rank by the inner products).
    """
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the module has no trainable parameters (none with requires_grad)")
    for name, p in named:
        if not isinstance(p, DTensor):
            raise ValueError(
                f"parameter {name!r} is a plain tensor, not a DTensor: apply fully_shard to "
                "the module (and its submodules) before building a ShardedHessianOperator"
            )
        world = dist.get_world_size(group)  # (a DTensor means a process group exists)
        if tuple(p.placements) != (Shard(0),) or p.device_mesh.size() != world:
            raise ValueError(
                f"parameter {name!r} is placed {tuple(p.placements)} on a mesh of "
                f"{p.device_mesh.size()} ranks; the operator needs it sharded on dim 0 over "
                f"all {world} ranks of the group (fully_shard on a 1-D mesh)"
            )
    return [name for name, _ in named], [p for _, p in named]
