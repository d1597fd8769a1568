"""``lightning-curvature fit``: LightningCLI's ``fit`` for the YAML files in ``configs/``."""

from __future__ import annotations

import importlib
import sys

from lightning_curvature.cli._shared import BAD_INPUT, PROG, one_line

HELP = "LightningCLI fit, e.g. `fit --config configs/demo.yaml` (needs jsonargparse)"


def run(args: list[str]) -> int:
    """LightningCLI ``fit`` with ``args``: any LightningModule/LightningDataModule by class
    path, e.g. ``--config configs/demo.yaml``. Returns the exit status (2: bad config)."""
    from lightning_curvature._lightning import LIGHTNING_PACKAGE

    try:
        cli_module = importlib.import_module(f"{LIGHTNING_PACKAGE}.cli")
        cli_module.LightningCLI  # noqa: B018  (fails without jsonargparse)
    except (ImportError, AttributeError) as error:
        print(
            f"{PROG}: error: fit needs LightningCLI's extras ({one_line(error)}): "
            "pip install 'lightning_curvature[demo]'",
            file=sys.stderr,
        )
        return BAD_INPUT
    argv, sys.argv = sys.argv, [f"{PROG} fit"]  # args only: LightningCLI warns on both
    try:
        cli_module.LightningCLI(args=["fit", *args], save_config_kwargs={"overwrite": True})
    except SystemExit as done:
        return int(done.code or 0)
    finally:
        sys.argv = argv
    return 0
