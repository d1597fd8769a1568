"""The TensorBoard side of the dashboard: a custom-scalars layout, Ritz-value histograms,
spectral-density figures and alert text. Scalars go to every logger elsewhere; this module
adds what only TensorBoard can show."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from lightning_curvature._lightning import TensorBoardLogger
from lightning_curvature.alerts import Alert
from lightning_curvature.measurement import TAG_PREFIX, Measurement


def dashboard_layout(prefix: str = TAG_PREFIX) -> dict[str, dict[str, list]]:
    """Charts that overlay related tags: the relevant sharpness·η with its threshold, the
    stability ratio, the eigenvalues, and the trace.

    Custom-scalars entries are regular expressions matched against tags, so each is anchored
    (``curvature/trace`` alone would also draw ``curvature/trace_stderr``). λmax·η is not
    drawn next to ``sharpness_x_lr``: for SGD-family optimizers the two are the same curve,
    and for adaptive ones raw λmax·η is not what their threshold bounds.
    """
    p = prefix
    return {
        p: {
            "sharpness·lr (λmax·lr; preconditioned for Adam) vs stability threshold": [
                "Multiline",
                [f"^{p}/sharpness_x_lr$", f"^{p}/stability_threshold$"],
            ],
            "sharpness along the way · lr (λmax, batch, directional) vs threshold": [
                "Multiline",
                [
                    f"^{p}/lambda_max_x_lr$",
                    f"^{p}/batch_sharpness_x_lr$",
                    f"^{p}/directional_sharpness_x_lr$",
                    f"^{p}/stability_threshold$",
                ],
            ],
            "stability ratio (1 = edge of stability)": ["Multiline", [f"^{p}/stability_ratio$"]],
            "top eigenvalues": ["Multiline", [f"^{p}/eigenvalue_\\d+$", f"^{p}/lambda_min$"]],
            "trace": ["Multiline", [f"^{p}/trace$"]],
        }
    }


def tensorboard_writers(loggers: list[Any]) -> list[Any]:
    """The SummaryWriters of the TensorBoard loggers among ``loggers``."""
    return [logger.experiment for logger in loggers if isinstance(logger, TensorBoardLogger)]


def write_layout(writer: Any, prefix: str = TAG_PREFIX) -> None:
    writer.add_custom_scalars(dashboard_layout(prefix))


def write_measurement(
    writer: Any, record: Measurement, step: int, prefix: str = TAG_PREFIX
) -> None:
    """The Ritz-value histogram and, when the density was measured, its figure."""
    if record.ritz_values:
        writer.add_histogram(f"{prefix}/ritz_values", np.asarray(record.ritz_values), step)
    if record.density is not None:
        figure = density_figure(record)
        if figure is not None:
            writer.add_figure(f"{prefix}/spectral_density", figure, step, close=True)


def write_alert(writer: Any, alert: Alert, prefix: str = TAG_PREFIX) -> None:
    writer.add_text(f"{prefix}/alerts", f"**{alert.kind}** — {alert.message}", alert.step)


def density_figure(record: Measurement) -> Any | None:
    """A matplotlib figure of the spectral density and the top eigenvalues; None without
    matplotlib (an optional dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            "matplotlib is not installed: the spectral-density figure is skipped "
            "(pip install matplotlib to get it)",
            stacklevel=2,
        )
        return None
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    grid = np.asarray(record.density_grid)
    density = np.asarray(record.density)
    axis.semilogy(grid, np.maximum(density, 1e-12), color="tab:blue", label="SLQ density")
    for index, value in enumerate(record.eigenvalues):
        axis.axvline(
            value, color="tab:red", alpha=0.6, lw=1, label="top eigenvalues" if index == 0 else None
        )
    axis.set_ylim(bottom=max(1e-8, density.max() * 1e-7))
    axis.set_xlabel("eigenvalue")
    axis.set_ylabel("density")
    axis.set_title(f"Hessian spectral density, step {record.step}")
    axis.legend(loc="upper center", fontsize=8)
    figure.tight_layout()
    return figure
