"""Scaling benchmark: what one curvature measurement costs as models and batches grow.

Run from the repository root (after ``pip install -e ".[bench]"``)::

    python benchmarks/bench_scaling.py                 # the full run recorded in SCALING.md
    python benchmarks/bench_scaling.py --quick         # a smoke run (tiny sizes, < 1 minute)
    python benchmarks/bench_scaling.py --device cuda   # the same on a GPU

Each configuration runs in a fresh process (forked from a server that has imported torch
once). There we time, side by side, one gradient step (forward + backward of the same loss
on the same batch, returning the gradients), one Hessian-vector product (steady state: the
first-order graph already built) and one full measurement as the training callback runs it:
``measure(HessianOperator(model, loss_fn, [batch]), ...)`` with ``CurvatureMonitor``'s
defaults (top-5 by Lanczos, trace by Hutchinson), read from callback.py so the two cannot
drift. Gradients and matvecs are medians of repeats after a warm-up; measurements (each
builds its own operator and graph, as the callback does) the median of up to three, as a
time budget allows; the gradient is timed before and after them and its median is the
unit of every ratio. The machine is shared: a row whose process saw contention (a small
probe product slowed down, or the gradient changed by 2× between before and after) is run
again, and a row that stays contended is marked.

Peak memory is the peak of tensor bytes allocated during one gradient step and during one
measurement, above what existed before (model, batch): ``torch.cuda.max_memory_allocated``
on CUDA, the CPU allocator's running total in the profiler's memory events on the CPU (see
:func:`peak_tensor_bytes`). The Lanczos basis is also given analytically: steps × params ×
4 bytes used, and the ``30 + 10k`` rows allocated up front.

Models (random initialisation, cross-entropy over 10 classes, eval mode as the monitor's
default ``mode="eval"``): tanh MLPs on 64 features, ReLU CNNs on 3×16×16 images, and
``nn.TransformerEncoderLayer`` stacks (batch_first, GELU, 4 heads, no dropout) classifying
sequences of 32 random tokens by the sum of their tokens mod 10. Inputs are random and
seeded, generated on the host and moved to the device once.

The printout is markdown; SCALING.md records it with the machine named.
"""

from __future__ import annotations

import argparse
import ast
import gc
import itertools
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
from bench_engine import machine, timed  # noqa: E402

import lightning_curvature as lc  # noqa: E402
from lightning_curvature.estimators.lanczos import default_num_iters  # noqa: E402
from lightning_curvature.measure.tiers import MeasureSettings, measure  # noqa: E402

CRITERION = nn.CrossEntropyLoss()
MIB = 2**20


def loss_fn(model, batch):
    return CRITERION(model(batch[0]), batch[1])


