"""The ``lightning-curvature`` command (also ``python -m lightning_curvature``).

* ``lightning-curvature demo``: train a small MLP on scikit-learn's digits with
  :class:`~lightning_curvature.CurvatureMonitor` and write a TensorBoard run in which λmax
  rises (``--edge-of-stability``: full-batch gradient descent, where λmax·η climbs to 2
  and stays). See :mod:`.demo`.
* ``lightning-curvature analyze CHECKPOINT --model CLASS_PATH (--data CLASS_PATH |
  --demo-data)``: measure the curvature of a saved model with the same operator, the same
  estimators and the same tags as the monitor, and write a JSON summary, a plot of the
  spectrum and a TensorBoard run. See :mod:`.analyze`.
* ``lightning-curvature fit --config configs/demo.yaml``: LightningCLI's ``fit``, for the
  YAML files in ``configs/``. See :mod:`.fit`.

Bad input ends in a one-line error on stderr and exit status 2; a measurement that fails
on good input ends with status 1.

Example::

    from lightning_curvature.cli import main

    status = main(["demo", "--max-steps", "200", "--no-progress"])
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightning_curvature.cli import analyze, demo, fit
from lightning_curvature.cli._shared import (
    BAD_INPUT,
    PROG,
    ArgumentParser,
    CliError,
    importable_working_directory,
)

__all__ = ["CliError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-curvature`` and its subcommands."""
    parser = ArgumentParser(
        prog=PROG,
        description="Loss-curvature monitoring for PyTorch Lightning: a demo run, offline "
        "analysis of checkpoints, and LightningCLI training from YAML configs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_parser(commands)
    analyze.add_parser(commands)
    # Listed for --help only: main() hands everything after `fit` to LightningCLI.
    commands.add_parser("fit", add_help=False, help=fit.HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-curvature`` with ``argv`` (default: ``sys.argv[1:]``); return the
    exit status (0 ok, 1 the measurement failed, 2 bad input).

    Class paths (``--model``, ``--data``, a config's ``class_path``) are imported from the
    working directory too, as with ``python -m``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    importable_working_directory()
    if args[:1] == ["fit"]:
        return fit.run(args[1:])
    try:
        try:
            parsed = build_parser().parse_args(args)
        except SystemExit as done:  # --help
            return int(done.code or 0)
        status: int = parsed.run(parsed)
        return status
    except CliError as error:
        print(f"{error.prog}: error: {error}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
