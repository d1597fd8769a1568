r"""The one shape every curvature operator has.

A curvature operator is a symmetric linear map :math:`A` on flat parameter vectors that
lives on one device (scipy's ``LinearOperator`` and curvlinops' ``CurvatureLinearOperator``
are the models). The estimators need only ``dim``, ``device``, ``dtype`` and ``matvec``
(``matmat`` when present); the monitor also counts products (``num_matvecs``), frees
memory between measurements (``release``) and reports the loss the operator was built on
(``loss``).

:class:`CurvatureOperator` implements that protocol once: shape checks, moving blocks to
the operator's device and dtype, counting, and ``matvec`` as a one-column ``matmat``. A
subclass implements :meth:`CurvatureOperator._matmat` alone. :class:`OperatorWrapper` is the
base of operators built on another one (preconditioned, all-reduced, block-diagonal): it
passes ``release``, ``loss``, ``params``, ``param_names``, ``method_used``,
``fallback_reason`` and the shard reductions through, so wrappers compose.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class CurvatureOperator(ABC):
    """A symmetric linear map on flat vectors of length ``dim`` on ``device``.

    Attributes:
        dim: the length of the vectors it acts on.
        device, dtype: where and in which precision products run.
        num_matvecs: products computed so far (a block of ``m`` columns counts ``m``).
    """

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.dim = int(dim)
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_matvecs = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for a flat vector ``v`` of length ``dim``."""
        if v.shape != (self.dim,):
            raise ValueError(f"v must have shape ({self.dim},), got {tuple(v.shape)}")
        return self.matmat(v[:, None])[:, 0]

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        """``A V`` for a (dim, m) block of column vectors."""
        if block.ndim != 2 or block.shape[0] != self.dim:
            raise ValueError(f"block must have shape ({self.dim}, m), got {tuple(block.shape)}")
        block = block.to(device=self.device, dtype=self.dtype)
        self.num_matvecs += block.shape[1]
        return self._matmat(block)

    @abstractmethod
    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        """The product itself, on a block already on the operator's device and dtype."""

    @property
    def loss(self) -> float | None:
        """The loss the operator was built on, when it has one."""
        return None

    # Sharded vectors (see lightning_curvature.linear_operator): an operator whose vectors
    # are whole on every process keeps these defaults; a sharded one overrides all three.
    @property
    def total_dim(self) -> int:
        """The vectors' length over all shards (``dim`` is this process's slice)."""
        return self.dim

    @property
    def shard_index(self) -> int:
        """Which shard of each vector this process holds."""
        return 0

    def sum_over_shards(self, partial: torch.Tensor) -> torch.Tensor:
        """``partial`` summed over the processes that hold the vectors' shards (one
        all-reduce); the identity for whole vectors."""
        return partial

    def release(self) -> None:
        """Free memory held between products (kept graphs); the default holds none."""
        return None

    def __enter__(self) -> CurvatureOperator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class OperatorWrapper(CurvatureOperator):
    """An operator defined through another one, ``inner``; it passes ``release``,
    ``loss``, ``params``, ``param_names``, ``method_used`` and ``fallback_reason`` through
    to it."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner.dim, inner.device, inner.dtype)
        self.inner = inner

    @property
    def loss(self) -> float | None:
        return getattr(self.inner, "loss", None)

    @property
    def params(self) -> list[torch.Tensor]:
        return list(getattr(self.inner, "params", []))

    @property
    def param_names(self) -> list[str]:
        return list(getattr(self.inner, "param_names", []))

    @property
    def method_used(self) -> str | None:
        """How the innermost operator computes products (``None`` if it does not say)."""
        return getattr(self.inner, "method_used", None)

    @property
    def fallback_reason(self) -> str | None:
        """Why the innermost operator left the method it was asked for, or ``None``."""
        return getattr(self.inner, "fallback_reason", None)

    @property
    def total_dim(self) -> int:
        return int(getattr(self.inner, "total_dim", self.dim))

    @property
    def shard_index(self) -> int:
        return int(getattr(self.inner, "shard_index", 0))

    def sum_over_shards(self, partial: torch.Tensor) -> torch.Tensor:
        own = getattr(self.inner, "sum_over_shards", None)
        return partial if own is None else own(partial)

    def release(self) -> None:
        release = getattr(self.inner, "release", None)
        if release is not None:
            release()
