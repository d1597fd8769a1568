"""The engine on one GPU: product cost eager and compiled, a track point and a full
measurement on a ResNet-18-sized CNN and a GPT-2-small-sized transformer, peak memory, and
the host syncs inside the estimator loops.

Run from the repository root on a machine with a GPU (under 4 minutes on one H100-class
device)::

    python benchmarks/bench_gpu.py                       # the run for RESULTS.md
    python benchmarks/bench_gpu.py --device cpu --quick  # a smoke run of the same code

Models (synthetic inputs: the cost of a product does not depend on the data's meaning):

* a ResNet-18-sized CNN (BasicBlocks [2, 2, 2, 2], widths 64-512, BatchNorm in train mode,
  11.2M parameters) on 3×32×32 images, batch 128, cross-entropy over 10 classes;
* a GPT-2-small-sized decoder (width 768, 12 heads, depth reduced to 4 blocks, byte
  vocabulary) at sequence length 256, batch 8, next-token cross-entropy.

For each: one gradient, one Hessian-vector product (``reuse_graph``, the default) and the
same product through ``torch.func`` (forward-over-reverse) eager and under
``torch.compile``, all in eval mode (torch.func cannot run BatchNorm's running-statistics
update) and on the math attention kernel (fused ones have no forward-mode AD); then one
full measurement (top 5, trace) and one warm track point
(λmax, directional and batch sharpness) through the monitor's own ``Measurer``, with their
products, seconds and peak memory. Syncs are counted by ``torch.cuda.set_sync_debug_mode
("warn")`` around the estimator calls: each warning is one host sync.
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_curvature import HessianOperator
from lightning_curvature.demo import CharTransformer
from lightning_curvature.measure.module import Context
from lightning_curvature.measure.tiers import MeasureSettings
from lightning_curvature.monitor.measurer import Measurer


class BasicBlock(nn.Module):
    def __init__(self, width_in: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.skip = nn.Sequential()
        if stride != 1 or width_in != width:
            self.skip = nn.Sequential(
                nn.Conv2d(width_in, width, 1, stride, bias=False), nn.BatchNorm2d(width)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


def resnet18(classes: int = 10, base: int = 64) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base)]
    layers.append(nn.ReLU())
    width_in = base
    for stage, width in enumerate((base, 2 * base, 4 * base, 8 * base)):
        for block in range(2):
            stride = 2 if stage and not block else 1
            layers.append(BasicBlock(width_in, width, stride))
            width_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width_in, classes)]
    return nn.Sequential(*layers)


def image_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def token_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    logits = model(batch[0])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))


def cases(device: torch.device, quick: bool) -> list[tuple[str, nn.Module, Any, Any]]:
    generator = torch.Generator().manual_seed(0)
    batch, width, depth, length = (16, 16, 2, 64) if quick else (128, 768, 4, 256)
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    cnn = resnet18(base=16 if quick else 64)
    tokens = torch.randint(0, 256, (8, length + 1), generator=generator)
    heads = 4 if quick else 12
    lm = CharTransformer(context=length, width=width, heads=heads, num_layers=depth)
    text = (tokens[:, :-1], tokens[:, 1:])
    return [
        (f"ResNet-18-sized CNN, batch {batch}", cnn, (images, labels), image_loss),
        (f"GPT-2-small-sized decoder ({depth} blocks), seq {length}", lm, text, token_loss),
    ]


def synchronized(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Any, device: torch.device, repeats: int) -> float:
    function()  # warm-up (and compilation)
    synchronized(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        synchronized(device)
        best = min(best, time.perf_counter() - started)
    return best


def product_costs(model: nn.Module, batch: Any, loss_fn: Any, device: torch.device, repeats: int):
    """Seconds of a gradient and of one product each way, in eval mode: torch.func cannot
    run BatchNorm's in-place running-statistics update, so all rows skip it alike."""
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH):  # forward-mode AD has no fused attention kernel
            return _product_costs(model, batch, loss_fn, device, repeats)
    finally:
        model.train()


def _product_costs(model: nn.Module, batch: Any, loss_fn: Any, device: torch.device, repeats: int):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    gradient = timed(
        lambda: torch.autograd.grad(loss_fn(model, batch), list(params.values())), device, repeats
    )
    op = HessianOperator(model, loss_fn, [batch], verify=False)
    v = torch.randn(op.dim, device=device)
    op.matvec(v)  # the graph, once
    reuse = timed(lambda: op.matvec(v), device, repeats)
    op.release()
    buffers = dict(model.named_buffers())
    tangents = tuple(
        t.view_as(p)
        for t, p in zip(
            torch.split(v, [p.numel() for p in params.values()]), params.values(), strict=True
        )
    )

    def loss_at(*values: torch.Tensor) -> torch.Tensor:
        named = dict(zip(params, values, strict=True)) | buffers
        return loss_fn(lambda x: torch.func.functional_call(model, named, (x,)), batch)

    def hvp() -> Any:
        grad = torch.func.grad(loss_at, argnums=tuple(range(len(params))))
        return torch.func.jvp(grad, tuple(p.detach() for p in params.values()), tangents)[1]

    rows = {"gradient": gradient, "reuse_graph": reuse}
    try:
        rows["forward_over_reverse"] = timed(hvp, device, repeats)
        compiled = torch.compile(hvp)
        rows["forward_over_reverse, compiled"] = timed(compiled, device, repeats)
    except Exception as error:  # report, do not hide: a compile failure is a result
        print(f"  torch.func / compile failed: {type(error).__name__}: {str(error)[:200]}")
    return rows


def measurements(model: nn.Module, batch: Any, loss_fn: Any, device: torch.device):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    context = Context(module=model, loss_fn=loss_fn, param_names=names)
    measurer = Measurer(context, MeasureSettings(k=5, tol=1e-3, num_probes=10))
    results = {}
    for step, tier in ((1, "full"), (2, "track")):
        measurer.before_measured_step(step - 1)
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronized(device)
        with warnings.catch_warnings(record=True) as syncs:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            started = time.perf_counter()
            try:
                outcome = measurer.measure(
                    [batch], step, tier, optimizers=[optimizer], lr_schedulers=[]
                )
                synchronized(device)
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        seconds = time.perf_counter() - started
        peak = (
            torch.cuda.max_memory_allocated(device) / 2**20
            if device.type == "cuda"
            else float("nan")
        )
        counted = sum("synchroniz" in str(w.message) for w in syncs)
        results[tier] = (seconds, outcome.record.num_matvecs, peak, counted)
    return results


PRODUCT_ROWS = ("reuse_graph", "forward_over_reverse", "forward_over_reverse, compiled")


def cost_cell(costs: dict[str, float], key: str) -> str:
    if key not in costs:
        return "failed"
    return f"{1e3 * costs[key]:.1f} ({costs[key] / costs['gradient']:.2f}×)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small models, a smoke run")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Device: {name}; torch {torch.__version__}\n")
    print(
        "| model | params | gradient ms | HVP reuse_graph ms (× grad) | fwd-over-rev eager ms "
        "(×) | compiled ms (×) | full: s, products, peak MiB, syncs | track: s, products, "
        "peak MiB, syncs |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for label, model, batch, loss_fn in cases(device, args.quick):
        model = model.to(device)
        batch = tuple(t.to(device) for t in batch)
        params = sum(p.numel() for p in model.parameters())
        costs = product_costs(model, batch, loss_fn, device, repeats=2 if args.quick else 5)
        measured = measurements(model, batch, loss_fn, device)
        cells = [cost_cell(costs, key) for key in PRODUCT_ROWS]
        cells += [f"{s:.2f} s, {n}, {peak:.0f}, {syncs}" for s, n, peak, syncs in measured.values()]
        head = f"| {label} | {params / 1e6:.1f}M | {1e3 * costs['gradient']:.1f} | "
        print(head + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
