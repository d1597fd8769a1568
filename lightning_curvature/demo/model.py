"""The demo's model: a small MLP classifier, optionally with low-rank adapters on a frozen
backbone, whose loss and optimizer are chosen by name."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from lightning_curvature._checks import check_choice
from lightning_curvature._lightning import pl
from lightning_curvature.demo.data import NUM_CLASSES, NUM_FEATURES

Activation = Literal["tanh", "relu", "elu"]
Loss = Literal["cross_entropy", "mse"]
OptimizerName = Literal["sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}


class LowRankAdapter(nn.Module):
    r"""A linear layer plus a trainable low-rank update (LoRA): ``base(x) + x Aᵀ Bᵀ``.

    B starts at zero, so the adapted layer first computes exactly what ``base`` does.

    Args:
        base: the linear layer to adapt (its parameters are left as they are).
        rank: r, the rank of the update ``B A`` (B: out×r, A: r×in).
    """

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.down.T) @ self.up.T


class DigitsClassifier(pl.LightningModule):
    """A multilayer perceptron for the 8x8 digits: 64 inputs → ``hidden_sizes`` → 10.

    Args:
        hidden_sizes: widths of the hidden layers.
        activation: the nonlinearity after each hidden layer (``"tanh"``, ``"relu"``,
            ``"elu"``).
        loss: ``"cross_entropy"`` on the logits, or ``"mse"``: the mean squared error
            between the 10 outputs and one-hot targets (integer labels are one-hot encoded
            here, so both of :class:`DigitsDataModule`'s target modes work).
        optimizer: ``"sgd"`` (plain), ``"momentum"`` (heavy ball), ``"nesterov"``,
            ``"adam"``, ``"adamw"``, ``"rmsprop"`` or ``"adagrad"``, all from ``torch.optim``.
        lr: the learning rate η.
        momentum: β for ``"momentum"`` and ``"nesterov"``.
        beta1: Adam's and AdamW's first-moment decay (β2 is 0.999).
        freeze_backbone: freeze every weight and bias of the MLP; with ``adapter_rank > 0``
            only the adapters train (and CurvatureMonitor measures the Hessian over them).
        adapter_rank: add a rank-r LoRA adapter to every linear layer; 0 adds none.

    Example::

        model = DigitsClassifier(hidden_sizes=[32, 32], optimizer="adam", lr=1e-3)
        trainer.fit(model, DigitsDataModule())
    """

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: Activation = "tanh",
        loss: Loss = "cross_entropy",
        optimizer: OptimizerName = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        beta1: float = 0.9,
        freeze_backbone: bool = False,
        adapter_rank: int = 0,
    ) -> None:
        super().__init__()
        hidden_sizes = list(hidden_sizes)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive integers, got {hidden_sizes!r}")
        check_choice("activation", activation, tuple(_ACTIVATIONS))
        check_choice("loss", loss, ("cross_entropy", "mse"))
        check_choice(
            "optimizer",
            optimizer,
            ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad"),
        )
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not (isinstance(beta1, (int, float)) and 0 <= beta1 < 1):
            raise ValueError(f"beta1 must be in [0, 1), got {beta1!r}")
        if isinstance(adapter_rank, bool) or not isinstance(adapter_rank, int) or adapter_rank < 0:
            raise ValueError(f"adapter_rank must be an integer >= 0, got {adapter_rank!r}")
        if freeze_backbone and adapter_rank == 0:
            raise ValueError(
                "freeze_backbone=True with adapter_rank=0 leaves nothing to train: "
                "set adapter_rank to 1 or more"
            )
        self.save_hyperparameters()  # reads the locals: hidden_sizes is a plain list

        layers: list[nn.Module] = []
        widths = [NUM_FEATURES, *hidden_sizes, NUM_CLASSES]
        for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            linear = nn.Linear(fan_in, fan_out)
            if freeze_backbone:
                linear.requires_grad_(False)
            layers.append(LowRankAdapter(linear, adapter_rank) if adapter_rank else linear)
            if index < len(widths) - 2:
                layers.append(_ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The 10 logits (or MSE outputs) for a batch of flat 64-pixel images."""
        return self.net(inputs)

    def _loss_and_accuracy(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch
        outputs = self(inputs)
        labels = targets.argmax(dim=1) if targets.is_floating_point() else targets
        if self.hparams.loss == "mse":
            onehot = targets if targets.is_floating_point() else F.one_hot(labels, NUM_CLASSES)
            loss = F.mse_loss(outputs, onehot.to(outputs.dtype))
        else:
            loss = F.cross_entropy(outputs, labels)
        accuracy = (outputs.argmax(dim=1) == labels).float().mean()
        return loss, accuracy

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The loss of one batch; logs ``train_loss`` and ``train_acc``."""
        loss, accuracy = self._loss_and_accuracy(batch)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", accuracy)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Logs ``val_loss`` and ``val_acc``."""
        loss, accuracy = self._loss_and_accuracy(batch)
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_acc", accuracy)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimizer named by ``optimizer``, over the trainable parameters only."""
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            return torch.optim.SGD(params, lr=hp.lr)
        if hp.optimizer in ("momentum", "nesterov"):
            return torch.optim.SGD(
                params, lr=hp.lr, momentum=hp.momentum, nesterov=hp.optimizer == "nesterov"
            )
        if hp.optimizer == "adam":
            return torch.optim.Adam(params, lr=hp.lr, betas=(hp.beta1, 0.999))
        if hp.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=hp.lr, betas=(hp.beta1, 0.999))
        if hp.optimizer == "rmsprop":
            return torch.optim.RMSprop(params, lr=hp.lr)
        return torch.optim.Adagrad(params, lr=hp.lr)


# ---------------------------------------------------------------------------- the demo runs
