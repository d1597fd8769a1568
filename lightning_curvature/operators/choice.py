"""One home for choosing a curvature operator by name: the Hessian, the generalized
Gauss-Newton matrix or the Fisher, over the same model, batches and parameters.

The monitor (``CurvatureMonitor(curvature=...)``) and ``analyze --curvature`` both build
their operator here, so the two measure the same matrix for the same words. The names
themselves live in :mod:`.names`, which the operators read too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_curvature.operators.base import CurvatureOperator
from lightning_curvature.operators.fisher import FisherOperator
from lightning_curvature.operators.ggn import GGNOperator
from lightning_curvature.operators.hessian import HessianOperator
from lightning_curvature.operators.names import CURVATURES

# Monte Carlo draws of the true Fisher: they enter in output space only (a product costs the
# same for any number), and one draw biases λmax upwards against E[F] = G by its noise
# (1.6× on the demo; 32 draws: within 1.5%).
FISHER_SAMPLES = 32


def curvature_operator(
    curvature: str,
    model: nn.Module,
    batches: Sequence[Any],
    params: Mapping[str, nn.Parameter] | None = None,
    *,
    loss_fn: Callable[[nn.Module, Any], Any] | None = None,
    output_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    loss_from_output: Any = None,
    fisher_kind: str = "true",
    seed: int = 0,
    hvp_method: Any = "auto",
    verify: bool = True,
) -> CurvatureOperator:
    """The operator ``curvature`` names, over ``params`` (default: every trainable one).

    ``"hessian"`` needs ``loss_fn(model, batch)`` (``hvp_method`` and ``verify`` are its
    own); ``"ggn"`` and ``"fisher"`` need the model's outputs apart from the loss:
    ``output_fn`` (default ``model(batch[0])``) and ``loss_from_output``. The true Fisher
    draws :data:`FISHER_SAMPLES` targets per term from a generator seeded by ``seed``.

    Raises:
        ValueError: for a ``curvature`` not in :data:`CURVATURES`, or a missing ``loss_fn``
            (Hessian) or ``loss_from_output`` (GGN, Fisher).
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if curvature == "hessian":
        if loss_fn is None:
            raise ValueError("curvature='hessian' needs loss_fn(model, batch)")
        return HessianOperator(
            model, loss_fn, batches, params, hvp_method=hvp_method, verify=verify
        )
    if loss_from_output is None:
        raise ValueError(f"curvature={curvature!r} needs loss_from_output")
    split: dict[str, Any] = {"output_fn": output_fn, "loss_from_output": loss_from_output}
    if curvature == "ggn":
        return GGNOperator(model, batches, params, **split)
    return FisherOperator(
        model,
        batches,
        params,
        kind=fisher_kind,  # type: ignore[arg-type]
        num_samples=FISHER_SAMPLES if fisher_kind == "true" else 1,
        seed=seed,
        **split,
    )
