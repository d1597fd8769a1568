"""CurvatureMonitor's argument checks that belong to no part of the monitor in particular.

Each names the argument as the user wrote it, its value and what is allowed; the schedule,
the alert rules and the measurement settings check their own arguments.
"""

from __future__ import annotations

import re
from typing import Any

from torch.utils.data import DataLoader

from lightning_curvature._checks import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_open_unit,
)
from lightning_curvature.measure.tiers import MeasureSettings
from lightning_curvature.operators.names import CURVATURES, LOSS_NAMES


def measure_settings(
    *,
    k: Any,
    num_iters: Any,
    tol: Any,
    trace: Any,
    num_probes: Any,
    spectral_density: Any,
    lambda_min: Any,
    seed: Any,
    critical_sharpness: Any = False,
    memory_budget_mb: Any = None,
    warm_start: Any = True,
) -> MeasureSettings:
    """The estimators' settings from the monitor's arguments, each checked under its own
    name (``spectral_density`` is the settings' ``density``)."""
    k = check_int("k", k, 1)
    return MeasureSettings(
        k=k,
        num_iters=None if num_iters is None else check_int("num_iters", num_iters, k),
        tol=check_open_unit("tol", tol),
        trace=check_bool("trace", trace),
        num_probes=check_int("num_probes", num_probes, 2),
        density=check_bool("spectral_density", spectral_density),
        lambda_min=check_bool("lambda_min", lambda_min),
        seed=check_int("seed", seed, 0),
        critical_sharpness=check_bool("critical_sharpness", critical_sharpness),
        memory_budget_mb=None
        if memory_budget_mb is None
        else check_number("memory_budget_mb", memory_budget_mb, above=0.0),
        warm_start=check_bool("warm_start", warm_start),
    )


def check_arguments(
    *,
    probe: Any,
    mode: Any,
    curvature: Any,
    loss_from_output: Any,
    output_fn: Any,
    per_layer: Any,
    probe_dataloader: Any,
    loss_fn: Any,
    on_alert: Any,
    tag_prefix: Any,
    flags: dict[str, Any],
) -> None:
    """Raise a ValueError for the first of these arguments outside its allowed values."""
    check_choice("probe", probe, ("fixed", "current"))
    check_choice("mode", mode, ("train", "eval"))
    check_choice("curvature", curvature, CURVATURES)
    if curvature != "hessian" and not (
        callable(loss_from_output) or loss_from_output in LOSS_NAMES
    ):
        raise ValueError(
            f"curvature={curvature!r} needs loss_from_output: 'mse', 'cross_entropy' or a "
            f"callable loss(outputs, batch), got {loss_from_output!r}"
        )
    if output_fn is not None and not callable(output_fn):
        raise ValueError(f"output_fn must be callable or None, got {output_fn!r}")
    if curvature == "hessian":
        # The Hessian is that of training_step's (or loss_fn's) loss: an output-space loss
        # given with it would be ignored, and the user would measure another matrix than meant.
        for name, value in (("loss_from_output", loss_from_output), ("output_fn", output_fn)):
            if value is not None:
                raise ValueError(
                    f"{name} is used only with curvature='ggn' or 'fisher'; with "
                    "curvature='hessian' (the default) the loss is training_step's, or "
                    f"loss_fn's: drop {name}, or pass curvature='ggn' or 'fisher', got "
                    f"{name}={value!r}"
                )
    if not isinstance(per_layer, bool) and not (
        isinstance(per_layer, (list, tuple))
        and per_layer
        and all(isinstance(p, str) for p in per_layer)
    ):
        raise ValueError(
            "per_layer must be True, False, or a non-empty list of regular expressions "
            f"over parameter names, got {per_layer!r}"
        )
    for name, value in flags.items():
        check_bool(name, value)
    if probe_dataloader is not None and probe != "fixed":
        raise ValueError(
            "probe_dataloader needs probe='fixed' (its batches are the fixed "
            f"probe set), got probe={probe!r}"
        )
    if probe_dataloader is not None and not isinstance(probe_dataloader, DataLoader):
        raise ValueError(
            "probe_dataloader must be a torch DataLoader or None, got "
            f"{type(probe_dataloader).__name__}"
        )
    for name, function in (("loss_fn", loss_fn), ("on_alert", on_alert)):
        if function is not None and not callable(function):
            raise ValueError(f"{name} must be callable or None, got {type(function).__name__}")
    if not isinstance(tag_prefix, str) or not re.fullmatch(r"[\w.\-/]+", tag_prefix):
        raise ValueError(
            "tag_prefix must be a non-empty string of letters, digits, '_', '-', '.' or "
            f"'/', got {tag_prefix!r}"
        )
