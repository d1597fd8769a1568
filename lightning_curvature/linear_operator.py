"""The public operator protocol, and the block helpers that operators and estimators share.

Estimators see only an object with ``matvec(v)``, ``dim``, ``device`` and ``dtype`` (and,
optionally, ``matmat(V)`` for a block of columns): a curvature operator of
:mod:`lightning_curvature.operators`, a dense matrix, or anything else with that shape.
Blocks are ``(name, slice)`` pairs over the flat vector, one per layer
(:func:`lightning_curvature.operators.blocks.parameter_blocks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast, runtime_checkable

import torch


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric linear map on flat vectors that lives on one device."""

    dim: int
    device: torch.device
    dtype: torch.dtype

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...


def check_operator(op: object) -> None:
    """Fail early, naming what is missing, when ``op`` is not a usable operator."""
    missing = [name for name in ("matvec", "dim", "device", "dtype") if not hasattr(op, name)]
    if missing:
        raise TypeError(
            f"op must provide matvec(v), dim, device and dtype; {type(op).__name__} lacks "
            f"{', '.join(missing)}"
        )
    dim = cast(Any, op).dim
    if int(dim) < 1:
        raise ValueError(f"op.dim must be at least 1, got {dim}")


def apply_block(op: LinearOperator, block: torch.Tensor) -> torch.Tensor:
    """``op`` applied to each column of ``block``; batched when the operator supports it."""
    matmat = getattr(op, "matmat", None)
    if matmat is not None:
        return cast(torch.Tensor, matmat(block))
    return torch.stack([op.matvec(block[:, j]) for j in range(block.shape[1])], dim=1)


Block = tuple[str, slice]


def check_blocks(blocks: Sequence[Block], dim: int) -> list[Block]:
    """``blocks`` as a list, checked to be non-empty, disjoint slices in flat-vector order."""
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or not blocks:
        raise ValueError(f"blocks must be a non-empty list of (name, slice) pairs, got {blocks!r}")
    stop = 0
    for entry in blocks:
        if (
            not isinstance(entry, tuple)
            or len(entry) != 2
            or not isinstance(entry[1], slice)
            or entry[1].step not in (None, 1)
        ):
            raise ValueError(f"blocks must be (name, slice) pairs, got {entry!r}")
        name, piece = entry
        if piece.start is None or piece.stop is None or not stop <= piece.start < piece.stop:
            raise ValueError(
                f"blocks must be non-empty, disjoint and in flat-vector order; block {name!r} "
                f"is {piece}"
            )
        if piece.stop > dim:
            raise ValueError(f"block {name!r} = {piece} ends past the operator's dim={dim}")
        stop = piece.stop
    return list(blocks)


def block_products(
    op: LinearOperator,
    blocks: Sequence[Block],
    packed: torch.Tensor,
    active: Sequence[int] | None = None,
) -> torch.Tensor:
    """``A_ll x_l`` for every active block ``l`` from ONE ``matmat`` of ``len(active)·m``
    columns: ``packed`` (dim, m) holds each block's vectors ``x_l`` in its own slice, the
    stacked probe masks column ``(l, j)`` to block ``l``, and block ``l`` of its product is
    kept. Blocks not in ``active`` cost nothing and come back zero."""
    active = range(len(blocks)) if active is None else active
    m = packed.shape[1]
    stacked = packed.new_zeros(packed.shape[0], len(active) * m)
    for column, index in enumerate(active):
        piece = blocks[index][1]
        stacked[piece, column * m : (column + 1) * m] = packed[piece]
    products = apply_block(op, stacked)
    result = torch.zeros_like(packed)
    for column, index in enumerate(active):
        piece = blocks[index][1]
        result[piece] = products[piece, column * m : (column + 1) * m]
    return result
