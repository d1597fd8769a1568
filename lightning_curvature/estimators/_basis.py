"""The orthonormal basis of a Krylov process, kept on the device, and its Gram-Schmidt passes
(see :mod:`._krylov` for the process that grows it)."""

from __future__ import annotations

from typing import Any

import torch

from lightning_curvature.linear_operator import inner, norms

# Daniel-Gragg-Kaufman-Stewart: a second Gram-Schmidt pass is needed when the first one
# removed more than this share of the vector's norm (cancellation magnifies rounding).
DGKS_RATIO = 2**-0.5


class Basis:
    """The orthonormal vectors, one per row of one contiguous device buffer.

    The buffer starts at ``INITIAL_ROWS`` rows and doubles as steps come, so memory follows
    the steps taken (often 10-30), not the most allowed, and every Gram-Schmidt pass is one
    matrix-vector product over a contiguous block. Its inner products and norms go through
    the operator's (:mod:`lightning_curvature.linear_operator`), so a basis of sharded vectors
    holds this process's slice of each, and a pass costs one reduction over the shards.
    """

    INITIAL_ROWS = 16

    def __init__(self, op: Any, capacity: int):
        self.op, self.capacity = op, capacity
        rows = min(self.INITIAL_ROWS, capacity)
        self.rows = torch.empty((rows, op.dim), device=op.device, dtype=op.dtype)
        self.size = 0

    @property
    def active(self) -> torch.Tensor:
        return self.rows[: self.size]

    def append(self, vector: torch.Tensor) -> None:
        if self.size == self.rows.shape[0]:
            grown = self.rows.new_empty((min(2 * self.size, self.capacity), self.rows.shape[1]))
            grown[: self.size] = self.rows[: self.size]
            self.rows = grown
        self.rows[self.size] = vector
        self.size += 1

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``Qᵀ c``: a vector for a (size,) ``c``, a block for a (size, k) one."""
        return self.active.mT @ coefficients.to(self.rows.dtype)

    def project_out(
        self, vector: torch.Tensor, *, adaptive: bool, reference: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``vector`` minus its components on the basis, and those components (float64).

        One classical Gram-Schmidt pass is one product with the contiguous basis each way.
        A second pass follows when the DGKS test says the first lost accuracy to
        cancellation (``adaptive``, where reading a norm costs no device sync), or always.
        ``reference`` is the norm the test compares against (default: the input's norm).
        """
        rows, op = self.active, self.op
        coefficients = inner(op, rows, vector)
        before = norms(op, vector) if reference is None else reference
        vector = torch.addmv(vector, rows.mT, coefficients, alpha=-1)
        total = coefficients.double()
        if not adaptive or float(norms(op, vector)) < DGKS_RATIO * float(before):
            coefficients = inner(op, rows, vector)
            vector = torch.addmv(vector, rows.mT, coefficients, alpha=-1)
            total = total + coefficients.double()
        return vector, total


def lanczos_orthogonalise(
    basis: Basis, w: torch.Tensor, adaptive: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w = A q_j`` made orthogonal to the basis, with its coefficients ``Qᵀ A q_j``.

    The three-term recurrence puts nearly all of ``w`` on ``q_j`` and ``q_{j-1}``; removing
    those first leaves only rounding for the global pass, which then rarely needs a second
    (the DGKS test, where reading a norm costs no device sync). Where it would cost one
    (accelerators) both global passes always run, and the second cleans up what the first
    leaves whatever ``w`` was, so the local pass is skipped: one fused pass over the whole
    basis, then the second.
    """
    if not adaptive:
        return basis.project_out(w, adaptive=False)
    size = basis.size
    tail = basis.rows[max(size - 2, 0) : size]
    local = inner(basis.op, tail, w)
    w = torch.addmv(w, tail.mT, local, alpha=-1)
    w, coefficients = basis.project_out(w, adaptive=adaptive)
    coefficients[max(size - 2, 0) :] += local.double()
    return w, coefficients
