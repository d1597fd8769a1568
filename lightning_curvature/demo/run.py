"""The demo runs, with CurvatureMonitor watching, and a progress bar that shows λmax."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_curvature._lightning import TensorBoardLogger, pl
from lightning_curvature.demo.data import DigitsDataModule
from lightning_curvature.demo.model import DigitsClassifier
from lightning_curvature.demo.text import StdlibTextDataModule
from lightning_curvature.demo.transformer import CharTransformer

#: The file :func:`run_demo` saves the trained model to, inside the run's log directory.
CHECKPOINT_NAME = "model.ckpt"


@dataclass(frozen=True)
class DemoRecipe:
    """One demo run: what to train, for how long, and how the monitor measures it.

    Attributes:
        name: the run's directory under the output directory (TensorBoard shows it).
        model: keyword arguments of :class:`DigitsClassifier` (or of
            :class:`~lightning_curvature.demo.transformer.CharTransformer`).
        data: keyword arguments of :class:`DigitsDataModule` (or of
            :class:`~lightning_curvature.demo.text.StdlibTextDataModule`).
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
    language_model: bool = False  # CharTransformer on the standard library's source


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


#: A small GPT-style byte-level language model (2 blocks, width 64, 137k parameters) on
#: the standard library's own source, with AdamW at a learning rate high for its size and
#: no warm-up: the preconditioned sharpness λmax(P⁻¹H) is what the monitor holds against
#: Adam's threshold 38/η. About two minutes on two CPU cores, measuring included.
TRANSFORMER = DemoRecipe(
    name="transformer",
    model=dict(lr=1e-2),
    data=dict(batch_size=16),
    max_steps=1500,
    monitor={},
    check_val_every_n_epoch=1,
    summary=(
        "a byte-level transformer with AdamW: the stability ratio is λmax(P⁻¹H)·η against "
        "38 (curvature/stability_ratio), with alerts when it spikes or sits at the edge."
    ),
    language_model=True,
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


def demo_recipe(edge_of_stability: bool = False, transformer: bool = False) -> DemoRecipe:
    """The recipe :func:`run_demo` trains: :data:`SHARPENING`, :data:`EDGE_OF_STABILITY` or
    :data:`TRANSFORMER`."""
    if edge_of_stability and transformer:
        raise ValueError("edge_of_stability and transformer are two demos: choose one")
    if transformer:
        return TRANSFORMER
    return EDGE_OF_STABILITY if edge_of_stability else SHARPENING


def run_demo(
    out_dir: str | Path = "runs/demo",
    edge_of_stability: bool = False,
    max_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    transformer: bool = False,
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
        transformer: train :data:`TRANSFORMER` instead.
    """
    from lightning_curvature.callback import CurvatureMonitor

    recipe = demo_recipe(edge_of_stability, transformer)
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
        model: pl.LightningModule
        data: pl.LightningDataModule
        if recipe.language_model:
            model = CharTransformer(**recipe.model)
            data = StdlibTextDataModule(**recipe.data, seed=seed)
        else:
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
            limit_val_batches=20 if recipe.language_model else None,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, data)
        log_dir = Path(logger.log_dir)
        trainer.save_checkpoint(log_dir / CHECKPOINT_NAME)
    return log_dir
