r"""Per-layer curvature: how a flat parameter vector splits into blocks, and the
block-diagonal part of an operator.

A block is a contiguous slice of the flat vector (the operator's ``param_names`` order),
named by what it holds. For a block partition :math:`P_1..P_L` (coordinate projections),
the block-diagonal part of :math:`A` is

.. math:: D = \sum_{l=1}^{L} P_l A P_l ,

whose diagonal blocks :math:`A_{ll}` are the curvature of layer :math:`l` with every other
layer held fixed (the same matrix as the operator restricted with ``params=`` that layer).

Example::

    >>> import torch
    >>> from lightning_curvature.operators.blocks import parameter_blocks
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> names, params = zip(*model.named_parameters())
    >>> parameter_blocks(names, params)
    [('0', slice(0, 16, None)), ('2', slice(16, 26, None))]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from lightning_curvature.linear_operator import Block, block_products, check_blocks
from lightning_curvature.operators.base import OperatorWrapper


def parameter_blocks(
    param_names: Sequence[str],
    params: Sequence[torch.Tensor],
    per_layer: bool | Sequence[str] = True,
) -> list[Block]:
    """Split a flat parameter vector into named, contiguous blocks.

    Args:
        param_names: parameter names in flat-vector order (an operator's ``param_names``).
        params: the parameters, same order (only their sizes are read).
        per_layer: ``True`` for one block per module: the parameters that share a module
            path (``"encoder.0.weight"`` and ``"encoder.0.bias"`` form block
            ``"encoder.0"``; a parameter without a dot is a block of its own). Or a list of
            regular expressions: block ``i`` holds the parameters whose name matches
            pattern ``i`` (``re.search``; the first matching pattern wins) and is named by
            the pattern; parameters that match no pattern belong to no block.

    Returns:
        ``[(name, slice), ...]`` in flat-vector order.

    Raises:
        ValueError: when the names and parameters differ in number, a pattern is not a
            valid regex or matches nothing, or a block's parameters are not contiguous in
            the flat vector (a slice cannot hold them).
    """
    param_names, params = list(param_names), list(params)
    if len(param_names) != len(params):
        raise ValueError(
            f"param_names and params must have the same length, got {len(param_names)} "
            f"and {len(params)}"
        )
    labels: list[str | None]
    if per_layer is True:
        labels = [name.rsplit(".", 1)[0] if "." in name else name for name in param_names]
    elif isinstance(per_layer, (str, bytes)) or not isinstance(per_layer, Sequence):
        raise ValueError(
            f"per_layer must be True or a list of regular expressions, got {per_layer!r}"
        )
    else:
        labels = _labels_from_patterns(param_names, list(per_layer))

    blocks: list[Block] = []
    offset, seen = 0, set()
    for name, label, p in zip(param_names, labels, params, strict=True):
        size = p.numel()
        if label is not None:
            if blocks and blocks[-1][0] == label and blocks[-1][1].stop == offset:
                blocks[-1] = (label, slice(blocks[-1][1].start, offset + size))
            elif label in seen:
                raise ValueError(
                    f"block {label!r} is not contiguous in the flat vector (parameter {name!r} "
                    "comes after another block): pass patterns that select whole modules"
                )
            else:
                blocks.append((label, slice(offset, offset + size)))
                seen.add(label)
        offset += size
    return blocks


def _labels_from_patterns(names: list[str], patterns: list[Any]) -> list[str | None]:
    if not patterns:
        raise ValueError("per_layer must name at least one pattern, got an empty list")
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as error:
            raise ValueError(
                f"per_layer entry {pattern!r} is not a valid regular expression: {error}"
            ) from None
    labels: list[str | None] = []
    for name in names:
        match = next((c.pattern for c in compiled if c.search(name)), None)
        labels.append(match)
    for c in compiled:
        if c.pattern not in labels:
            raise ValueError(
                f"per_layer pattern {c.pattern!r} matches no parameter (of {len(names)}: "
                f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) or only ones an "
                "earlier pattern took"
            )
    return labels


class BlockDiagonalOperator(OperatorWrapper):
    r"""The block-diagonal part :math:`D = \sum_l P_l A P_l` of an operator ``op``.

    One product ``D V`` of a (dim, m) block is :func:`block_products`: each block applied
    directly where ``op`` can (on its kept graph, towards that block's parameters alone),
    else ONE ``op.matmat`` of L·m columns, column ``(l, j)`` being ``V[:, j]`` masked to block
    ``l``, of whose product block ``l`` is kept.

    Args:
        op: any operator (Hessian, GGN, Fisher, or a wrapper of one).
        blocks: ``(name, slice)`` pairs from :func:`parameter_blocks`; coordinates in no
            block are mapped to zero.

    Example::

        >>> import torch
        >>> from lightning_curvature.operators import DenseOperator
        >>> matrix = torch.arange(16.0).reshape(4, 4)
        >>> D = BlockDiagonalOperator(DenseOperator(matrix + matrix.T),
        ...                           [("a", slice(0, 1)), ("b", slice(1, 4))])
        >>> D.matmat(torch.eye(4))
        tensor([[ 0.,  0.,  0.,  0.],
                [ 0., 10., 15., 20.],
                [ 0., 15., 20., 25.],
                [ 0., 20., 25., 30.]])
    """

    def __init__(self, op: Any, blocks: Sequence[Block]) -> None:
        super().__init__(op)
        self.blocks = check_blocks(blocks, op.dim)
        self.names = [name for name, _ in self.blocks]

    def block_products(
        self, packed: torch.Tensor, active: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Each active block's ``A_ll x_l`` from one matmat (see :func:`block_products`)."""
        return block_products(self.inner, self.blocks, packed, active)

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        return block_products(self.inner, self.blocks, block)
