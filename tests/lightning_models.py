"""Small LightningModules and data for the callback tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature._lightning import pl

# DESIGN.md's scalar tags that every optimizer gets (preconditioned_lambda_max is
# Adam-family only; eigenvalue_{i} depends on k).
DESIGN_TAGS = {
    "curvature/lambda_max",
    "curvature/trace",
    "curvature/lambda_max_x_lr",
    "curvature/stability_threshold",
    "curvature/stability_ratio",
}


def classification_data(n=256, features=10, classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, features, generator=generator)
    weights = torch.randn(features, classes, generator=generator)
    targets = (inputs @ weights + 0.5 * torch.randn(n, classes, generator=generator)).argmax(1)
    return TensorDataset(inputs, targets)


def image_data(n=128, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 1, 8, 8, generator=generator)
    targets = torch.randint(0, classes, (n,), generator=generator)
    return TensorDataset(inputs, targets)


def mlp(features=10, hidden=16, classes=4):
    return nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def cnn_with_batchnorm_and_dropout(classes=3):
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(4 * 4 * 4, classes),
    )


class Classifier(pl.LightningModule):
    """A plain classifier whose optimizer is chosen by name."""

    def __init__(self, net: nn.Module, optimizer: str = "sgd", lr: float = 0.1, **opt_kwargs):
        super().__init__()
        self.net = net
        self.optimizer_name = optimizer
        self.lr = lr
        self.opt_kwargs = opt_kwargs

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = nn.functional.cross_entropy(self(inputs), targets)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        optimizers = {
            "sgd": torch.optim.SGD,
            "adam": torch.optim.Adam,
            "adamw": torch.optim.AdamW,
            "rmsprop": torch.optim.RMSprop,
            "adagrad": torch.optim.Adagrad,
        }
        return optimizers[self.optimizer_name](self.parameters(), lr=self.lr, **self.opt_kwargs)


def loader(dataset, batch_size=32, shuffle=False, seed=0):
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def trainer(tmp_path, callbacks=(), max_steps=20, logger=True, **kwargs):
    from lightning_curvature._lightning import TensorBoardLogger

    defaults = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(tmp_path), name="run") if logger else False,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def read_events(log_dir):
    """Everything TensorBoard would show, read back from the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator
