"""How an operator evaluates a model without disturbing it.

Every forward pass inside a curvature product runs differentiable, in full precision, with
the math attention kernel (fused kernels have no double backward), with cuDNN off when the
model holds an RNN (cuDNN's RNNs have no double backward; everything else keeps cuDNN), with
``torch.compile``d submodules run eagerly (compiled graphs have no double backward), on its
own seeded RNG stream (so a dropout mask is the same for every product and the global streams
do not move), and on private copies of the buffers (BatchNorm in train mode updates clones,
and the running statistics are never touched).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# Seed for the RNG inside the operator's forward passes: dropout masks (if the model is in
# train mode) are the same for every product, so the operator is one fixed matrix.
FORWARD_SEED = 20_210_226


@contextmanager
def isolated_evaluation(
    model: nn.Module, device: torch.device, batch_index: int, *, disable_cudnn: bool = False
) -> Iterator[None]:
    """Run ``model`` as an operator must (see the module docstring); ``batch_index`` picks
    the RNG stream, so each probe batch has its own fixed dropout mask; ``disable_cudnn``
    for models with an RNN (:func:`holds_rnn`)."""
    cuda = device.type == "cuda"
    with ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device.type, enabled=False))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if disable_cudnn:
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        stack.enter_context(eager_submodules(model))
        cuda_ids = [device.index if device.index is not None else 0] if cuda else []
        stack.enter_context(torch.random.fork_rng(devices=cuda_ids))
        torch.default_generator.manual_seed(FORWARD_SEED + batch_index)
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


def holds_rnn(model: nn.Module) -> bool:
    """Whether ``model`` holds a recurrent layer (whose cuDNN kernels lack double backward)."""
    return any(isinstance(module, nn.RNNBase) for module in model.modules())


def eager(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile``d one wraps (the module itself otherwise)."""
    while is_compiled(module):
        module = module._orig_mod  # type: ignore[assignment]
    return module


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper (``OptimizedModule``)."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # nothing is compiled without it
    return dynamo is not None and isinstance(module, dynamo.OptimizedModule)


@contextmanager
def eager_submodules(model: nn.Module) -> Iterator[None]:
    """Swap every ``torch.compile``d submodule for the module it wraps, and back after.

    The parameters are the same tensors, so gradients reach them as before; only the
    compiled graph, which has no double backward, is bypassed."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in parent._modules.items():
            if child is not None and is_compiled(child):
                swapped.append((parent, name, child))
    for parent, name, child in swapped:
        parent._modules[name] = eager(child)
    try:
        yield
    finally:
        for parent, name, child in swapped:
            parent._modules[name] = child


def empty_cache(device: torch.device) -> None:
    """Give cached accelerator memory back (after an out-of-memory error)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
