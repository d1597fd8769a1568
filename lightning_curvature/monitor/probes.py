"""On what a measurement runs: the probe batches.

``"fixed"`` probes are the first ``num_batches`` training batches (or batches drawn once from
a ``probe_dataloader``), copied once when they pass by, so every measurement of a run sees
the same data and curves are comparable across steps. ``"current"`` probes are the batch
about to be trained on, copied before ``training_step`` can edit it. Every measurement gets
its own fresh copy, so a ``training_step`` that edits its batch in place cannot make the
fixed probe drift. Copies go through :mod:`lightning_curvature.batches`, which walks tuples,
mappings, namedtuples and dataclasses.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from lightning_curvature.batches import detached_copy, move_batch

ProbeKind = Literal["fixed", "current"]


class ProbeSet:
    """The probe batches of one monitor, and the copies it hands to each measurement."""

    def __init__(
        self, kind: ProbeKind, num_batches: int, dataloader: DataLoader | None = None
    ) -> None:
        self.kind = kind
        self.num_batches = num_batches
        self.dataloader = dataloader
        self.stored: list[Any] = []  # fixed probes, on the module's device
        self._current: Any = None

    @property
    def ready(self) -> bool:
        """Whether a measurement has its batches (a fixed set may still be collecting)."""
        if self.kind == "fixed":
            return len(self.stored) >= self.num_batches
        return self._current is not None

    def draw(self, device: torch.device) -> None:
        """Fill a fixed set from ``dataloader`` once, with the global RNG forked so a
        shuffling loader leaves training's random stream untouched."""
        if self.dataloader is None or self.stored:
            return
        with torch.random.fork_rng(devices=[]):
            for batch in self.dataloader:
                self.stored.append(detached_copy(batch, device))
                if len(self.stored) == self.num_batches:
                    break
        if not self.stored:
            raise ValueError("probe_dataloader yielded no batches")

    def offer(self, batch: Any, device: torch.device, upcoming_is_due: bool) -> None:
        """A training batch passes by (before ``training_step``): keep a copy if needed."""
        if self.kind == "fixed":
            if self.dataloader is None and len(self.stored) < self.num_batches:
                self.stored.append(detached_copy(batch, device))
        elif upcoming_is_due:
            self._current = detached_copy(batch, device)

    def batches(self, device: torch.device) -> list[Any]:
        """Fresh copies of the probe batches for one measurement, on ``device``."""
        source = self.stored[: self.num_batches] if self.kind == "fixed" else [self._current]
        self._current = None
        return [detached_copy(batch, device) for batch in source]

    def state_dict(self) -> list[Any]:
        return [move_batch(batch, torch.device("cpu")) for batch in self.stored]

    def load_state_dict(self, batches: list[Any]) -> None:
        self.stored = list(batches)
