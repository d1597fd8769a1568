"""The one table of the monitor's scalar tags: every name a measurement, the monitor or
``analyze`` logs under the tag prefix, with its tier and meaning.

:meth:`~lightning_curvature.measure.record.Measurement.scalars`, the monitor's publisher, the
TensorBoard layout and ``analyze`` all spell their tags through :func:`tag`, and the README's
table of tags is checked against :data:`SCALAR_TAGS` by a test, so a tag cannot be added in
one place and forgotten in another. Per-layer tags are ``layer/<name>/<quantity>`` with the
quantities of :data:`LAYER_TAGS`.
"""

from __future__ import annotations

TAG_PREFIX = "curvature"

# name -> (tier, meaning). "track" is logged at every measurement, "full" at full ones only,
# "both" at every measurement of either tier, "monitor" by the monitor beside a measurement.
SCALAR_TAGS: dict[str, tuple[str, str]] = {
    "lambda_max": (
        "track",
        "λmax, the largest eigenvalue on the probe batches (at full measurements only under "
        "adaptive optimizers, whose track tier measures λmax(P⁻¹H))",
    ),
    "lambda_max_error_bound": ("track", "λmax's error bound"),
    "learning_rate": ("track", "η of the optimizer (param group) that owns the parameters"),
    "lambda_max_x_lr": ("track", "λmax·η"),
    "stability_threshold": ("track", "the optimizer's threshold for its sharpness·η"),
    "preconditioned_lambda_max": ("track", "λmax of P⁻¹H for adaptive optimizers"),
    "sharpness_x_lr": ("track", "the optimizer's relevant sharpness times η"),
    "stability_ratio": ("track", "sharpness_x_lr / threshold: 1 is the edge of stability"),
    "directional_sharpness": ("track", "uᵀHu/uᵀu along the last update u"),
    "directional_sharpness_x_lr": ("track", "directional sharpness·η"),
    "batch_sharpness": ("track", "mean over probe batches of gᵀHg/gᵀg"),
    "batch_sharpness_x_lr": ("track", "batch sharpness·η"),
    "critical_sharpness": (
        "track",
        "2/t_c, t_c the smallest step along the last update per unit η that raises the loss",
    ),
    "critical_sharpness_x_lr": ("track", "critical sharpness·η"),
    "eigenvalue_{i}": ("full", "the i-th largest eigenvalue (1 is λmax)"),
    "trace": ("full", "the trace: exact on the top Ritz space, Hutchinson on the rest"),
    "trace_stderr": ("full", "the trace's standard error"),
    "lambda_min": ("full", "the smallest eigenvalue, when asked and converged"),
    "lambda_min_converged": ("full", "whether λmin converged"),
    "probe_loss": ("both", "the mean loss on the probe batches"),
    "converged": ("both", "whether the stability-relevant sharpness converged"),
    "num_matvecs": ("both", "products the whole measurement took"),
    "seconds": ("both", "how long the measurement took"),
    "peak_memory_mb": ("both", "the device's peak allocated memory in the measurement (CUDA)"),
    "predicted_stability_ratio": (
        "monitor",
        "the last stability ratio rescaled to η now, between measurements",
    ),
    "overhead": ("monitor", "the monitor's overhead so far (0.05: training ran 5% longer)"),
}
# Per-layer quantities, logged as layer/<name>/<quantity> at full measurements.
LAYER_TAGS: dict[str, str] = {
    "trace": "that layer's diagonal block's trace",
    "trace_stderr": "its standard error",
    "lambda_max": "that block's λmax, when its Lanczos converged",
}


def tag(prefix: str, name: str) -> str:
    """``prefix/name`` for a name of :data:`SCALAR_TAGS` (or ``layer/<n>/<quantity>``)."""
    return f"{prefix}/{name}"


def is_known(name: str) -> bool:
    """Whether ``name`` (without the prefix) is a tag of this table."""
    if name in SCALAR_TAGS:
        return True
    if name.startswith("eigenvalue_") and name.removeprefix("eigenvalue_").isdigit():
        return True
    parts = name.split("/")
    return len(parts) >= 3 and parts[0] == "layer" and parts[-1] in LAYER_TAGS
