"""Shared by the phenomena benchmarks: one training run watched by CurvatureMonitor, and
the few summaries and outputs the three scripts have in common.

Every curvature number the scripts report comes from ``CurvatureMonitor.history`` in a
real ``pl.Trainer`` run; this module only adds a per-step record of the training loss (the
monitor measures on a schedule, the loss is wanted at every step), the accuracies after
training, and the count of alerts the monitor fired.
"""

from __future__ import annotations

import itertools
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bench_engine import machine  # one home for naming the machine

from lightning_curvature._lightning import Callback, TensorBoardLogger, pl
from lightning_curvature.callback import CurvatureMonitor
from lightning_curvature.demo import DigitsDataModule
from lightning_curvature.monitor.alerts import EDGE, SPIKE

# One intra-op thread: on this machine (two cores shared with other jobs) two OpenMP threads
# made a 2 ms full-batch step take 40-180 ms whenever another process held a core (each
# barrier waits for a descheduled thread), while one thread stayed at 3-4 ms. The model is
# too small for a second thread to pay anyway.
THREADS = 1
FIGURES = Path(__file__).resolve().parent / "figures"
MAX_FIGURE_BYTES = 150_000


def configure_torch() -> None:
    """One thread (see ``THREADS``), and denormals flushed to zero.

    Full-batch Adam (and RMSprop, Adagrad) on the digits drives some second-moment entries
    into float32 denormals, which the CPU handles up to 20× slower (10-20 ms per step
    instead of 1 ms). Flushing them changes nothing that matters here: a denormal v has
    √v < 1e-19, far below every ε used.
    """
    torch.set_num_threads(THREADS)
    torch.set_flush_denormal(True)


