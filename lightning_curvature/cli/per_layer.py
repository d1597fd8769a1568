r"""``analyze --per-layer``: the trace and λmax of each layer's diagonal block of the
analyzed matrix, as the monitor's ``per_layer=True`` measures them.

A layer's block :math:`A_{ll}` is the curvature with every other layer held fixed. The
measurement itself (:func:`~lightning_curvature.measure.tiers.measure` with ``blocks``) gives
each block's trace from the Hutchinson probes of the whole trace (no product beyond them,
and the layer traces sum to the whole) and each block's λmax from one batched Lanczos over
all blocks; this module only lays the blocks out and reports them.

Example::

    lightning-curvature analyze last.ckpt --model mypkg.Classifier --demo-data --per-layer
"""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this module's flags to ``analyze``."""
    parser.add_argument(
        "--per-layer",
        action="store_true",
        help="also each layer's trace and λmax (one block per module), as the monitor's "
        "per_layer=True: the traces split the whole trace's Hutchinson probes over the "
        "blocks (no extra product; they sum to the whole, which is then plain Hutchinson); "
        "the λmax of every block comes from one batched Lanczos",
    )


#: Block name → {"num_parameters", "trace", "trace_stderr", "lambda_max", ...}.
LayerTable = dict[str, dict[str, Any]]


def layer_blocks(op: Any) -> list[tuple[str, slice]]:
    """One block per module of the operator's parameters (weight and bias together)."""
    from lightning_curvature.operators.blocks import parameter_blocks

    return parameter_blocks(op.param_names, op.params)


def layer_report(record: Any, blocks: list[tuple[str, slice]], num_probes: int) -> dict[str, Any]:
    """The per-layer part of a measurement made with ``blocks``, for summary.json."""
    layers: LayerTable = {}
    for name, piece in blocks:
        trace, stderr = record.layer_traces[name]
        value, bound, converged = record.layer_lambda_max[name]
        layers[name] = {
            "num_parameters": piece.stop - piece.start,
            "trace": trace,
            "trace_stderr": stderr,
            "lambda_max": value,
            "lambda_max_error_bound": bound,
            "lambda_max_converged": converged,
        }
    return {
        "trace": record.trace,
        "trace_stderr": record.trace_stderr,
        "num_probes": num_probes,
        "layers": layers,
    }


def table(per_layer: dict[str, Any]) -> str:
    """The layers as a plain-text table."""
    header = ("layer", "parameters", "trace", "± stderr", "λmax", "λmax evidence")
    rows = [
        (
            name,
            f"{layer['num_parameters']:,}",
            f"{layer['trace']:.6g}",
            f"{layer['trace_stderr']:.2g}",
            f"{layer['lambda_max']:.6g}",
            f"error bound {layer['lambda_max_error_bound']:.2g}, "
            + ("converged" if layer["lambda_max_converged"] else "NOT converged"),
        )
        for name, layer in per_layer["layers"].items()
    ]
    rows.append(
        (
            "all",
            "",
            f"{per_layer['trace']:.6g}",
            f"{per_layer['trace_stderr']:.2g}",
            "",
            "the whole trace: the layers sum to it (plain Hutchinson, the same probes)",
        )
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = [
        "  "
        + "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(r[:-1], widths, strict=True))
        )
        + f"  {r[-1]}"
        for r in [header, *rows]
    ]
    return (
        f"Per layer ({per_layer['num_probes']} Hutchinson probes shared by all layers; "
        "λmax of every block by one batched Lanczos):\n"
        + "\n".join(line.rstrip() for line in lines)
    )
