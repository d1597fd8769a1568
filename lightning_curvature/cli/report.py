"""What ``analyze`` writes and prints: ``summary.json``, ``spectrum.png``, a TensorBoard run
with the monitor's own tags and layout, and the plain-text table with each number's
evidence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_curvature.cli._shared import CliError, one_line


def write_outputs(out: Path, record: Any, summary: dict[str, Any], step: int) -> None:
    """summary.json, spectrum.png and a TensorBoard run with the monitor's tags."""
    from torch.utils.tensorboard import SummaryWriter

    from lightning_curvature.monitor.tensorboard import (
        density_figure,
        write_layout,
        write_measurement,
    )

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CliError(f"--out {out}: cannot create it ({one_line(error)})") from None
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    figure = density_figure(record)
    if figure is not None:
        figure.savefig(out / "spectrum.png")
    writer = SummaryWriter(log_dir=str(out))
    try:
        write_layout(writer)
        # The per-layer tags are among the record's own: one spelling, written once.
        for tag, value in record.scalars().items():
            writer.add_scalar(tag, value, step)
        write_measurement(writer, record, step)
    finally:
        writer.close()


def _convergence(flag: bool | None) -> str:
    if flag is None:
        return "convergence not reported"
    return "converged" if flag else "NOT converged (raise --tol?)"


def table(record: Any, summary: dict[str, Any]) -> str:
    """The measurement as a plain-text table with its convergence evidence."""
    rows: list[tuple[str, str, str]] = []
    for index, (value, bound) in enumerate(
        zip(record.eigenvalues, record.error_bounds, strict=True)
    ):
        name = "λmax" if index == 0 else f"eigenvalue {index + 1}"
        evidence = f"error bound {bound:.2g}"
        if index == 0:
            evidence += f", {_convergence(record.converged)}"
        rows.append((name, f"{value:.6g}", evidence))
    if record.lambda_min is not None:
        converged = getattr(record, "lambda_min_converged", None)
        rows.append(("λmin", f"{record.lambda_min:.6g}", _convergence(converged)))
    elif "lambda_min_skipped" in summary:
        rows.append(("λmin", "skipped", summary["lambda_min_skipped"]))
    if record.trace is not None:
        rows.append(
            (
                "trace",
                f"{record.trace:.6g} ± {record.trace_stderr:#.2g}",
                f"± 1 stderr, {summary['settings']['num_probes']} Hutchinson probes",
            )
        )
    if record.learning_rate is not None:
        rows.append(("η", f"{record.learning_rate:.6g}", "learning rate of the first group"))
    else:
        rows.append(("η", "unknown", "no optimizer rebuilt, so no stability numbers"))
    if record.preconditioned_lambda_max is not None:
        rows.append(("λmax(P⁻¹H)", f"{record.preconditioned_lambda_max:.6g}", "preconditioned"))
    if record.sharpness_x_lr is not None:
        rows.append(
            (
                "sharpness·η",
                f"{record.sharpness_x_lr:.4g}",
                f"threshold {record.stability_threshold:.4g}, ratio {record.stability_ratio:.3g}",
            )
        )
    rows.append(("loss", f"{record.probe_loss:.6g}", f"mean over {summary['num_batches']} batches"))
    rows.append(("products", str(record.num_matvecs), f"{record.seconds:.2f} s"))
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    header = (
        f"{summary['matrix']} of {summary['model'].rsplit('.', 1)[-1]}'s training loss at step "
        f"{summary['global_step']}: {summary['num_parameters']:,} parameters, "
        f"{summary['num_batches']} batch(es) of {summary['data']}\n"
        f"Stability: {summary['stability']}"
    )
    lines = [f"  {a:<{width}}  {b:>{value_width}}  {c}" for a, b, c in rows]
    return "\n".join([header, *lines])
