"""What every estimator shares: the operator protocol, seeded probes and block products.

Estimators see only an object with ``matvec(v)``, ``dim``, ``device`` and ``dtype``
(and, optionally, ``matmat(V)`` for a block of columns). They never touch the global RNG:
every random vector comes from a private ``torch.Generator`` seeded by the caller.
"""

from __future__ import annotations

import numbers
from typing import Any, Protocol, cast, runtime_checkable

import torch

from lightning_curvature._checks import check_int, check_number

# Iterations between convergence checks on an accelerator, where each check is a host sync
# that stalls the device queue. On the CPU a check costs nothing extra and runs every step.
ACCELERATOR_CHECK_EVERY = 3


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


def is_integer(value: object) -> bool:
    """Python and numpy integers, but not booleans."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Python and numpy reals (integers included), but not booleans."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    return check_int(name, value, minimum)


def check_positive_float(name: str, value: object) -> float:
    return check_number(name, value, above=0.0, allowed="a positive number")


def check_every(device: torch.device) -> int:
    """Steps between convergence checks: every step on the CPU, a few on accelerators."""
    return 1 if device.type == "cpu" else ACCELERATOR_CHECK_EVERY


def make_generator(op: LinearOperator, seed: int) -> torch.Generator:
    """A private generator on the operator's device, so the global RNG is never drawn from."""
    if not is_integer(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    generator = torch.Generator(device=op.device)
    generator.manual_seed(int(seed))
    return generator


def random_unit_vectors(op: LinearOperator, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` Gaussian directions of unit length, as columns of a (dim, count) block."""
    block = torch.randn(op.dim, count, generator=generator, device=op.device, dtype=op.dtype)
    norms: torch.Tensor = torch.linalg.vector_norm(block, dim=0, keepdim=True)
    return block / norms


def rademacher(op: LinearOperator, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` Rademacher (±1) probes as columns of a (dim, count) block."""
    bits = torch.randint(0, 2, (op.dim, count), generator=generator, device=op.device)
    return (bits * 2 - 1).to(op.dtype)


def apply_block(op: LinearOperator, block: torch.Tensor) -> torch.Tensor:
    """``op`` applied to each column of ``block``; batched when the operator supports it."""
    matmat = getattr(op, "matmat", None)
    if matmat is not None:
        return cast(torch.Tensor, matmat(block))
    return torch.stack([op.matvec(block[:, j]) for j in range(block.shape[1])], dim=1)


def raise_if_not_finite(values: torch.Tensor, what: str) -> None:
    """One host sync: called at convergence checkpoints, never inside the iteration."""
    if not bool(torch.isfinite(values).all()):
        raise FloatingPointError(
            f"{what} produced non-finite values: the loss or its Hessian-vector product is "
            "NaN or inf on these batches (check the loss, the learning rate, or use float64)"
        )
