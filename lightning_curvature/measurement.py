"""One curvature measurement: the estimators run on an operator, gathered in one record.

This is shared by the training callback and the offline checkpoint analysis, so both log
the same numbers under the same tags. It knows neither Lightning nor TensorBoard.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from lightning_curvature.estimators import hutchinson_trace, lanczos, spectral_density
from lightning_curvature.operators import PreconditionedOperator
from lightning_curvature.stability import StabilityRule, stability_ratio

TAG_PREFIX = "curvature"


@dataclass(frozen=True)
class Measurement:
    """Everything one measurement found, as plain numbers (cheap to log, store and compare).

    ``sharpness_x_lr`` is the sharpness that matters for the optimizer times η: λmax·η for
    SGD-family optimizers, the preconditioned λmax·η for adaptive ones.
    """

    step: int
    loss: float
    lambda_max: float
    eigenvalues: tuple[float, ...]
    error_bounds: tuple[float, ...]
    converged: bool
    ritz_values: tuple[float, ...]
    num_matvecs: int
    seconds: float
    lambda_min: float | None = None
    trace: float | None = None
    trace_stderr: float | None = None
    preconditioned_lambda_max: float | None = None
    learning_rate: float | None = None
    stability_threshold: float | None = None
    lambda_max_x_lr: float | None = None
    sharpness_x_lr: float | None = None
    stability_ratio: float | None = None
    density_grid: tuple[float, ...] | None = field(default=None, repr=False)
    density: tuple[float, ...] | None = field(default=None, repr=False)

    def scalars(self) -> dict[str, float]:
        """The scalar tags of DESIGN.md (and a few extras), ready for ``log_metrics``."""
        values: dict[str, float | None] = {
            "lambda_max": self.lambda_max,
            "probe_loss": self.loss,
            **{f"eigenvalue_{i + 1}": v for i, v in enumerate(self.eigenvalues)},
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
            "lambda_min": self.lambda_min,
            "lambda_max_x_lr": self.lambda_max_x_lr,
            "stability_threshold": self.stability_threshold,
            "preconditioned_lambda_max": self.preconditioned_lambda_max,
            "sharpness_x_lr": self.sharpness_x_lr,
            "stability_ratio": self.stability_ratio,
            "converged": float(self.converged),
            "num_matvecs": float(self.num_matvecs),
            "seconds": self.seconds,
        }
        return {f"{TAG_PREFIX}/{k}": float(v) for k, v in values.items() if v is not None}

    def to_json(self) -> dict[str, object]:
        """Every field as JSON-ready values: tuples become lists, and NaN or inf (which JSON
        cannot spell) become ``None``, inside the tuples too."""

        def clean(value: object) -> object:
            if isinstance(value, tuple):
                return [clean(v) for v in value]
            if isinstance(value, float) and not math.isfinite(value):
                return None
            return value

        return {key: clean(value) for key, value in asdict(self).items()}


@dataclass(frozen=True)
class MeasureSettings:
    """What to estimate and how hard to try."""

    k: int = 5
    num_iters: int | None = None
    tol: float = 1e-4
    trace: bool = True
    num_probes: int = 10
    density: bool = False
    density_runs: int = 4
    density_iters: int = 40
    lambda_min: bool = False
    seed: int = 0


def measure(
    op,
    step: int,
    settings: MeasureSettings,
    *,
    rule: StabilityRule | None = None,
    preconditioner: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
) -> tuple[Measurement, torch.Tensor | None]:
    """Run the estimators on ``op``; return the record and the top eigenvectors (for the
    next measurement's warm start).

    ``rule`` (from :func:`~lightning_curvature.stability.stability_rule`) adds λmax·η and
    the stability ratio; ``preconditioner`` (P's diagonal) adds the preconditioned λmax.
    """
    started = time.perf_counter()
    matvecs_before = op.num_matvecs
    top = lanczos(
        op,
        k=min(settings.k, op.dim),
        num_iters=settings.num_iters,
        tol=settings.tol,
        seed=settings.seed,
        return_eigenvectors=True,
        init=init,
    )
    lambda_max = float(top.eigenvalues[0])
    converged = top.converged
    extra: dict = {}
    if settings.lambda_min:
        bottom = lanczos(op, k=1, tol=settings.tol, seed=settings.seed + 1, which="smallest")
        extra["lambda_min"] = float(bottom.eigenvalues[0])
    if settings.trace:
        trace = hutchinson_trace(op, num_probes=settings.num_probes, seed=settings.seed + 2)
        extra["trace"], extra["trace_stderr"] = trace.estimate, trace.stderr
    if settings.density:
        sd = spectral_density(
            op,
            num_runs=settings.density_runs,
            num_iters=settings.density_iters,
            seed=settings.seed + 3,
        )
        extra["density_grid"] = tuple(sd.grid.tolist())
        extra["density"] = tuple(sd.density.tolist())
    sharpness = lambda_max
    if preconditioner is not None:
        scaled = lanczos(
            PreconditionedOperator(op, preconditioner),
            k=1,
            tol=settings.tol,
            seed=settings.seed + 4,
        )
        sharpness = extra["preconditioned_lambda_max"] = float(scaled.eigenvalues[0])
        converged = converged and scaled.converged
    if rule is not None:
        lr = rule.learning_rate
        extra.update(
            learning_rate=lr, stability_threshold=rule.threshold, lambda_max_x_lr=lambda_max * lr
        )
        # An adaptive optimizer before its first step has no preconditioner yet: its
        # relevant sharpness is unknown, and λmax·η against 38 would mislead.
        if not rule.preconditioned or preconditioner is not None:
            extra.update(
                sharpness_x_lr=sharpness * lr, stability_ratio=stability_ratio(sharpness, rule)
            )
    record = Measurement(
        step=step,
        loss=op.loss,
        lambda_max=lambda_max,
        eigenvalues=tuple(float(v) for v in top.eigenvalues),
        error_bounds=tuple(float(v) for v in top.error_bounds),
        converged=converged,
        ritz_values=tuple(float(v) for v in top.ritz_values),
        num_matvecs=op.num_matvecs - matvecs_before,
        seconds=time.perf_counter() - started,
        **extra,
    )
    return record, top.eigenvectors
