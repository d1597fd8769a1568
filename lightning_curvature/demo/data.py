"""The demo's data: scikit-learn's 8x8 handwritten digits as a LightningDataModule."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.nn import functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from lightning_curvature._checks import check_choice
from lightning_curvature._lightning import pl

Targets = Literal["class", "onehot"]

NUM_FEATURES = 64  # 8x8 pixels
NUM_CLASSES = 10


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
        check_choice("targets", targets, ("class", "onehot"))
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
