"""The objective a measurement differentiates: a module's own ``training_step`` loss, with
its side effects held back, in the mode the measurement asks for.

Shared by the training-time monitor and the offline ``analyze`` command.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Mode = Literal["eval", "train"]


@dataclass  # not frozen: batch copies rebuild the fields of mutable dataclasses only
class IndexedBatch:
    """A probe batch with the ``batch_idx`` it had in training.

    Measuring calls ``training_step(batch, batch_idx)`` with that index, so a step that skips
    some indices (``if batch_idx % 5 == 0: return None``) is measured on a batch it trained
    on, as it trained on it. Batch copies walk dataclasses, so it travels like any batch.
    """

    batch: Any
    batch_idx: int


class NoLossError(ValueError):
    """``training_step`` gave no loss for a probe batch."""


def training_step_loss(module: Any, batch: Any) -> torch.Tensor:
    """``module.training_step(batch, batch_idx)`` as a loss function ``loss_fn(module, batch)``:
    ``batch_idx`` is an :class:`IndexedBatch`'s own, and 0 for a plain batch."""
    batch_idx = 0
    if isinstance(batch, IndexedBatch):
        batch, batch_idx = batch.batch, batch.batch_idx
    output = module.training_step(batch, batch_idx)
    if output is None:
        raise NoLossError(
            f"training_step(batch, batch_idx={batch_idx}) returned None for a probe batch, so "
            "it gives no loss to measure"
        )
    return output


@contextmanager
def measurement_mode(module: nn.Module, mode: Mode, dropout: bool = False) -> Iterator[None]:
    """Put the module in the measurement's mode, and every submodule back as it was.

    ``"train"`` measures the objective the optimizer descends: every submodule keeps the
    mode training gave it (normalization layers use batch statistics; the operator keeps
    their running statistics untouched), and dropout is switched off unless ``dropout`` is
    True (then its mask is fixed per probe batch by the operator's seeded RNG).
    ``"eval"`` measures the whole module in eval mode (running statistics, no dropout).
    """
    modes = [(m, m.training) for m in module.modules()]
    try:
        if mode == "eval":
            module.eval()
        elif not dropout:
            for submodule in module.modules():
                # Attention applies its own dropout (dropout_p) while in train mode.
                if isinstance(submodule, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention)):
                    submodule.eval()
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


@contextmanager
def muted_logging(module: nn.Module) -> Iterator[None]:
    """``training_step`` calls ``self.log``; during a measurement those calls must add
    nothing to the module's logged metrics."""
    module.__dict__["log"] = _ignore  # instance attributes shadow the methods
    module.__dict__["log_dict"] = _ignore
    try:
        yield
    finally:
        del module.log
        del module.log_dict


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def preserved_python_state(
    module: nn.Module, optimizers: Sequence[Any] = (), lr_schedulers: Sequence[Any] = ()
) -> Iterator[None]:
    """Undo what ``training_step`` does to Python state while a measurement calls it.

    A ``training_step`` may append to a list on the module, count calls, update a metric
    object, step a ``ReduceLROnPlateau`` scheduler by hand or draw from numpy's or Python's
    global RNG. Parameters, buffers, ``.grad`` and torch's RNG are the operator's business;
    this restores the rest, as it was before the measurement:

    - every submodule's plain attributes (numbers, strings, containers of them and of
      tensors, which are restored in place so other references see the old contents) and
      its unregistered tensor attributes (metric states), by value;
    - attributes that the measurement added are removed again;
    - the optimizers' hyper-parameters (``lr`` and friends, not their state tensors) and the
      learning-rate schedulers' ``state_dict``;
    - Python's ``random`` and numpy's global RNG.
    """
    import random

    import numpy as np

    snapshots = [(m, _plain_attributes(m)) for m in module.modules()]
    groups = [[_group_hyperparameters(g) for g in opt.param_groups] for opt in optimizers]
    schedulers = [(s, copy.deepcopy(s.state_dict())) for s in lr_schedulers]
    python_rng, numpy_rng = random.getstate(), np.random.get_state()  # noqa: NPY002 - the user's legacy global stream
    try:
        yield
    finally:
        for submodule, snapshot in snapshots:
            _restore_attributes(submodule, snapshot)
        for opt, saved in zip(optimizers, groups, strict=True):
            for group, values in zip(opt.param_groups, saved, strict=False):
                group.update(values)
        for scheduler, state in schedulers:
            scheduler.load_state_dict(state)
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)  # noqa: NPY002


# torch.nn.Module's own bookkeeping: parameters, buffers and submodules are protected
# elsewhere (the operator works on private buffers), hooks are not training state.
_MODULE_INTERNALS = frozenset(
    {"_parameters", "_buffers", "_modules", "_trainer", "_fabric", "log", "log_dict"}
)
_ATOMS = (int, float, complex, str, bytes, bool, type(None))


def _plain_attributes(module: nn.Module) -> dict[str, tuple[Any, Any]]:
    """(original object, copy of its value) for each attribute a step could change."""
    saved: dict[str, tuple[Any, Any]] = {}
    for name, value in vars(module).items():
        if name in _MODULE_INTERNALS or "hook" in name:
            continue
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            saved[name] = (value, value.detach().clone())
        elif _is_plain(value):
            saved[name] = (value, _copy(value))
    saved["__names__"] = (None, set(vars(module)))  # the attributes there were
    return saved


def _restore_attributes(module: nn.Module, saved: dict[str, tuple[Any, Any]]) -> None:
    _, names_before = saved.pop("__names__")
    for name in set(vars(module)) - names_before - _MODULE_INTERNALS:
        delattr(module, name)
    for name, (original, value) in saved.items():
        if isinstance(original, torch.Tensor):
            with torch.no_grad():
                if original.shape == value.shape:
                    original.copy_(value)
            module.__dict__[name] = original
        elif isinstance(original, list):
            original[:] = value
            module.__dict__[name] = original
        elif isinstance(original, (dict, set)):
            original.clear()
            original.update(value)
            module.__dict__[name] = original
        else:
            module.__dict__[name] = value


def _is_plain(value: Any, depth: int = 0) -> bool:
    if isinstance(value, (*_ATOMS, torch.Tensor)):
        return True
    if depth > 4:
        return False
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(_is_plain(k, depth + 1) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _copy(value: Any) -> Any:
    """A copy of a plain container whose tensors are shared, not cloned."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def _group_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.copy(v) for k, v in group.items() if k != "params"}
