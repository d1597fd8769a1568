"""The record of one curvature measurement: plain numbers with their evidence, the scalar
tags they are logged under (only converged estimates), and JSON for ``analyze``'s summary."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from lightning_curvature.measure.tags import TAG_PREFIX, tag


@dataclass(frozen=True)
class Measurement:
    """Everything one measurement found, as plain numbers with their evidence.

    ``converged`` says whether the stability-relevant sharpness converged (λmax, or the
    preconditioned λmax for adaptive optimizers); λmax, the top k and λmin each carry their
    own flag and error bound too. ``sharpness_x_lr`` is that sharpness times η. A track
    measurement under an adaptive optimizer measures no λmax(H): ``lambda_max`` is NaN there,
    not converged, and not logged.
    """

    step: int
    tier: str
    probe_loss: float
    lambda_max: float
    lambda_max_error_bound: float
    lambda_max_converged: bool
    converged: bool
    num_matvecs: int
    seconds: float
    eigenvalues: tuple[float, ...] = ()
    error_bounds: tuple[float, ...] = ()
    eigenvalues_converged: bool | None = None
    ritz_values: tuple[float, ...] = ()
    lambda_min: float | None = None
    lambda_min_error_bound: float | None = None
    lambda_min_converged: bool | None = None
    trace: float | None = None
    trace_stderr: float | None = None
    preconditioned_lambda_max: float | None = None
    learning_rate: float | None = None
    stability_threshold: float | None = None
    lambda_max_x_lr: float | None = None
    sharpness_x_lr: float | None = None
    stability_ratio: float | None = None
    directional_sharpness: float | None = None
    directional_sharpness_x_lr: float | None = None
    batch_sharpness: float | None = None
    batch_sharpness_x_lr: float | None = None
    critical_sharpness: float | None = None
    critical_sharpness_x_lr: float | None = None
    hvp_method: str | None = None
    peak_memory_mb: float | None = None
    curvature: str = "hessian"
    # Per-layer diagonal blocks (``per_layer``): name -> (trace, its stderr) and name ->
    # (λmax, its error bound, converged), from the same probes as the whole trace and one
    # batched Lanczos.
    layer_traces: dict[str, tuple[float, float]] | None = None
    layer_lambda_max: dict[str, tuple[float, float, bool]] | None = None
    density_grid: tuple[float, ...] | None = field(default=None, repr=False)
    density: tuple[float, ...] | None = field(default=None, repr=False)

    @property
    def sharpness(self) -> float:
        """The stability-relevant sharpness: the preconditioned λmax for adaptive
        optimizers, λmax otherwise (what ``stability_ratio`` and the spike alert read)."""
        if self.preconditioned_lambda_max is not None:
            return self.preconditioned_lambda_max
        return self.lambda_max

    def scalars(self, prefix: str = TAG_PREFIX) -> dict[str, float]:
        """The scalar tags, ready for ``log_metrics``: a value whose estimate did not
        converge is left out (its ``converged`` tag still says so)."""
        values: dict[str, float | None] = {
            "probe_loss": self.probe_loss,
            "converged": float(self.converged),
            "num_matvecs": float(self.num_matvecs),
            "seconds": self.seconds,
            "learning_rate": self.learning_rate,
            "stability_threshold": self.stability_threshold,
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
            "directional_sharpness": self.directional_sharpness,
            "directional_sharpness_x_lr": self.directional_sharpness_x_lr,
            "batch_sharpness": self.batch_sharpness,
            "batch_sharpness_x_lr": self.batch_sharpness_x_lr,
            "critical_sharpness": self.critical_sharpness,
            "critical_sharpness_x_lr": self.critical_sharpness_x_lr,
            "peak_memory_mb": self.peak_memory_mb,
        }
        if self.lambda_max_converged:
            values.update(
                lambda_max=self.lambda_max,
                lambda_max_error_bound=self.lambda_max_error_bound,
                lambda_max_x_lr=self.lambda_max_x_lr,
            )
        if self.converged:
            values.update(
                preconditioned_lambda_max=self.preconditioned_lambda_max,
                sharpness_x_lr=self.sharpness_x_lr,
                stability_ratio=self.stability_ratio,
            )
        if self.eigenvalues_converged:
            values.update({f"eigenvalue_{i + 1}": v for i, v in enumerate(self.eigenvalues)})
        if self.lambda_min_converged:
            values["lambda_min"] = self.lambda_min
        if self.lambda_min_converged is not None:
            values["lambda_min_converged"] = float(self.lambda_min_converged)
        for name, (trace, stderr) in (self.layer_traces or {}).items():
            values[f"layer/{name}/trace"] = trace
            values[f"layer/{name}/trace_stderr"] = stderr
        for name, (value, _, converged) in (self.layer_lambda_max or {}).items():
            if converged:
                values[f"layer/{name}/lambda_max"] = value
        return {tag(prefix, k): float(v) for k, v in values.items() if v is not None}

    def to_json(self) -> dict[str, object]:
        """Every field as JSON-ready values: tuples become lists, and NaN or inf (which JSON
        cannot spell) become ``None``, inside the tuples too."""

        def clean(value: object) -> object:
            if isinstance(value, tuple):
                return [clean(v) for v in value]
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, float) and not math.isfinite(value):
                return None
            return value

        return {key: clean(value) for key, value in asdict(self).items()}