class LossRecorder(Callback):
    """The training loss at every optimizer step (the value ``training_step`` returned, on
    the batch just trained on, before the update)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []
        self.losses: list[float] = []

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps.append(trainer.global_step)
        self.losses.append(float(loss))


@dataclass
class Run:
    """One training run and what the monitor saw."""

    label: str
    learning_rate: float
    history: list[dict[str, float]]
    loss_steps: list[int]
    losses: list[float]
    alerts: dict[str, int]
    seconds: float
    measure_seconds: float
    train_acc: float
    val_acc: float
    extra: dict[str, Any] = field(default_factory=dict)

    def series(self, tag: str) -> tuple[list[float], list[float]]:
        """(steps, values) of one ``curvature/*`` tag from the monitor's history."""
        rows = [row for row in self.history if tag in row]
        return [row["step"] for row in rows], [row[tag] for row in rows]

    @property
    def threshold(self) -> float:
        """The optimizer's stability threshold, as the monitor logged it."""
        return self.series("curvature/stability_threshold")[1][-1]

    @property
    def final_loss(self) -> float:
        return self.losses[-1]

    def loss_increases(self, tail: float) -> float:
        """Fraction of the steps in the last ``tail`` of training where the training loss
        went up: 0 for monotone descent, what the edge of stability makes it not."""
        start = round(len(self.losses) * (1.0 - tail))
        pairs = list(itertools.pairwise(self.losses[start:]))
        return sum(after > before for before, after in pairs) / max(len(pairs), 1)


def train(
    label: str,
    make_model: Callable[[], pl.LightningModule],
    data: DigitsDataModule,
    max_steps: int,
    monitor: CurvatureMonitor | None,
    seed: int = 0,
    logdir: str | None = None,
    extra_callbacks: Sequence[Callback] = (),
) -> Run:
    """Train ``make_model()`` on ``data`` for ``max_steps`` optimizer steps with ``monitor``
    (None: without one, for the wall time a monitor adds).

    The model is built after seeding, so every run of a script starts from the same
    initialisation. Validation is left out of the loop (it would only cost time); both
    accuracies are computed once at the end. The monitor's alerts are counted, not shown:
    in these runs the "Edge of stability" alert fires by design.
    """
    pl.seed_everything(seed, verbose=False)
    model = make_model()
    recorder = LossRecorder()
    logger: Any = False
    if logdir is not None:
        logger = TensorBoardLogger(logdir, name=label.replace(" ", "_"), version="")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[*([monitor] if monitor else []), recorder, *extra_callbacks],
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*CurvatureMonitor.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*train_dataloader.*")
        trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - started
    kinds = [] if monitor is None else [alert.kind for alert in monitor.alerts.fired]
    return Run(
        label=label,
        learning_rate=float(trainer.optimizers[0].param_groups[0]["lr"]),
        history=[] if monitor is None else list(monitor.history),
        loss_steps=recorder.steps,
        losses=recorder.losses,
        alerts={"threshold": kinds.count(EDGE), "spike": kinds.count(SPIKE)},
        seconds=seconds,
        measure_seconds=0.0 if monitor is None else monitor.schedule.clock.measure_seconds,
        train_acc=accuracy(model, data.train_dataloader()),
        val_acc=accuracy(model, data.val_dataloader()),
    )


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: Any) -> float:
    """Fraction of correctly classified samples (targets: labels or one-hot)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for inputs, targets in loader:
        labels = targets.argmax(dim=1) if targets.is_floating_point() else targets
        correct += int((model(inputs).argmax(dim=1) == labels).sum())
        total += len(labels)
    model.train(was_training)
    return correct / total


def first_step_at_or_above(steps: Sequence[float], values: Sequence[float], level: float) -> float:
    """The first measured step whose value reaches ``level`` (nan if none does)."""
    for step, value in zip(steps, values, strict=True):
        if value >= level:
            return step
    return math.nan


def tail_stats(
    steps: Sequence[float], values: Sequence[float], fraction: float
) -> tuple[float, float]:
    """Mean and standard deviation of the values over the last ``fraction`` of the steps."""
    start = steps[-1] - fraction * (steps[-1] - steps[0])
    tail = [v for s, v in zip(steps, values, strict=True) if s >= start]
    return statistics.fmean(tail), statistics.pstdev(tail)


@dataclass(frozen=True)
class EdgeSummary:
    """How one run approached its optimizer's stability edge, from the monitor's
    ``curvature/sharpness_x_lr`` (λmax·η for SGD, λmax(P⁻¹H)·η for adaptive optimizers)
    and ``curvature/stability_threshold``."""

    threshold: float
    first_sharpness: float
    step_at_90: float
    step_at_edge: float
    tail_mean: float
    tail_std: float
    max_value: float


def edge_summary(run: Run, tail: float) -> EdgeSummary:
    """The :class:`EdgeSummary` of ``run`` over the last ``tail`` fraction of its steps."""
    steps, product = run.series("curvature/sharpness_x_lr")
    threshold = run.threshold
    mean, std = tail_stats(steps, product, tail)
    return EdgeSummary(
        threshold=threshold,
        first_sharpness=product[0] / run.learning_rate,
        step_at_90=first_step_at_or_above(steps, product, 0.9 * threshold),
        step_at_edge=first_step_at_or_above(steps, product, threshold),
        tail_mean=mean,
        tail_std=std,
        max_value=max(product),
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats already formatted by the caller."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig: Any, name: str, quick: bool = False) -> Path:
    """Save a matplotlib figure as a PNG (dpi 100): ``benchmarks/figures/<name>`` for a full
    run, the temporary directory for a ``--quick`` smoke run (so smoke runs leave the
    recorded figures alone). Warns when a figure is over the 150 kB budget."""
    folder = Path(tempfile.gettempdir()) / "lightning_curvature_figures" if quick else FIGURES
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fig.savefig(path, dpi=100, bbox_inches="tight")
    size = path.stat().st_size
    if size > MAX_FIGURE_BYTES:
        warnings.warn(f"{path} is {size / 1e3:.0f} kB, over the 150 kB budget", stacklevel=2)
    return path


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies inside it (the repository
    root, where the scripts are run from), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run_header(title: str, quick: bool, seconds: float) -> str:
    """The lines a script prints above its table."""
    mode = "quick smoke run (--quick)" if quick else "full run"
    return f"## {title}\n\n{machine()}; {mode}; wall time {seconds:.0f} s.\n"


__all__ = [
    "EdgeSummary",
    "LossRecorder",
    "Run",
    "accuracy",
    "configure_torch",
    "edge_summary",
    "first_step_at_or_above",
    "machine",
    "markdown_table",
    "run_header",
    "save_figure",
    "shown",
    "tail_stats",
    "train",
]