def monitor_settings() -> MeasureSettings:
    """``CurvatureMonitor``'s default settings, read from callback.py's source (importing
    the callback would import Lightning, seconds per process)."""
    source = (BENCHMARKS.parent / "lightning_curvature" / "callback.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == "CurvatureMonitor":
            init = next(n for n in node.body if getattr(n, "name", None) == "__init__")
            arguments = init.args.args[-len(init.args.defaults) :]
            defaults = {
                a.arg: ast.literal_eval(d)
                for a, d in zip(arguments, init.args.defaults, strict=True)
                if isinstance(d, ast.Constant)
            }
            return MeasureSettings(
                k=defaults["k"],
                tol=defaults["tol"],
                trace=defaults["trace"],
                num_probes=defaults["num_probes"],
                seed=defaults["seed"],
            )
    raise RuntimeError("CurvatureMonitor not found in callback.py")


# ----------------------------------------------------------------------------- models


class TokenClassifier(nn.Module):
    """Token and position embeddings, encoder layers, mean pooling, a linear head."""

    def __init__(self, d_model: int, layers: int, vocab: int = 64, seq: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(0.02 * torch.randn(seq, d_model))
        self.encoder = nn.Sequential(
            *(
                nn.TransformerEncoderLayer(
                    d_model,
                    nhead=4,
                    dim_feedforward=4 * d_model,
                    dropout=0.0,
                    activation="gelu",
                    batch_first=True,
                )
                for _ in range(layers)
            )
        )
        self.head = nn.Linear(d_model, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(tokens) + self.position)
        return self.head(hidden.mean(dim=1))


def build(config: dict, device: torch.device) -> tuple[nn.Module, tuple]:
    """The model (eval mode, on ``device``) and one batch (on ``device``)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    family, batch = config["family"], config["batch"]
    if family == "MLP":
        width, depth = config["width"], config["depth"]
        sizes = [64] + [width] * depth
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
        model = nn.Sequential(*layers, nn.Linear(width, 10))
        inputs = torch.randn(batch, 64, generator=generator)
        targets = torch.randint(0, 10, (batch,), generator=generator)
    elif family == "CNN":
        c = config["width"]
        model = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * c, 10),
        )
        inputs = torch.randn(batch, 3, 16, 16, generator=generator)
        targets = torch.randint(0, 10, (batch,), generator=generator)
    elif family == "Transformer":
        model = TokenClassifier(config["width"], config["depth"])
        inputs = torch.randint(0, 64, (batch, 32), generator=generator)
        targets = inputs.sum(dim=1) % 10
    else:
        raise ValueError(family)
    return model.to(device).eval(), (inputs.to(device), targets.to(device))


def describe(config: dict) -> str:
    if config["family"] == "MLP":
        return f"MLP 64→{config['width']}×{config['depth']}→10"
    if config["family"] == "CNN":
        c = config["width"]
        return f"CNN {c}-{2 * c}-{4 * c} ch"
    return f"Transformer d={config['width']}, {config['depth']} layers"


# ----------------------------------------------------------------------------- memory


def peak_tensor_bytes(function, device: torch.device) -> int:
    """Peak bytes of tensors allocated while ``function`` runs, above what existed before.

    On CUDA, ``torch.cuda.max_memory_allocated``. On the CPU, where torch keeps no allocator
    statistics, the profiler's memory events: with ``profile_memory=True`` the CPU allocator
    reports every allocation and free made inside the window with its running total
    ("Total Allocated"), whose maximum is the peak. This counts tensors only (not the
    interpreter, code pages or the allocator's cached free memory, which RSS would mix in),
    and it counts a tensor when it is allocated, touched or not: on a GPU, what can run out.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        function()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [
        e["args"]["Total Allocated"]
        for e in events
        if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})
    ]
    return max(totals, default=0)


# ----------------------------------------------------------------------------- one row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(threads: int) -> float:
    """Median seconds of a small multi-threaded matrix product: a contention detector. When
    other processes hold the cores, small multi-threaded ops wait whole scheduler ticks at
    every parallel barrier, and this number jumps tenfold or more."""
    torch.set_num_threads(threads)
    a = torch.randn(192, 192, generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(40):
        started = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_row(config: dict) -> dict:
    """Run in a fresh child process: the gradient, one matvec and full measurements timed side
    by side, the gradient timed again after them, then each one's peak memory."""
    torch.set_num_threads(config["threads"])
    probe_before = probe(config["threads"])
    device = torch.device(config["device"])
    model, batch = build(config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    settings = config["settings"]

    def gradient():
        grads = torch.autograd.grad(loss_fn(model, batch), params)
        _sync(device)
        return grads

    def one_measurement():
        started = time.perf_counter()
        record, vectors = measure(lc.HessianOperator(model, loss_fn, [batch]), 0, settings)
        _sync(device)
        del vectors
        return record, time.perf_counter() - started

    gradient_before, _ = timed(gradient, config["gradient_repeats"])
    op = lc.HessianOperator(model, loss_fn, [batch])
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(2)).to(device)

    def matvec():
        out = op.matvec(v)
        _sync(device)
        return out

    matvec_seconds, _ = timed(matvec, config["matvec_repeats"])  # the warm-up builds the graph
    method = op.hvp_method
    op.release()  # frees the kept graph

    record, first = one_measurement()
    times = [first]
    while (
        len(times) < config["measure_repeats"]
        and sum(times) + times[-1] <= config["measure_budget_s"]
    ):
        record, seconds = one_measurement()
        times.append(seconds)
    gradient_after, _ = timed(gradient, config["gradient_repeats"])
    probe_after = probe(config["threads"])
    return {
        "params": sum(p.numel() for p in params),
        "gradient": statistics.median([gradient_before, gradient_after]),
        "gradient_drift": gradient_after / gradient_before,
        "matvec": matvec_seconds,
        "hvp_method": method,
        "measure": statistics.median(times),
        "measure_repeats": len(times),
        "matvecs": record.num_matvecs,
        "lanczos_matvecs": record.num_matvecs - (settings.num_probes if settings.trace else 0),
        "converged": record.converged,
        "lambda_max": record.lambda_max,
        "probe": max(probe_before, probe_after),
        "grad_peak": peak_tensor_bytes(gradient, device),
        "measure_peak": peak_tensor_bytes(one_measurement, device),
    }


def run_in_child(context, config: dict) -> dict:
    with context.Pool(1) as pool:
        return pool.apply(measure_row, (config,))


class Quiet:
    """Other processes share this machine's cores in bursts. A row is trusted when the
    contention probe, run at the start and at the end of its process, is within ``factor``
    of the quietest probe seen, and the gradient timed after the measurements is within
    ``factor`` of the one timed before; otherwise it is run again."""

    def __init__(self, threads: int, factor: float = 2.0, max_wait_s: float = 30.0) -> None:
        self.threads, self.factor, self.max_wait_s = threads, factor, max_wait_s
        self.best = min(probe(threads) for _ in range(5))
        self.retries = 0

    def wait(self) -> None:
        deadline = time.perf_counter() + self.max_wait_s
        while time.perf_counter() < deadline:
            now = probe(self.threads)
            self.best = min(self.best, now)
            if now <= self.factor * self.best:
                return
            time.sleep(1.0)

    def trusted(self, result: dict) -> bool:
        steady = 1 / self.factor <= result["gradient_drift"] <= self.factor
        return steady and result["probe"] <= self.factor * self.best


def run_config(context, config: dict, quiet: Quiet, attempts: int = 3) -> dict:
    """One row, rerun under contention (at most ``attempts`` times, or until
    ``retry_budget_s`` is spent), the quietest attempt kept."""
    tries, started = [], time.perf_counter()
    for _ in range(attempts):
        quiet.wait()
        tries.append(run_in_child(context, config))
        if quiet.trusted(tries[-1]) or time.perf_counter() - started > config["retry_budget_s"]:
            break
        quiet.retries += 1
    best = min(tries, key=lambda t: (not quiet.trusted(t), t["probe"]))
    return {**config, **best, "attempts": len(tries), "trusted": quiet.trusted(best)}


def _mib(n: float) -> str:
    return f"{n / MIB:,.1f}" if n < 100 * MIB else f"{n / MIB:,.0f}"


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n### {title}\n")
    print(
        "| model | params | batch | gradient ms | matvec ms | matvec ÷ grad | measurement s "
        "| matvecs | measurement ÷ grad | per matvec ÷ grad | peak MiB grad | peak MiB "
        "measurement | mem ÷ grad | Lanczos basis MiB, used / allocated |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["measure"] / r["gradient"]
        basis_used = r["lanczos_matvecs"] * r["params"] * 4
        basis_allocated = default_num_iters(r["settings"].k) * r["params"] * 4
        print(
            f"| {describe(r)}{'' if r['trusted'] else ' †'} | {r['params']:,} | {r['batch']} "
            f"| {r['gradient'] * 1e3:.2f} "
            f"| {r['matvec'] * 1e3:.2f} | {r['matvec'] / r['gradient']:.2f} "
            f"| {r['measure']:.3f} | {r['matvecs']}{'' if r['converged'] else '*'} "
            f"| {ratio:.0f} | {ratio / r['matvecs']:.2f} | {_mib(r['grad_peak'])} "
            f"| {_mib(r['measure_peak'])} | {r['measure_peak'] / max(r['grad_peak'], 1):.1f} "
            f"| {_mib(basis_used)} / {_mib(basis_allocated)} |"
        )


def slope(xs: list[float], ys: list[float]) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def print_slopes(title: str, rows: list[dict], x: str) -> dict:
    xs = [r[x] for r in rows]
    fits = {
        "measurement s": slope(xs, [r["measure"] for r in rows]),
        "measurement s per matvec": slope(xs, [r["measure"] / r["matvecs"] for r in rows]),
        "matvec s": slope(xs, [r["matvec"] for r in rows]),
        "gradient s": slope(xs, [r["gradient"] for r in rows]),
        "peak memory of the measurement": slope(xs, [max(r["measure_peak"], 1) for r in rows]),
    }
    print(
        f"- {title} (log-log slope against {x}, {xs[0]:,}–{xs[-1]:,}): "
        + "; ".join(f"{k} **{v:.2f}**" for k, v in fits.items())
    )
    return fits


def figure(path: Path, sweeps: dict[str, list[dict]], batch_rows: list[dict], label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.8), dpi=100)
    for (name, rows), color in zip(sweeps.items(), ("C0", "C1", "C2", "C3"), strict=False):
        xs = [r["params"] for r in rows]
        left.loglog(xs, [r["measure"] for r in rows], "o-", color=color, label=f"{name}")
        left.loglog(xs, [r["gradient"] for r in rows], "x:", color=color)
    xs = [r["batch"] for r in batch_rows]
    right.loglog(xs, [r["measure"] for r in batch_rows], "o-", color="C0", label="measurement")
    right.loglog(xs, [r["gradient"] for r in batch_rows], "x:", color="C0", label="gradient")
    for axis, xlabel in ((left, "parameters"), (right, "batch size")):
        lo, hi = axis.get_xlim()
        base = axis.get_ylim()[0] * 3
        axis.loglog([lo * 1.5, hi / 1.5], [base, base * (hi / lo) / 2.25], "k--", lw=0.8)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("seconds")
        axis.grid(True, which="major", alpha=0.3)
    left.set_title("measurement (o) and gradient (x); dashed: slope 1", fontsize=9)
    right.set_title(describe(batch_rows[0]) + ", by batch", fontsize=9)
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plan(quick: bool) -> tuple[dict[str, list[dict]], list[dict]]:
    """The size sweeps (fixed batch) and the batch sweep (fixed model)."""
    if quick:
        sweeps = {
            "MLP": [dict(family="MLP", width=w, depth=2, batch=64) for w in (32, 96)],
            "CNN": [dict(family="CNN", width=c, batch=16) for c in (4, 12)],
            "Transformer": [
                dict(family="Transformer", width=d, depth=1, batch=8) for d in (16, 32)
            ],
        }
        batch_sweep = [dict(family="MLP", width=64, depth=2, batch=b) for b in (16, 64)]
        return sweeps, batch_sweep
    sweeps = {
        "MLP (width)": [
            dict(family="MLP", width=w, depth=2, batch=128) for w in (64, 256, 1024, 2048, 2560)
        ],
        "MLP (depth)": [dict(family="MLP", width=256, depth=d, batch=128) for d in (2, 4, 8, 16)],
        "CNN": [dict(family="CNN", width=c, batch=32) for c in (10, 32, 104)],
        "Transformer": [
            dict(family="Transformer", width=d, depth=n, batch=16)
            for d, n in ((32, 1), (64, 2), (128, 4), (192, 4))
        ],
    }
    batch_sweep = [dict(family="MLP", width=512, depth=2, batch=b) for b in (32, 128, 512, 2048)]
    return sweeps, batch_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--figure", type=Path, default=None, help="write a log-log PNG here")
    parser.add_argument("--only", default=None, help="run only sweeps whose name has this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    settings = monitor_settings()
    common = dict(
        device=str(device),
        threads=args.threads,
        settings=settings,
        gradient_repeats=3 if args.quick else 7,
        matvec_repeats=3 if args.quick else 7,
        measure_repeats=1 if args.quick else 3,
        measure_budget_s=2.0 if args.quick else 15.0,
        retry_budget_s=10.0 if args.quick else 90.0,
    )
    # Children are forked from a server that has imported torch and the package once, so
    # each starts in well under a second and with a clean heap.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "lightning_curvature", "bench_engine"])

    started = time.perf_counter()
    quiet = Quiet(args.threads, max_wait_s=5.0 if args.quick else 30.0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {machine()}"
    print(f"Machine: {where}. Device: {device}.\n")
    print(
        f"Measurement = `measure(HessianOperator(model, loss_fn, [batch]), step, "
        f"MeasureSettings(k={settings.k}, tol={settings.tol:g}, trace={settings.trace}, "
        f"num_probes={settings.num_probes}, seed={settings.seed}))`, the CurvatureMonitor's "
        "defaults. Each row runs in a fresh process; times are medians of repeats; memory is "
        "the peak of tensor bytes allocated above the model and batch already in place "
        "(CUDA: `max_memory_allocated`; CPU: the allocator's running total in the profiler's "
        "memory events). "
        "`*` marks a measurement whose Lanczos did not converge within its "
        f"{default_num_iters(settings.k)} steps."
    )
    sweeps, batch_sweep = plan(args.quick)
    if args.only:
        sweeps = {k: v for k, v in sweeps.items() if args.only in k}
        batch_sweep = batch_sweep if "batch" in args.only else []
    results: dict[str, list[dict]] = {}
    for name, configs in sweeps.items():
        results[name] = [run_config(context, {**common, **c}, quiet) for c in configs]
        print_table(f"{name}: growing the model at a fixed batch", results[name])
        sys.stdout.flush()
    batch_rows = [run_config(context, {**common, **c}, quiet) for c in batch_sweep]
    if batch_rows:
        print_table(f"{describe(batch_rows[0])}: growing the batch", batch_rows)

    print("\n### Log-log slopes (1.00 = linear)\n")
    for name, rows in results.items():
        if len(rows) > 1:
            print_slopes(name, rows, "params")
    if len(batch_rows) > 1:
        print_slopes(f"{describe(batch_rows[0])}", batch_rows, "batch")
    everything = [r for rows in results.values() for r in rows] + batch_rows
    matvec_ratios = [r["matvec"] / r["gradient"] for r in everything]
    measure_ratios = [r["measure"] / r["gradient"] for r in everything]
    memory_ratios = [r["measure_peak"] / max(r["grad_peak"], 1) for r in everything]
    drift = [r["gradient_drift"] for r in everything]
    print(
        "\n### Summary\n\n"
        f"- one matvec ÷ one gradient: {min(matvec_ratios):.2f}–{max(matvec_ratios):.2f} "
        f"(median {statistics.median(matvec_ratios):.2f})\n"
        f"- one measurement ÷ one gradient: {min(measure_ratios):.0f}–{max(measure_ratios):.0f} "
        f"(median {statistics.median(measure_ratios):.0f}), for "
        f"{min(r['matvecs'] for r in everything)}–{max(r['matvecs'] for r in everything)} "
        "matvecs\n"
        f"- peak memory, measurement ÷ gradient step: {min(memory_ratios):.1f}–"
        f"{max(memory_ratios):.1f} (median {statistics.median(memory_ratios):.1f})\n"
        f"- gradient time after ÷ before the measurements in the same process (contention "
        f"check): {min(drift):.2f}–{max(drift):.2f}\n"
        f"- timings rerun because of contention: {quiet.retries}; rows still contended "
        f"after their retries (marked †): {sum(not r['trusted'] for r in everything)}\n"
        f"- products computed with: {sorted({r['hvp_method'] for r in everything})}\n"
        f"- wall time of this run: {time.perf_counter() - started:.0f} s"
    )
    if args.figure is not None and results and batch_rows:
        label = where if device.type == "cuda" else f"CPU, {args.threads} threads"
        figure(args.figure, results, batch_rows, f"{label}, torch {torch.__version__}")
        print(f"\nFigure: {args.figure}")


if __name__ == "__main__":
    main()
