"""The one place that imports Lightning: ``pytorch_lightning``, or the unified ``lightning``
package's ``lightning.pytorch``.

A callback must subclass the ``Callback`` of the package whose ``Trainer`` runs it. By
default that is ``pytorch_lightning`` when it is installed and ``lightning.pytorch``
otherwise; set ``LIGHTNING_CURVATURE_BACKEND=lightning`` (or ``pytorch_lightning``) before
importing this package to choose when both are installed. ``LIGHTNING_PACKAGE`` says which
one is in use.
"""

from __future__ import annotations

import importlib
import os

_CHOICE = os.environ.get("LIGHTNING_CURVATURE_BACKEND", "").strip()
if _CHOICE not in ("", "lightning", "pytorch_lightning"):
    raise ValueError(
        f"LIGHTNING_CURVATURE_BACKEND must be 'lightning' or 'pytorch_lightning', got {_CHOICE!r}"
    )


def _load(package: str):
    root = "lightning.pytorch" if package == "lightning" else "pytorch_lightning"
    return (
        importlib.import_module(root),
        importlib.import_module(f"{root}.callbacks"),
        importlib.import_module(f"{root}.loggers"),
        importlib.import_module(f"{root}.utilities"),
        root,
    )


if _CHOICE:
    pl, _callbacks, _loggers, _utilities, LIGHTNING_PACKAGE = _load(_CHOICE)
else:
    try:
        pl, _callbacks, _loggers, _utilities, LIGHTNING_PACKAGE = _load("pytorch_lightning")
    except ImportError:
        pl, _callbacks, _loggers, _utilities, LIGHTNING_PACKAGE = _load("lightning")

Callback = _callbacks.Callback
TensorBoardLogger = _loggers.TensorBoardLogger
rank_zero_info = _utilities.rank_zero_info
rank_zero_warn = _utilities.rank_zero_warn

__all__ = [
    "LIGHTNING_PACKAGE",
    "Callback",
    "TensorBoardLogger",
    "pl",
    "rank_zero_info",
    "rank_zero_warn",
]
