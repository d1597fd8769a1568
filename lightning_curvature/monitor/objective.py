"""The objective a measurement differentiates: a module's own ``training_step`` loss, with
its side effects held back, in the mode the measurement asks for.

Shared by the training-time monitor and the offline ``analyze`` command.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

Mode = Literal["eval", "train"]


def training_step_loss(module: Any, batch: Any) -> torch.Tensor:
    """``module.training_step(batch, 0)`` as a loss function ``loss_fn(module, batch)``."""
    output = module.training_step(batch, 0)
    if output is None:
        raise ValueError(
            "training_step returned None for a probe batch, so it gives no loss: "
            "pass CurvatureMonitor(loss_fn=...)"
        )
    return output


@contextmanager
def measurement_mode(module: nn.Module, mode: Mode) -> Iterator[None]:
    """Put the module in the measurement's mode, and every submodule back as it was."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        if mode == "eval":
            module.eval()
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


@contextmanager
def muted_logging(module: nn.Module) -> Iterator[None]:
    """``training_step`` calls ``self.log``; during a measurement those calls must add
    nothing to the module's logged metrics."""
    module.log = _ignore  # instance attributes shadow the methods
    module.log_dict = _ignore
    try:
        yield
    finally:
        del module.log
        del module.log_dict


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None
