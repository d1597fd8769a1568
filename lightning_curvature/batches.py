"""The one home of batch copying: move a (nested) batch to a device, cast it, or take a
detached copy of it.

Batches are whatever a DataLoader yields: tensors inside tuples, lists, mappings,
namedtuples and dataclasses. ``lightning_utilities``' ``apply_to_collection`` walks all of
them (dataclasses included, frozen ones too) and rebuilds the containers, so a copy never
shares a container or a tensor with the batch it came from.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection


def move_batch(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Every tensor of ``batch`` on ``device``; floating ones cast to ``dtype`` when given.

    Tensors already there (and of that dtype) are shared, not copied.
    """

    def move(tensor: torch.Tensor) -> torch.Tensor:
        target = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
        return tensor.to(device=device, dtype=target)

    return apply_to_collection(batch, torch.Tensor, move, allow_frozen=True)


def detached_copy(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """A copy of ``batch`` on ``device`` that shares no tensor storage with it, detached from
    any graph: a ``training_step`` that later edits its batch in place cannot reach it."""

    def copy(tensor: torch.Tensor) -> torch.Tensor:
        target = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
        return tensor.detach().to(device=device, dtype=target, copy=True)

    return apply_to_collection(batch, torch.Tensor, copy, allow_frozen=True)
