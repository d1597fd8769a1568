"""The one place that imports Lightning: ``pytorch_lightning`` if present, else the unified
``lightning`` package's ``lightning.pytorch``.

A callback must subclass the ``Callback`` of the package whose ``Trainer`` runs it, so
``LIGHTNING_PACKAGE`` tells users which one this installation uses.
"""

from __future__ import annotations

try:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback
    from pytorch_lightning.loggers import TensorBoardLogger
    from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

    LIGHTNING_PACKAGE = "pytorch_lightning"
except ImportError:  # pragma: no cover - exercised where only `lightning` is installed
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

    LIGHTNING_PACKAGE = "lightning.pytorch"

__all__ = [
    "LIGHTNING_PACKAGE",
    "Callback",
    "TensorBoardLogger",
    "pl",
    "rank_zero_info",
    "rank_zero_warn",
]
