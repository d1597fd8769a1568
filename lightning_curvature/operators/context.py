"""How an operator evaluates a model without disturbing it.

Every forward pass inside a curvature product runs differentiable, in full precision, with
the math attention kernel (fused kernels have no double backward), on its own seeded RNG
stream (so a dropout mask is the same for every product and the global streams do not
move), and on private copies of the buffers (BatchNorm in train mode updates clones, and
the running statistics are never touched).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# Seed for the RNG inside the operator's forward passes: dropout masks (if the model is in
# train mode) are the same for every product, so the operator is one fixed matrix.
FORWARD_SEED = 20_210_226


@contextmanager
def isolated_evaluation(model: nn.Module, device: torch.device, batch_index: int) -> Iterator[None]:
    """Run ``model`` as an operator must (see the module docstring); ``batch_index`` picks
    the RNG stream, so each probe batch has its own fixed dropout mask."""
    cuda = device.type == "cuda"
    with ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device.type, enabled=False))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        cuda_ids = [device.index if device.index is not None else 0] if cuda else []
        stack.enter_context(torch.random.fork_rng(devices=cuda_ids))
        torch.random.default_generator.manual_seed(FORWARD_SEED + batch_index)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(FORWARD_SEED + batch_index)
        stack.enter_context(private_buffers(model))
        yield


@contextmanager
def private_buffers(model: nn.Module) -> Iterator[None]:
    """Let the forward pass mutate clones of the buffers (BatchNorm running statistics in
    train mode), then put the originals back untouched. Swapping, not copying back, leaves
    the originals' version counters alone, so graphs that saved them stay valid."""
    originals = []
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                originals.append((module, name, buffer))
                module._buffers[name] = buffer.clone()
    try:
        yield
    finally:
        for module, name, buffer in originals:
            module._buffers[name] = buffer
