"""Parameters sharded by FSDP2 (``fully_shard``): each is a ``DTensor`` whose local part is
this rank's shard. Every layer that reads parameters, gradients or optimizer state as flat
vectors reads the local parts, so its vectors are this rank's shards (the operators' own
vectors under :class:`~lightning_curvature.operators.sharded.ShardedHessianOperator`)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch


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
