"""What the callback reads off a step: the loss ``training_step`` returned, read without
stalling an accelerator (one step late there, at once on a CPU)."""

from __future__ import annotations

import pytest
import torch

from lightning_curvature._trainer import LossReader, step_loss


def test_the_step_loss_is_the_tensor_or_the_mappings_loss_and_nothing_else():
    loss = torch.tensor(2.5, requires_grad=True)
    assert step_loss(loss) is loss
    assert float(step_loss({"loss": loss, "extra": 1})) == 2.5
    assert LossReader().read(step_loss(loss)) == 2.5  # read, never differentiated
    assert step_loss(None) is None and step_loss({}) is None
    assert step_loss(torch.ones(3)) is None  # not a scalar: not a loss


def test_on_a_cpu_the_loss_is_read_at_once():
    reader = LossReader()
    assert reader.read(torch.tensor(1.5)) == 1.5
    assert reader.read(None) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_loss_is_read_one_step_late_without_a_sync():
    reader = LossReader()
    losses = [torch.tensor(float(i), device="cuda") for i in range(1, 5)]
    read = [reader.read(loss) for loss in losses]
    torch.cuda.synchronize()
    assert read[0] is None  # nothing was ready before the first step
    # Each later read is the previous step's loss once its copy landed (None if not yet).
    assert all(value in (None, float(i)) for i, value in enumerate(read[1:], start=1))
    assert reader.read(torch.tensor(9.0, device="cuda")) == 4.0
