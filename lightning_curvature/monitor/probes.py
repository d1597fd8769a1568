"""On what a measurement runs: the probe batches, and the parameters it covers.

``"fixed"`` probes are the first ``num_batches`` training batches (or batches drawn once from
a ``probe_dataloader``), copied once when they pass by, so every measurement of a run sees
the same data and curves are comparable across steps. ``"current"`` probes are the batch
about to be trained on, copied before ``training_step`` can edit it. A training batch
becomes a probe only once training has trained on it (:meth:`ProbeSet.confirm`: a
``training_step`` that returns None skips its batch, and so does the probe set), and it
keeps the ``batch_idx`` it had, so measuring calls ``training_step`` as training did
(a ``probe_dataloader``'s batches get 0, 1, ...). Every measurement gets
its own fresh copy, so a ``training_step`` that edits its batch in place cannot make the
fixed probe drift. Copies go through :mod:`lightning_curvature.batches`, which walks tuples,
mappings, namedtuples and dataclasses.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_curvature.batches import detached_copy, move_batch
from lightning_curvature.measure.objective import IndexedBatch

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
        self.stored_indices: list[int] = []  # the batch_idx each had in training
        self._current: tuple[Any, int] | None = None
        self._pending: tuple[Any, int] | None = None  # offered, not yet trained on

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
            for index, batch in enumerate(self.dataloader):
                self.stored.append(detached_copy(batch, device))
                self.stored_indices.append(index)
                if len(self.stored) == self.num_batches:
                    break
        if not self.stored:
            raise ValueError("probe_dataloader yielded no batches")

    def offer(
        self, batch: Any, device: torch.device, upcoming_is_due: bool, batch_idx: int = 0
    ) -> None:
        """A training batch passes by (before ``training_step``): copy it if it may be
        needed; it becomes a probe once :meth:`confirm` says training trained on it."""
        wanted = (
            self.dataloader is None and len(self.stored) < self.num_batches
            if self.kind == "fixed"
            else upcoming_is_due
        )
        self._pending = (detached_copy(batch, device), batch_idx) if wanted else None

    def confirm(self, trained: bool) -> None:
        """After ``training_step``: whether training trained on the batch last offered (a
        ``training_step`` that returned None did not, and its batch is no probe)."""
        pending, self._pending = self._pending, None
        if pending is None or not trained:
            return
        if self.kind == "fixed":
            self.stored.append(pending[0])
            self.stored_indices.append(pending[1])
        else:
            self._current = pending

    def batches(self, device: torch.device, indexed: bool = False) -> list[Any]:
        """Fresh copies of the probe batches for one measurement, on ``device``; with
        ``indexed``, each as an :class:`IndexedBatch` with the ``batch_idx`` it had."""
        if self.kind == "fixed":
            source = list(zip(self.stored, self.stored_indices, strict=True))[: self.num_batches]
        else:
            source = [] if self._current is None else [self._current]
        self._current = None
        copies = [(detached_copy(batch, device), index) for batch, index in source]
        return [IndexedBatch(b, i) if indexed else b for b, i in copies]

    def state_dict(self) -> dict[str, list[Any]]:
        return {
            "batches": [move_batch(batch, torch.device("cpu")) for batch in self.stored],
            "batch_indices": list(self.stored_indices),
        }

    def load_state_dict(self, state: dict[str, list[Any]] | list[Any]) -> None:
        # Older checkpoints stored the list of batches alone, each measured as batch_idx 0.
        if isinstance(state, dict):
            self.stored = list(state.get("batches", []))
            self.stored_indices = [int(i) for i in state.get("batch_indices", [])]
        else:
            self.stored = list(state)
            self.stored_indices = []
        self.stored_indices += [0] * (len(self.stored) - len(self.stored_indices))


def check_params(params: Any) -> str | tuple[str, ...] | None:
    """A monitor's ``params`` argument, checked: None, a regular expression, or names."""
    if params is None:
        return None
    if isinstance(params, str):
        try:
            re.compile(params)
        except re.error as error:
            raise ValueError(f"params is not a valid regular expression: {error}") from None
        return params
    try:
        names = tuple(params)
    except TypeError:
        names = None
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(
            "params must be None (every trainable parameter), a regular expression, or a "
            f"non-empty list of parameter names, got {params!r}"
        )
    return names


def select_parameters(module: nn.Module, params: str | tuple[str, ...] | None) -> list[str]:
    """The names of the parameters a monitor measures, in the module's order."""
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    if params is None:
        chosen = trainable
    elif isinstance(params, str):
        chosen = [name for name in trainable if re.search(params, name)]
    else:
        unknown = sorted(set(params) - set(trainable))
        if unknown:
            raise ValueError(
                f"params names {unknown} that are not trainable parameters of "
                f"{type(module).__name__}; choose from {trainable[:10]}"
                + (" ..." if len(trainable) > 10 else "")
            )
        chosen = [name for name in trainable if name in set(params)]
    if not chosen:
        raise ValueError(
            f"params={params!r} selects no trainable parameter of {type(module).__name__}; "
            f"its trainable parameters are {trainable[:10]}"
            + (" ..." if len(trainable) > 10 else "")
        )
    return chosen
