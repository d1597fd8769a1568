"""The demo: scikit-learn's handwritten digits, a small MLP, and CurvatureMonitor watching it.

:class:`DigitsDataModule` and :class:`DigitsClassifier` are ordinary Lightning classes, so
LightningCLI configs (``configs/*.yaml``) and benchmark scripts can name them by class path.
:func:`run_demo` trains one of two runs and returns its TensorBoard log directory:

* progressive sharpening (the default): minibatch SGD on the mean squared error against
  one-hot targets, where λmax rises while the model learns;
* the edge of stability (``edge_of_stability=True``): full-batch gradient descent with MSE
  on a subset, where λmax·η climbs to 2 and hovers there (Cohen et al., ICLR 2021).

The data ships with scikit-learn (an optional dependency: ``pip install
"lightning_curvature[demo]"``); nothing is downloaded.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from lightning_curvature._lightning import TensorBoardLogger, pl

Targets = Literal["class", "onehot"]
Activation = Literal["tanh", "relu", "elu"]
Loss = Literal["cross_entropy", "mse"]
OptimizerName = Literal["sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad"]

NUM_FEATURES = 64  # 8x8 pixels
NUM_CLASSES = 10
#: The file :func:`run_demo` saves the trained model to, inside the run's log directory.
CHECKPOINT_NAME = "model.ckpt"

_ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(inputs, labels)``: float32 pixels in [0, 1], shape (N, 64),
    and int64 labels 0..9."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the digits data comes with scikit-learn: pip install 'lightning_curvature[demo]'"
        ) from error
    digits = load_digits()
    inputs = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0  # pixels are 0..16
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    return inputs, labels


class _Batches(Dataset):
    """Tensors indexed a whole batch at a time: one slice per step instead of collating
    ``batch_size`` single samples (which costs more than the tiny model's step)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes) as flat 64-feature
    float32 vectors in [0, 1], split once, with a seed, into training and validation sets.

    Args:
        batch_size: training (and validation) batch size; ignored for training when
            ``full_batch``.
        num_samples: keep only this many training samples (the first ones of a seeded
            permutation); ``None`` keeps the whole training split.
        full_batch: the training loader yields the whole training set as one batch, in a
            fixed order, every step: full-batch gradient descent.
        targets: ``"class"`` gives int64 labels (for cross-entropy); ``"onehot"`` gives
            float32 one-hot vectors (for MSE).
        val_fraction: the fraction of the 1,797 images held out for validation, in [0, 1).
        seed: seeds the split, the subset and the shuffling, so runs repeat exactly.

    Example::

        data = DigitsDataModule(num_samples=500, full_batch=True, targets="onehot")
        data.setup("fit")
        inputs, targets = next(iter(data.train_dataloader()))  # (500, 64), (500, 10)
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_samples: int | None = None,
        full_batch: bool = False,
        targets: Targets = "class",
        val_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if num_samples is not None and (
            isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
        ):
            raise ValueError(f"num_samples must be an integer >= 1 or None, got {num_samples!r}")
        _check_choice("targets", targets, ("class", "onehot"))
        if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
            raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.full_batch = full_batch
        self.targets = targets
        self.val_fraction = val_fraction
        self.seed = seed
        self.train_set: _Batches | None = None
        self.val_set: _Batches | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load and split the data (fast: it ships with scikit-learn)."""
        if self.train_set is not None:
            return
        inputs, labels = load_digits_tensors()
        order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(self.seed))
        num_val = round(self.val_fraction * len(inputs))
        val_index, train_index = order[:num_val], order[num_val:]
        if self.num_samples is not None:
            if self.num_samples > len(train_index):
                raise ValueError(
                    f"num_samples must be at most {len(train_index)} (the training split), "
                    f"got {self.num_samples}"
                )
            train_index = train_index[: self.num_samples]
        targets = (
            F.one_hot(labels, NUM_CLASSES).to(torch.float32) if self.targets == "onehot" else labels
        )
        self.train_set = _Batches(inputs[train_index], targets[train_index])
        self.val_set = _Batches(inputs[val_index], targets[val_index])

    def train_dataloader(self) -> DataLoader:
        """Shuffled minibatches (a seeded generator), or the whole set as one batch."""
        self.setup("fit")
        assert self.train_set is not None
        if self.full_batch:
            sampler: Any = BatchSampler(
                SequentialSampler(self.train_set), len(self.train_set), drop_last=False
            )
        else:
            generator = torch.Generator().manual_seed(self.seed)
            shuffled = RandomSampler(self.train_set, generator=generator)
            sampler = BatchSampler(shuffled, self.batch_size, drop_last=False)
        return DataLoader(self.train_set, sampler=sampler, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """The held-out images in ``batch_size`` batches, in a fixed order."""
        self.setup("fit")
        assert self.val_set is not None
        sampler = BatchSampler(SequentialSampler(self.val_set), self.batch_size, drop_last=False)
        return DataLoader(self.val_set, sampler=sampler, batch_size=None)


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
        _check_choice("activation", activation, tuple(_ACTIVATIONS))
        _check_choice("loss", loss, ("cross_entropy", "mse"))
        _check_choice(
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


@dataclass(frozen=True)
class DemoRecipe:
    """One demo run: what to train, for how long, and how the monitor measures it.

    Attributes:
        name: the run's directory under the output directory (TensorBoard shows it).
        model: keyword arguments of :class:`DigitsClassifier`.
        data: keyword arguments of :class:`DigitsDataModule`.
        max_steps: optimizer steps.
        monitor: keyword arguments of :class:`~lightning_curvature.CurvatureMonitor`
            (empty: its defaults).
        check_val_every_n_epoch: how often the validation set is scored.
        summary: what to look for, printed when the run ends.
    """

    name: str
    model: dict[str, Any]
    data: dict[str, Any]
    max_steps: int
    monitor: dict[str, Any]
    check_val_every_n_epoch: int
    summary: str


#: Progressive sharpening: minibatch SGD on all 1,437 training digits. With MSE the rise of
#: λmax is steady (cross-entropy sharpens too, but flattens again as the logits grow), and
#: η = 0.2 keeps λmax·η well below 2, so the curve is sharpening, not the stability edge.
#: The monitor runs at its defaults, as a user would first add it.
SHARPENING = DemoRecipe(
    name="sharpening",
    model=dict(hidden_sizes=[64, 64], activation="tanh", loss="mse", optimizer="sgd", lr=0.2),
    data=dict(batch_size=64, targets="onehot"),
    max_steps=10000,
    monitor={},
    check_val_every_n_epoch=5,
    summary="λmax (curvature/lambda_max) rises while the model learns: progressive sharpening.",
)

#: The edge of stability (Cohen et al., ICLR 2021): full-batch gradient descent with MSE on
#: 500 digits. λmax grows until λmax·η reaches 2 (near step 850 at η = 0.5), then hovers there
#: while the loss keeps falling, non-monotonically. The monitor measures every 20 steps with
#: no overhead budget, because the plateau is the point and a budget would thin the curve
#: unevenly; k=2 and the trace keep each measurement cheap (~20 ms); every measurement sees
#: the same full batch, so the curve has no minibatch noise.
EDGE_OF_STABILITY = DemoRecipe(
    name="edge_of_stability",
    model=dict(hidden_sizes=[64, 64], activation="tanh", loss="mse", optimizer="sgd", lr=0.5),
    data=dict(num_samples=500, full_batch=True, targets="onehot"),
    max_steps=3000,
    monitor=dict(every_n_steps=20, k=2, max_overhead=None),
    check_val_every_n_epoch=100,
    summary=(
        "λmax·η (curvature/lambda_max_x_lr) climbs to the threshold 2 and hovers there: "
        "gradient descent at the edge of stability."
    ),
)


class StepProgressBar(pl.callbacks.ProgressBar):
    """One tqdm bar over all ``max_steps`` optimizer steps, with the loss and the latest λmax.

    Lightning's own bar restarts every epoch, and a full-batch run has one step per epoch.

    Args:
        metrics: ``callback_metrics`` keys shown after the bar, mapped to their short names
            (default: the training loss, λmax and λmax·η).
        refresh_seconds: the least time between two redraws.
    """

    def __init__(self, metrics: dict[str, str] | None = None, refresh_seconds: float = 0.2) -> None:
        super().__init__()
        self.metrics = metrics or {
            "train_loss": "loss",
            "curvature/lambda_max": "λmax",
            "curvature/lambda_max_x_lr": "λmax·η",
        }
        self.refresh_seconds = refresh_seconds
        self._enabled = True
        self._bar: Any = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from tqdm.auto import tqdm

        if self._enabled:
            self._bar = tqdm(
                total=trainer.max_steps,
                initial=trainer.global_step,
                desc=f"training {type(pl_module).__name__}",
                unit="step",
                mininterval=self.refresh_seconds,
                dynamic_ncols=True,
            )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._bar is None:
            return
        self._bar.update(trainer.global_step - self._bar.n)
        if self._bar.n == self._bar.total or trainer.global_step % 50 == 0:
            shown = {
                short: f"{float(trainer.callback_metrics[key]):.4g}"
                for key, short in self.metrics.items()
                if key in trainer.callback_metrics
            }
            self._bar.set_postfix(shown, refresh=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextmanager
def _one_thread() -> Iterator[None]:
    """A 64-wide MLP step is ~0.5 ms of math: splitting it over threads costs more than it
    saves (several times more when the cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def demo_recipe(edge_of_stability: bool = False) -> DemoRecipe:
    """The recipe :func:`run_demo` trains: :data:`SHARPENING` or :data:`EDGE_OF_STABILITY`."""
    return EDGE_OF_STABILITY if edge_of_stability else SHARPENING


def run_demo(
    out_dir: str | Path = "runs/demo",
    edge_of_stability: bool = False,
    max_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train the demo with a :class:`~lightning_curvature.CurvatureMonitor` and a
    TensorBoard logger; return the run's log directory.

    The trained model is saved there too, as :data:`CHECKPOINT_NAME` (a Lightning
    checkpoint that :meth:`DigitsClassifier.load_from_checkpoint` and
    ``lightning-curvature analyze`` read). Each call adds a new ``version_N`` directory
    under ``out_dir/<recipe name>``; ``tensorboard --logdir out_dir`` shows them all.

    Args:
        out_dir: where runs go.
        edge_of_stability: train :data:`EDGE_OF_STABILITY` instead of :data:`SHARPENING`.
        max_steps: stop after this many optimizer steps instead of the recipe's.
        seed: seeds the model's initialisation, the data split and the shuffling; the
            caller's global RNG is left as it was.
        progress: show a progress bar.
    """
    from lightning_curvature.callback import CurvatureMonitor

    recipe = demo_recipe(edge_of_stability)
    steps = recipe.max_steps if max_steps is None else max_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1 or None, got {max_steps!r}")
    logger = TensorBoardLogger(str(out_dir), name=recipe.name, default_hp_metric=False)
    callbacks: list[Any] = [CurvatureMonitor(**recipe.monitor)]
    if progress:
        callbacks.append(StepProgressBar())
    with _one_thread(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # num_workers=0 is right for data that already sits in memory as tensors.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        torch.manual_seed(seed)
        model = DigitsClassifier(**recipe.model)
        data = DigitsDataModule(**recipe.data, seed=seed)
        trainer = pl.Trainer(
            max_steps=steps,
            accelerator="cpu",  # a tiny MLP: a GPU would only add transfers
            devices=1,
            logger=logger,
            callbacks=callbacks,
            enable_progress_bar=progress,
            enable_checkpointing=False,
            enable_model_summary=False,
            log_every_n_steps=10,
            check_val_every_n_epoch=recipe.check_val_every_n_epoch,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, data)
        log_dir = Path(logger.log_dir)
        trainer.save_checkpoint(log_dir / CHECKPOINT_NAME)
    return log_dir
