"""A character-level corpus that ships with every Python: the standard library's own source.

The text is the top-level ``.py`` files of the running interpreter's standard library, in
sorted order, cut at ``max_chars``; it is encoded as UTF-8 bytes, so the vocabulary is the
256 byte values (the source is nearly all ASCII) and no tokenizer is needed. The same
Python gives the same text; another Python version gives another (similar) one.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_curvature._lightning import pl

VOCAB_SIZE = 256  # bytes


def stdlib_text(max_chars: int = 1_000_000) -> bytes:
    """The first ``max_chars`` bytes of the standard library's top-level sources, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_chars:
            break
    text = b"".join(chunks)[:max_chars]
    if len(text) < 10_000:
        raise RuntimeError(f"the standard library at {root} holds too little source text")
    return text


class _Windows(Dataset):
    """Non-overlapping windows of ``context + 1`` bytes: inputs and next-byte targets."""

    def __init__(self, ids: torch.Tensor, context: int) -> None:
        self.ids, self.context = ids, context

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.context

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.context
        window = self.ids[start : start + self.context + 1]
        return window[:-1], window[1:]


class StdlibTextDataModule(pl.LightningDataModule):
    """Byte-level language modelling on :func:`stdlib_text`: the first 90% to train on,
    the rest to validate, in windows of ``context`` bytes.

    Args:
        context: the window length (tokens per sequence).
        batch_size: sequences per batch.
        max_chars: how much of the standard library to use.
        seed: the order in which training windows are shuffled.
    """

    def __init__(
        self, context: int = 64, batch_size: int = 32, max_chars: int = 500_000, seed: int = 0
    ) -> None:
        super().__init__()
        for name, value in (("context", context), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 10_000:
            raise ValueError(f"max_chars must be an integer >= 10000, got {max_chars!r}")
        self.save_hyperparameters()
        self.context, self.batch_size, self.max_chars, self.seed = (
            context,
            batch_size,
            max_chars,
            seed,
        )

    def setup(self, stage: str | None = None) -> None:
        ids = torch.frombuffer(bytearray(stdlib_text(self.max_chars)), dtype=torch.uint8).long()
        split = int(0.9 * len(ids))
        self.train_set = _Windows(ids[:split], self.context)
        self.val_set = _Windows(ids[split:], self.context)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
