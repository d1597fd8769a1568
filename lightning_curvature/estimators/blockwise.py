r"""Per-block (per-layer) curvature: traces and λmax of the diagonal blocks of an operator.

Blocks are ``(name, slice)`` pairs over the flat vector (see
:func:`lightning_curvature.operators.blocks.parameter_blocks`); :math:`A_{ll}` is the
diagonal block of block :math:`l`, the curvature of that layer with the others held fixed.

- :func:`blockwise_trace`: with Rademacher probes :math:`z`,
  :math:`\mathbb{E}[z_l^\top (Az)_l] = \operatorname{tr} A_{ll}`, so the SAME probes and
  products as the whole-model Hutchinson trace give every block's trace for free (0 extra
  matvecs), and the block estimates sum to the whole one.
- :func:`blockwise_lambda_max`: L Lanczos processes, one per block, in lockstep; each step
  is ONE L-column ``matmat`` of the operator, column ``l`` supported on block ``l``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from lightning_curvature.estimators._certificate import error_bounds
from lightning_curvature.estimators._common import (
    LinearOperator,
    apply_block,
    check_every,
    check_operator,
    check_positive_int,
    make_generator,
    rademacher,
    raise_if_not_finite,
    require_whole_vectors,
)
from lightning_curvature.estimators._projection import BREAKDOWN_EPS, rounding_floor
from lightning_curvature.estimators.hutchinson import TraceResult
from lightning_curvature.estimators.lanczos import default_num_iters
from lightning_curvature.linear_operator import Block, block_products, check_blocks


# ----------------------------------------------------------------------------- traces
@dataclass(frozen=True, eq=False)
class BlockwiseTrace:
    """The whole-operator Hutchinson trace and each block's, from the same probes.

    Attributes:
        whole: the trace of the operator (identical to :func:`hutchinson_trace` with the
            same ``num_probes``, ``seed`` and ``probes_per_block``).
        blocks: block name → that block's trace estimate and stderr. When the blocks cover
            the whole vector the estimates sum to ``whole.estimate`` (up to rounding). Their
            ``num_matvecs`` is the shared count: the blocks add no product.
    """

    whole: TraceResult
    blocks: dict[str, TraceResult]


def block_quadratic_forms(
    probes: torch.Tensor, products: torch.Tensor, blocks: Sequence[Block]
) -> torch.Tensor:
    """``z_lᵀ (A z)_l`` for each block ``l`` (rows) and probe (columns), from probes and
    products a trace run already made: no product is recomputed."""
    terms = probes * products
    return torch.stack([terms[piece].sum(dim=0) for _, piece in blocks])


def blockwise_trace(
    op: LinearOperator,
    blocks: Sequence[Block],
    num_probes: int = 30,
    seed: int = 0,
    *,
    probes_per_block: int = 8,
) -> BlockwiseTrace:
    """Hutchinson traces of the whole operator and of each diagonal block, at the cost of
    the whole one (``num_probes`` matvecs, 0 extra).

    Args:
        op: anything with ``matvec``/``matmat``, ``dim``, ``device`` and ``dtype``.
        blocks: ``(name, slice)`` pairs, e.g. from ``parameter_blocks``.
        num_probes, seed, probes_per_block: as for :func:`hutchinson_trace`.

    Example::

        >>> import torch
        >>> from lightning_curvature.operators import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0])))
        >>> result = blockwise_trace(op, [("a", slice(0, 1)), ("b", slice(1, 3))])
        >>> result.whole.estimate, result.blocks["b"].estimate
        (6.0, 5.0)
    """
    check_operator(op)
    require_whole_vectors(op, "per-layer blocks")
    blocks = check_blocks(blocks, op.dim)
    num_probes = check_positive_int("num_probes", num_probes, minimum=2)
    probes_per_block = check_positive_int("probes_per_block", probes_per_block)
    generator = make_generator(op, seed)
    whole_terms, block_terms = [], []
    for start in range(0, num_probes, probes_per_block):
        z = rademacher(op, min(probes_per_block, num_probes - start), generator)
        az = apply_block(op, z)
        whole_terms.append((z * az).sum(dim=0))
        block_terms.append(block_quadratic_forms(z, az, blocks))
    whole = torch.cat(whole_terms)
    raise_if_not_finite(whole, "Hutchinson's trace estimator")
    per_block = torch.cat(block_terms, dim=1).double().cpu()  # the one transfer to the host
    whole = whole.double().cpu()

    def result(terms: torch.Tensor) -> TraceResult:
        return TraceResult(
            estimate=float(terms.mean()),
            stderr=float(terms.std(correction=1)) / math.sqrt(num_probes),
            method="hutchinson",
            num_probes=num_probes,
            num_matvecs=num_probes,
        )

    return BlockwiseTrace(
        whole=result(whole),
        blocks={name: result(per_block[i]) for i, (name, _) in enumerate(blocks)},
    )


# ----------------------------------------------------------------------------- λmax
@dataclass(frozen=True, eq=False)
class BlockwiseLambdaMax:
    """λmax of every diagonal block, each with its own convergence evidence.

    Attributes:
        names: the block names, in order.
        eigenvalues: (L,) float64 on the CPU: λmax of each block.
        residuals, error_bounds: (L,) per block, as in :class:`LanczosResult`: each bound
            is the residual norm plus the rounding floor of that block's products.
        num_iters: Lanczos steps each block took.
        converged: per block, its error bound is within ``tol`` times its spectral scale,
            or its residual is below the rounding floor (as for :func:`lanczos`), or its
            Krylov space became invariant (exact up to that floor).
        num_steps: batched products (``matmat`` calls) made.
        num_matvecs: operator columns applied in all (a step costs one per active block).
    """

    names: tuple[str, ...]
    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    error_bounds: torch.Tensor
    num_iters: tuple[int, ...]
    converged: tuple[bool, ...]
    num_steps: int
    num_matvecs: int

    def as_dict(self) -> dict[str, float]:
        """Block name → λmax."""
        return dict(zip(self.names, self.eigenvalues.tolist(), strict=True))


class _PackedBlocks:
    """Per-block inner products of packed vectors (block ``l``'s vector in its slice)."""

    def __init__(self, blocks: list[Block], dim: int, device: torch.device) -> None:
        self.count = len(blocks)
        self.index = torch.full((dim,), self.count, dtype=torch.long, device=device)
        for i, (_, piece) in enumerate(blocks):
            self.index[piece] = i

    def sums(self, values: torch.Tensor) -> torch.Tensor:
        """(r, dim) -> (r, L): the sum of each row over each block's coordinates."""
        total = values.new_zeros(values.shape[0], self.count + 1)
        return total.index_add_(1, self.index, values)[:, : self.count]

    def expand(self, per_block: torch.Tensor) -> torch.Tensor:
        """(..., L) -> (..., dim): each block's number on its coordinates, 0 elsewhere."""
        padded = torch.cat([per_block, per_block.new_zeros(*per_block.shape[:-1], 1)], dim=-1)
        return padded[..., self.index]


def blockwise_lambda_max(
    op: LinearOperator,
    blocks: Sequence[Block],
    tol: float = 1e-4,
    num_iters: int | None = None,
    seed: int = 0,
) -> BlockwiseLambdaMax:
    """λmax of every diagonal block ``A_ll`` with ONE batched Lanczos.

    This is the batched variant of :func:`lanczos` (whose Ritz extraction and error bounds
    it reuses): L Lanczos processes run in lockstep on packed vectors, block ``l``'s process
    in block ``l``'s slice, with per-block inner products and full per-block
    re-orthogonalisation. Each step is one :func:`block_products` call, applying every
    still-active block once, so the L processes take as many steps as the slowest. A block stops
    when its own bound on λmax (its residual plus its products' rounding floor) is within
    ``tol`` times its largest Ritz magnitude, or its residual is below that floor (as
    ``lanczos(k=1)``), when its Krylov space becomes invariant (then exact up to the
    floor), or after ``num_iters`` steps or as many steps as it has coordinates. Every
    threshold is relative to the block's own scale, so a layer of curvature 1e-8 is found
    as accurately as one of 1.

    Cost: each step applies every still-active block once. Operators that can apply a
    diagonal block directly (the Hessian and the GGN/Fisher on their kept graphs)
    differentiate towards that block's parameters alone, which autograd prunes; others get
    full products on masked vectors (:func:`~..linear_operator.block_products`). On a small
    CNN on a CPU the direct blocks made per-layer λmax 3.4-4.6× faster than masked ones, and
    0.85-0.93× the time of L separate :func:`lanczos` runs on ``params=`` operators
    (``benchmarks/RESULTS.md``).

    Args:
        op: the whole operator (anything with ``matmat``/``matvec``, ``dim``, ``device``,
            ``dtype``).
        blocks: ``(name, slice)`` pairs, e.g. from ``parameter_blocks``.
        tol: relative accuracy of each block's λmax; ``0`` runs ``num_iters`` steps.
        num_iters: the most steps per block, default that of ``lanczos(k=1)``.
        seed: seeds the start vectors; the global RNG is never touched.

    Example::

        >>> import torch
        >>> from lightning_curvature.operators import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)))
        >>> blockwise_lambda_max(op, [("a", slice(0, 2)), ("b", slice(2, 4))]).as_dict()
        {'a': 2.0, 'b': 4.0}
    """
    check_operator(op)
    require_whole_vectors(op, "per-layer blocks")
    blocks = check_blocks(blocks, op.dim)
    if num_iters is None:
        num_iters = default_num_iters(1)
    num_iters = check_positive_int("num_iters", num_iters)
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    packing = _PackedBlocks(blocks, op.dim, op.device)
    caps = [min(num_iters, piece.stop - piece.start) for _, piece in blocks]
    steps_cap = max(caps)
    # One row per step, shared by the blocks (each block's vector is zero elsewhere).
    basis = torch.empty((steps_cap, op.dim), device=op.device, dtype=op.dtype)
    # Each block's QᵀÃQ as computed, column by column (upper Hessenberg, the couplings β
    # below the diagonal): its symmetric tridiagonal part is the projection, the rest (zero
    # in exact arithmetic) measures the products' rounding.
    shape = (steps_cap + 1, steps_cap, len(blocks))
    products = torch.zeros(shape, device=op.device, dtype=op.dtype)

    generator = make_generator(op, seed)
    start = torch.randn(op.dim, generator=generator, device=op.device, dtype=op.dtype)
    start = start * packing.expand(torch.ones(len(blocks), device=op.device, dtype=op.dtype))
    basis[0] = start / packing.expand(packing.sums(start[None] ** 2)[0].sqrt())

    active = list(range(len(blocks)))
    final: dict[int, tuple[_BlockRun, bool]] = {}
    size, num_matvecs, next_check = 0, 0, check_every(op.device)
    while active:
        w = block_products(op, blocks, basis[size][:, None], active)[:, 0]
        num_matvecs += len(active)
        w, coefficients = _project_out(basis, packing, size + 1, w)
        norms = packing.sums(w[None] ** 2)[0].sqrt()
        products[: size + 1, size] = coefficients
        products[size + 1, size] = norms
        size += 1
        if size < steps_cap:
            keep = torch.zeros(len(blocks), device=op.device, dtype=op.dtype)
            keep[active] = 1.0
            # Guarded against 0/0 only: an absolute floor here shrank every vector of a
            # block whose curvature was below it. A block that broke down may write
            # noise; the host check discards it.
            norms = norms.clamp_min(torch.finfo(op.dtype).tiny)
            basis[size] = w / packing.expand(norms) * packing.expand(keep)
        if size < next_check and size not in caps:
            continue
        next_check = size + check_every(op.device)
        computed = products[: size + 1, :size].double().cpu().numpy()  # one host sync
        eps = torch.finfo(op.dtype).eps
        for index in list(active):
            cap, whole = caps[index], blocks[index][1].stop - blocks[index][1].start
            done = _finished(computed[:, :, index], size, cap, whole, tol, eps)
            if done is not None:
                final[index] = done
                active.remove(index)
    return _result(blocks, final, size, num_matvecs)


def _finished(
    computed: np.ndarray, size: int, cap: int, whole: int, tol: float, eps: float
) -> tuple[_BlockRun, bool] | None:
    """One block's run and whether it converged, when it is done after ``size`` steps (a
    breakdown, its step cap ``cap``, or ``tol`` met); None while it goes on. ``whole``: the
    block's size (a run that spans it is exact)."""
    a, b = np.diagonal(computed), np.diagonal(computed, -1)
    finite = np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)], [0.0]])
    broken = np.flatnonzero(~(b > BREAKDOWN_EPS * eps * np.abs(finite).max()))  # NaN too
    cut = int(broken[0]) + 1 if broken.size else size
    raise_if_not_finite(
        torch.from_numpy(np.concatenate([a[:cut], b[: cut - 1]])), "blockwise Lanczos"
    )
    # An invariant Krylov space: its Ritz values are exact up to the products' rounding;
    # the last coupling, below the breakdown level, stays in the residual.
    run = _BlockRun(computed[: cut + 1, :cut], eps)
    if broken.size:
        return run, True
    if size >= cap:
        return run, cap == whole or run.resolved(tol)
    if run.resolved(tol):
        return run, True
    return None


