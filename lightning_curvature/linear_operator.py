"""The public operator protocol, and the block helpers that operators and estimators share.

Estimators see only an object with ``matvec(v)``, ``dim``, ``device`` and ``dtype`` (and,
optionally, ``matmat(V)`` for a block of columns): a curvature operator of
:mod:`lightning_curvature.operators`, a dense matrix, or anything else with that shape.
An operator whose vectors are sharded across processes (each process holds a slice of
length ``dim``) adds ``sum_over_shards`` (the all-reduce behind every inner product and
norm), ``total_dim`` and ``shard_index``; estimators reduce only through :func:`inner`,
:func:`norms` and :func:`sum_over_shards`, so they run unchanged on it.
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


def sum_over_shards(op: object, partial: torch.Tensor) -> torch.Tensor:
    """The sum over every process of ``partial``, this process's part of a reduction over
    the operator's vector space (an inner product, a norm's square).

    An operator whose vectors are whole on every process (all but the sharded ones) has
    nothing to add, and ``partial`` is the answer. An operator whose vectors are sharded
    across processes (each holds a slice of every vector) provides ``sum_over_shards``
    itself: one all-reduce per call, however many numbers ``partial`` holds, so an
    estimator batches its reductions (a Gram-Schmidt pass is one call, not one per
    vector)."""
    own = getattr(op, "sum_over_shards", None)
    return partial if own is None else cast(torch.Tensor, own(partial))


def inner(op: object, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` contracted over the operator's vector space (a's last dimension, b's first,
    as in ``torch.matmul``), summed over shards when vectors are sharded."""
    return sum_over_shards(op, a @ b)


def norms(op: object, block: torch.Tensor) -> torch.Tensor:
    """The Euclidean norm of a vector, or of each column of a (dim, m) block, over the
    operator's whole vector space."""
    if total_dim(op) == cast(Any, op).dim:  # whole vectors: torch's own (scaled) norm
        return torch.linalg.vector_norm(block, dim=0)
    return sum_over_shards(op, block.square().sum(dim=0)).sqrt()


def total_dim(op: object) -> int:
    """The length of the operator's vectors over all shards (``dim`` is this process's
    slice): what counts eigenvalues and caps a Krylov space."""
    return int(getattr(op, "total_dim", cast(Any, op).dim))


def shard_index(op: object) -> int:
    """Which shard of each vector this process holds (0 when vectors are whole): random
    probes differ per shard, so a sharded vector is as random as a whole one."""
    return int(getattr(op, "shard_index", 0))


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
    kept. Blocks not in ``active`` cost nothing and come back zero.

    An operator that can apply its diagonal blocks directly (cheaper than masked full
    products) provides ``diagonal_block_products(blocks, packed, active)``, which answers
    the same or ``None`` when it cannot."""
    active = range(len(blocks)) if active is None else active
    own = getattr(op, "diagonal_block_products", None)
    direct = None if own is None else own(blocks, packed, active)
    if direct is not None:
        return cast(torch.Tensor, direct)
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
