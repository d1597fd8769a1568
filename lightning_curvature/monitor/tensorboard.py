"""The TensorBoard side of the dashboard: a custom-scalars layout, Ritz-value histograms,
spectral-density figures and alert text. Scalars go to every logger elsewhere; this module
adds what only TensorBoard can show.

Every function takes the tag prefix of the monitor it draws for (``prefix``, the monitor's
``tag_prefix``), so several monitors can write side by side, each to its own section.
Figures are built with matplotlib's object API (:class:`matplotlib.figure.Figure`), never
pyplot, so the user's matplotlib backend and open figures are left alone.

Example::

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter("runs/offline")
    write_layout(writer, prefix="curvature")
    write_measurement(writer, record, step=record.step, prefix="curvature")
"""

from __future__ import annotations

import re
import warnings
import weakref
from typing import Any

import numpy as np

from lightning_curvature.measure.record import Measurement
from lightning_curvature.monitor.alerts import Alert

# A layout is {section: {chart title: ["Multiline", [tag regex, ...]]}}.
Layout = dict[str, dict[str, list[Any]]]

# The prefixes whose sections each writer already holds. TensorBoard shows only the last
# layout a run wrote, so a second monitor on the same writer must write both sections.
_SECTIONS: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()


def ritz_histogram_tag(prefix: str = "curvature") -> str:
    return f"{prefix}/ritz_values"


def density_figure_tag(prefix: str = "curvature") -> str:
    return f"{prefix}/spectral_density"


def alert_text_tag(prefix: str = "curvature") -> str:
    return f"{prefix}/alerts"


def loss_spike_text_tag(prefix: str = "curvature") -> str:
    return f"{prefix}/loss_spikes"


def stability_edge_tag(prefix: str = "curvature") -> str:
    """A constant 1 beside each stability ratio: Custom Scalars draws only logged tags, so
    the edge line of the ratio chart is a scalar of its own (TensorBoard writers only)."""
    return f"{prefix}/stability_edge"


def dashboard_layout(prefix: str = "curvature") -> Layout:
    """One section, titled ``prefix``, of charts that overlay related tags.

    * the optimizer's relevant sharpness·η (λmax·η; preconditioned for Adam-family) against
      its stability threshold, and the stability ratio against a line at 1 (the edge of
      stability);
    * λmax·η, batch sharpness·η (Andreyev & Beneventano 2024) and directional
      sharpness·η along the last update (Pan & Li 2023) against the same threshold;
    * the top eigenvalues with λmin, and the trace;
    * per-layer λmax and per-layer trace, when the monitor measures layers.

    Custom-scalars entries are regular expressions matched against tags, so each is anchored
    (``trace`` alone would also draw ``trace_stderr``) and the prefix is escaped.

    Example::

        >>> sorted(dashboard_layout("curvature")["curvature"])[0]
        'batch, directional and λmax sharpness·η vs stability threshold'
    """
    p = re.escape(prefix)
    return {
        prefix: {
            "sharpness·η (λmax·η; preconditioned for Adam) vs stability threshold": [
                "Multiline",
                [f"^{p}/sharpness_x_lr$", f"^{p}/stability_threshold$"],
            ],
            "batch, directional and λmax sharpness·η vs stability threshold": [
                "Multiline",
                [
                    f"^{p}/lambda_max_x_lr$",
                    f"^{p}/batch_sharpness_x_lr$",
                    f"^{p}/directional_sharpness_x_lr$",
                    f"^{p}/stability_threshold$",
                ],
            ],
            "stability ratio (1 = edge of stability)": [
                "Multiline",
                [
                    f"^{p}/stability_ratio$",
                    f"^{p}/predicted_stability_ratio$",
                    f"^{re.escape(stability_edge_tag(prefix))}$",
                ],
            ],
            "top eigenvalues": ["Multiline", [f"^{p}/eigenvalue_\\d+$", f"^{p}/lambda_min$"]],
            "trace": ["Multiline", [f"^{p}/trace$"]],
            "per-layer λmax": ["Multiline", [f"^{p}/layer/.*/lambda_max$"]],
            "per-layer trace": ["Multiline", [f"^{p}/layer/.*/trace$"]],
        }
    }


def write_layout(writer: Any, prefix: str = "curvature") -> None:
    """Add the section of ``prefix`` to the writer's custom-scalars layout, keeping the
    sections that other monitors wrote to the same writer."""
    sections = _SECTIONS.setdefault(writer, [])
    if prefix not in sections:
        sections.append(prefix)
    layout: Layout = {}
    for section in sections:
        layout.update(dashboard_layout(section))
    writer.add_custom_scalars(layout)


def write_measurement(
    writer: Any, record: Measurement, step: int, prefix: str = "curvature"
) -> None:
    """The Ritz-value histogram, the edge line beside a logged stability ratio and, when
    the density was measured, its figure."""
    if record.converged and record.stability_ratio is not None:
        writer.add_scalar(stability_edge_tag(prefix), 1.0, step)
    if record.ritz_values:
        writer.add_histogram(ritz_histogram_tag(prefix), np.asarray(record.ritz_values), step)
    if record.density is not None:
        figure = density_figure(record)
        if figure is not None:
            writer.add_figure(density_figure_tag(prefix), figure, step, close=False)


def write_alert(writer: Any, alert: Alert, prefix: str = "curvature") -> None:
    """The alert as a text entry at its step."""
    writer.add_text(alert_text_tag(prefix), f"**{alert.kind}** — {alert.message}", alert.step)


def write_loss_spike(writer: Any, step: int, explanation: str, prefix: str = "curvature") -> None:
    """What curvature said at a loss spike, as a text entry at its step."""
    writer.add_text(loss_spike_text_tag(prefix), explanation, step)


def density_figure(record: Measurement) -> Any | None:
    """A matplotlib :class:`~matplotlib.figure.Figure` of the spectral density and the top
    eigenvalues; None without matplotlib (an optional dependency) or without a density.

    The figure is not registered with pyplot: nothing needs closing, and no backend is
    chosen or changed.
    """
    if record.density is None or record.density_grid is None:
        return None
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(
            "matplotlib is not installed: the spectral-density figure is skipped "
            "(pip install matplotlib to get it)",
            stacklevel=2,
        )
        return None
    figure = Figure(figsize=(6, 3.5), dpi=100, layout="tight")
    axis = figure.add_subplot()
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
    return figure
