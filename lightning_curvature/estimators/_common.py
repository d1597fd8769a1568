"""What every estimator shares besides the operator protocol (in
:mod:`lightning_curvature.linear_operator`): argument checks, seeded probes, and the
convergence-check cadence. Estimators never touch the global RNG: every random vector comes
from a private ``torch.Generator`` seeded by the caller.
"""

from __future__ import annotations

import numbers

import torch

from lightning_curvature._checks import check_int, check_number

# The protocol's own names, re-exported for the estimators beside this module.
from lightning_curvature.linear_operator import LinearOperator as LinearOperator
from lightning_curvature.linear_operator import apply_block as apply_block
from lightning_curvature.linear_operator import check_operator as check_operator
from lightning_curvature.linear_operator import inner as inner
from lightning_curvature.linear_operator import norms as norms
from lightning_curvature.linear_operator import shard_index as shard_index
from lightning_curvature.linear_operator import sum_over_shards as sum_over_shards
from lightning_curvature.linear_operator import total_dim as total_dim

# Seeds of different shards of one sharded vector lie this far apart (no user seed is near).
SHARD_SEED_STRIDE = 1_000_003

# Iterations between convergence checks on an accelerator, where each check is a host sync
# that stalls the device queue. On the CPU a check costs nothing extra and runs every step.
ACCELERATOR_CHECK_EVERY = 3


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


def require_whole_vectors(op: LinearOperator, what: str) -> None:
    """Refuse, naming ``what`` needs them, an operator whose vectors are sharded."""
    if total_dim(op) != op.dim:
        raise ValueError(
            f"{what} cannot run on sharded vectors: this operator holds {op.dim} of "
            f"{total_dim(op)} entries on this process; measure the whole model instead"
        )


def check_every(device: torch.device) -> int:
    """Steps between convergence checks: every step on the CPU, a few on accelerators."""
    return 1 if device.type == "cpu" else ACCELERATOR_CHECK_EVERY


def make_generator(op: LinearOperator, seed: int) -> torch.Generator:
    """A private generator on the operator's device, so the global RNG is never drawn from."""
    if not is_integer(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    generator = torch.Generator(device=op.device)
    generator.manual_seed(int(seed) + SHARD_SEED_STRIDE * shard_index(op))
    return generator


def random_unit_vectors(op: LinearOperator, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` Gaussian directions of unit length, as columns of a (dim, count) block."""
    block = torch.randn(op.dim, count, generator=generator, device=op.device, dtype=op.dtype)
    return block / norms(op, block)[None]


def rademacher(op: LinearOperator, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` Rademacher (±1) probes as columns of a (dim, count) block."""
    bits = torch.randint(0, 2, (op.dim, count), generator=generator, device=op.device)
    return (bits * 2 - 1).to(op.dtype)


def raise_if_not_finite(values: torch.Tensor, what: str) -> None:
    """One host sync: called at convergence checkpoints, never inside the iteration."""
    if not bool(torch.isfinite(values).all()):
        raise FloatingPointError(
            f"{what} produced non-finite values: the loss or its Hessian-vector product is "
            "NaN or inf on these batches (check the loss, the learning rate, or use float64)"
        )
