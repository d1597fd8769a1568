r"""``analyze --per-layer``: the trace and λmax of each layer's diagonal block of the
analyzed matrix.

A layer's block :math:`A_{ll}` is the curvature with every other layer held fixed. Its trace
comes from :func:`~lightning_curvature.estimators.blockwise.blockwise_trace`, which splits
the Hutchinson terms :math:`z^\top A z` of one run over the blocks (no product beyond the
whole trace's, and the layer traces sum to the whole). Its λmax comes from a Lanczos run per
layer on the operator restricted to that layer's parameters (``params=``): measured faster
on a CPU than the batched :func:`~lightning_curvature.estimators.blockwise.blockwise_lambda_max`,
which advances every block in one product of the whole operator.

Example::

    lightning-curvature analyze last.ckpt --model mypkg.Classifier --demo-data --per-layer
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this module's flags to ``analyze``."""
    parser.add_argument(
        "--per-layer",
        action="store_true",
        help="also each layer's trace and λmax (one block per module): the traces split "
        "one Hutchinson run over the blocks (no extra product, they sum to the whole); each "
        "λmax is a Lanczos run on the operator restricted to that layer, measured faster on "
        "a CPU than the batched blockwise_lambda_max (one product of the whole operator "
        "per step for all blocks), which the Python API offers too",
    )


#: Block name → {"num_parameters", "trace", "trace_stderr", "lambda_max", ...}.
LayerTable = dict[str, dict[str, Any]]


def measure_layers(
    op: Any,
    restricted: Callable[[Mapping[str, torch.nn.Parameter]], Any],
    model: torch.nn.Module,
    *,
    num_probes: int,
    tol: float,
    seed: int,
) -> dict[str, Any]:
    """Per-layer traces and λmax of ``op`` (one block per module, as
    :func:`~lightning_curvature.operators.blocks.parameter_blocks` splits them).

    Args:
        op: the operator over every analyzed parameter (``param_names``, ``params``).
        restricted: builds the same kind of operator over the parameters it is given.
        model: owns the parameters ``op.param_names`` names.
        num_probes, tol, seed: Hutchinson probes, Lanczos accuracy and seed.

    Returns:
        ``{"trace": whole, "trace_stderr": ..., "num_matvecs": ..., "layers": LayerTable}``.
    """
    from lightning_curvature.estimators.blockwise import blockwise_trace
    from lightning_curvature.estimators.lanczos import lanczos
    from lightning_curvature.operators.blocks import parameter_blocks

    blocks = parameter_blocks(op.param_names, op.params)
    traces = blockwise_trace(op, blocks, num_probes, seed)
    by_name = dict(model.named_parameters())
    offsets = _name_offsets(op.param_names, op.params)
    layers: LayerTable = {}
    products = traces.whole.num_matvecs
    for name, piece in blocks:
        members = {n: by_name[n] for n, start in offsets if piece.start <= start < piece.stop}
        with restricted(members) as block_op:
            top = lanczos(block_op, k=1, tol=tol, seed=seed)
            products += block_op.num_matvecs
        trace = traces.blocks[name]
        layers[name] = {
            "num_parameters": piece.stop - piece.start,
            "trace": trace.estimate,
            "trace_stderr": trace.stderr,
            "lambda_max": float(top.eigenvalues[0]),
            "lambda_max_error_bound": float(top.error_bounds[0]),
            "lambda_max_converged": bool(top.converged),
        }
    return {
        "trace": traces.whole.estimate,
        "trace_stderr": traces.whole.stderr,
        "num_probes": num_probes,
        "num_matvecs": products,
        "layers": layers,
    }


def _name_offsets(names: list[str], params: list[torch.Tensor]) -> list[tuple[str, int]]:
    """Each parameter's name and where it starts in the flat vector."""
    offsets, start = [], 0
    for name, p in zip(names, params, strict=True):
        offsets.append((name, start))
        start += p.numel()
    return offsets


def scalars(per_layer: dict[str, Any]) -> dict[str, float]:
    """TensorBoard scalars under the monitor's per-layer tags:
    ``curvature/layer/<name>/trace``, ``.../trace_stderr`` and ``.../lambda_max`` (left
    out, as the monitor does, when that layer's Lanczos did not converge)."""
    values = {}
    for name, layer in per_layer["layers"].items():
        values[f"curvature/layer/{name}/trace"] = layer["trace"]
        values[f"curvature/layer/{name}/trace_stderr"] = layer["trace_stderr"]
        if layer["lambda_max_converged"]:
            values[f"curvature/layer/{name}/lambda_max"] = layer["lambda_max"]
    return values


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
            "the layers sum to it: plain Hutchinson (the trace above deflates the top space)",
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
        f"λmax by Lanczos on each layer's block; {per_layer['num_matvecs']} products):\n"
        + "\n".join(line.rstrip() for line in lines)
    )
