"""The one home of the names users pick curvature by: the curvature itself, the output
losses with a closed-form Hessian (GGN, Fisher) and the Fisher's kinds. The operators, the
monitor's argument checks and the command line all read them here."""

from __future__ import annotations

from typing import Literal, get_args

Curvature = Literal["hessian", "ggn", "fisher"]
CURVATURES: tuple[str, ...] = get_args(Curvature)
# Losses on the model's outputs with a closed-form Hessian (GGN, Fisher), torch's mean
# reduction against batch[1].
LossName = Literal["mse", "cross_entropy"]
LOSS_NAMES: tuple[str, ...] = get_args(LossName)
# The Fisher with labels drawn from the model ("true") or the batch's own ("empirical").
FisherKind = Literal["true", "empirical"]
FISHER_KINDS: tuple[str, ...] = get_args(FisherKind)