def _project_out(
    basis: torch.Tensor, packing: _PackedBlocks, size: int, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` minus, block by block, its components on the first ``size`` basis rows
    (classical Gram-Schmidt twice, as in :func:`lanczos`), and those (size, L) components."""
    rows = basis[:size]
    total = None
    for _ in range(2):
        coefficients = packing.sums(rows * w)
        w = w - (rows * packing.expand(coefficients)).sum(dim=0)
        total = coefficients if total is None else total + coefficients
    assert total is not None
    return w, total


@dataclass(frozen=True, eq=False)
class _BlockRun:
    """One block's Lanczos run: ``products`` (m + 1, m) is its ``QᵀÃQ`` as computed, the
    couplings β below the diagonal, the last of which leads out of the basis."""

    products: np.ndarray
    eps: float

    def evidence(self) -> tuple[float, float, float, float, float]:
        """λmax of the block's tridiagonal, its residual, its error bound (the residual
        plus the rounding floor: a gap taken from Ritz values is not certified, see
        :func:`~._certificate.error_bounds`), that floor, and the block's spectral scale."""
        a, b = np.diagonal(self.products).copy(), np.diagonal(self.products, -1).copy()
        if a.size == 1:
            theta, vectors = a, np.ones((1, 1))
        else:
            theta, vectors = eigh_tridiagonal(a, b[:-1])
        residuals = np.abs(b[-1] * vectors[-1])
        scale = float(np.max(np.abs(theta)))
        floor = rounding_floor(self.products[:-1], scale, self.eps)
        bound = float(error_bounds(theta, residuals, np.array([theta.size - 1]), floor)[0])
        return float(theta[-1]), float(residuals[-1]), bound, floor, scale

    def resolved(self, tol: float) -> bool:
        """Its bound is within ``tol`` of its scale, or its residual under the floor."""
        if self.products.shape[1] < 2:  # one step certifies nothing
            return False
        _, residual, bound, floor, scale = self.evidence()
        return bound <= tol * scale or (tol > 0 and residual <= floor)


def _result(
    blocks: list[Block],
    final: dict[int, tuple[_BlockRun, bool]],
    num_steps: int,
    num_matvecs: int,
) -> BlockwiseLambdaMax:
    values, residuals, bounds = [], [], []
    for index in range(len(blocks)):
        value, residual, bound, _, _ = final[index][0].evidence()
        values.append(value)
        residuals.append(residual)
        bounds.append(bound)
    return BlockwiseLambdaMax(
        names=tuple(name for name, _ in blocks),
        eigenvalues=torch.tensor(values, dtype=torch.float64),
        residuals=torch.tensor(residuals, dtype=torch.float64),
        error_bounds=torch.tensor(bounds, dtype=torch.float64),
        num_iters=tuple(final[i][0].products.shape[1] for i in range(len(blocks))),
        converged=tuple(final[i][1] for i in range(len(blocks))),
        num_steps=num_steps,
        num_matvecs=num_matvecs,
    )
