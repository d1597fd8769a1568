"""``lightning-curvature analyze``: the curvature of a saved model, measured with the same
operator, estimators and tags as :class:`~lightning_curvature.CurvatureMonitor`, printed as a
table and written as ``summary.json``, ``spectrum.png`` and a TensorBoard run.

The matrix is the Hessian, the GGN or the Fisher (:mod:`.curvature_choice`); ``--per-layer``
adds each layer's trace and λmax (:mod:`.per_layer`) and ``--solve`` a damped Newton step
(:mod:`.newton`). What it writes and prints is :mod:`.report`'s."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_curvature.cli import curvature_choice, loading, newton, per_layer, report, sharded
from lightning_curvature.cli._shared import (
    DEMO_DATA,
    DEMO_MODEL,
    FAILED,
    PROG,
    CliError,
    fraction,
    int_at_least,
    one_line,
    positive,
)
from lightning_curvature.operators.base import OperatorWrapper


def add_parser(commands: Any) -> None:
    """Add ``analyze`` to the subcommands of the main parser."""
    analyze = commands.add_parser(
        "analyze",
        help="measure the Hessian (or GGN, Fisher) of a saved model: λmax, top-k, λmin, "
        "trace, density, per-layer numbers, a Newton step",
        description="Load a Lightning checkpoint into a LightningModule class, take batches "
        "from a LightningDataModule's train_dataloader, and measure the Hessian of the mean "
        "training_step loss over them (or, with --curvature, the GGN or the Fisher) with "
        "the estimators CurvatureMonitor uses. Prints a table and writes summary.json, "
        "spectrum.png and a TensorBoard run (the monitor's tags) into --out. --per-layer "
        "adds each layer's trace and λmax; --solve a damped Newton step. Class paths are "
        "imported from the working directory too. Checkpoints are unpickled: analyze only "
        "files you trust.",
    )
    analyze.add_argument("checkpoint", type=Path, help="a .ckpt file saved by Lightning")
    analyze.add_argument(
        "--model",
        required=True,
        metavar="CLASS_PATH",
        help=f"the LightningModule class of the checkpoint, e.g. {DEMO_MODEL}",
    )
    data = analyze.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--data",
        metavar="CLASS_PATH",
        help="a LightningDataModule class; built from the checkpoint's datamodule "
        "hyper-parameters when it has them, else with its defaults",
    )
    data.add_argument("--demo-data", action="store_true", help=f"the demo's digits ({DEMO_DATA})")
    analyze.add_argument(
        "--num-batches",
        type=int_at_least(1),
        default=1,
        help="training batches the Hessian is averaged over (default 1)",
    )
    analyze.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=None,
        help="passed to the data module as batch_size (default: its own)",
    )
    analyze.add_argument(
        "--k", type=int_at_least(1), default=5, help="top eigenvalues to report (default 5)"
    )
    analyze.add_argument(
        "--tol", type=fraction, default=1e-4, help="relative eigenvalue accuracy (default 1e-4)"
    )
    analyze.add_argument(
        "--num-probes",
        type=int_at_least(2),
        default=30,
        help="Hutchinson probes for the trace (default 30)",
    )
    curvature_choice.add_arguments(analyze)
    per_layer.add_arguments(analyze)
    newton.add_arguments(analyze)
    analyze.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: runs/analyze/<checkpoint name>, or _2, _3, ... "
        "when that exists)",
    )
    analyze.add_argument(
        "--seed",
        type=int_at_least(0),
        default=0,
        help="seeds the batch sampling and the estimators (default 0)",
    )
    analyze.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the products run (default cpu)",
    )
    analyze.add_argument(
        "--threads",
        type=int_at_least(1),
        default=None,
        help="CPU threads for PyTorch (default: its own choice; 1 is often fastest for "
        "small models on a busy machine)",
    )
    analyze.add_argument(
        "--memory-budget-mb",
        type=positive,
        default=None,
        help="at most this much memory for the estimators' vectors: every Krylov basis is "
        "capped to fit, or analyze refuses, saying what fits (default: no bound)",
    )
    analyze.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    analyze.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Measure the checkpoint that ``args`` names; return the exit status (0, or 1 when the
    measurement itself fails)."""
    curvature_choice.check_arguments(args)
    device = loading.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if sharded.world_size() > 1:  # under torchrun: the model sharded over the processes
        sharded.check_arguments(args)
        with sharded.process_group(device):
            return _run(args, device, shard=True)
    return _run(args, device, shard=False)


def _run(args: argparse.Namespace, device: torch.device, shard: bool) -> int:
    loaded = loading.load(args, device)
    matrix = curvature_choice.describe(args)
    _check_outputs(args, loaded)  # bad input: a CliError (exit 2), not a failed measurement
    stability = None
    if shard:  # the optimizer's state is read whole, then sliced as the parameters are
        stability = _stability(loaded.model, loaded.checkpoint, list(loaded.model.parameters()))
        shapes = [p.shape for p in loaded.model.parameters()]
        if stability[1] is not None:
            stability = (stability[0], sharded.shard_flat(stability[1], shapes), stability[2])
        sharded.shard(loaded.model, device)
        loaded.batches = sharded.my_batches(loaded.batches)
        args.no_progress = args.no_progress or not sharded.is_writer()
    try:
        measured = _measure(args, loaded, stability)
    except CliError:  # a memory bound refused up front is bad input, as the rest
        raise
    except Exception as error:  # the model's own code ran: report it, not a traceback
        print(
            f"{PROG}: error: measuring the {matrix} failed: {type(error).__name__}: "
            f"{one_line(error)}",
            file=sys.stderr,
        )
        return FAILED
    if shard and not sharded.is_writer():
        return 0  # process 0 writes and prints
    record = measured.record
    summary = _summary(args, loaded, measured, matrix, device)
    report.write_outputs(loaded.out, record, summary, loaded.step)
    printed = [report.table(record, summary)]
    if args.per_layer:
        printed.append(per_layer.table(measured.extras["per_layer"]))
    if args.solve:
        torch.save(measured.newton_x.cpu(), loaded.out / "newton_step.pt")
        printed.append(newton.table(measured.extras["newton_step"], matrix))
    print("\n\n".join(printed))
    print()
    saved = ", newton_step.pt" if args.solve else ""
    out = loaded.out
    print(f"Wrote {out / 'summary.json'}, {out / 'spectrum.png'}{saved} and a TensorBoard run:")
    print(f"  tensorboard --logdir {shlex.quote(str(out))}")
    return 0


@dataclass
class _Measured:
    """What the measurement gave: the record, the extras (per-layer, Newton step) and the
    facts the summary states."""

    record: Any
    extras: dict[str, Any]
    num_parameters: int
    stability_note: str
    newton_x: Any = None


def _check_outputs(args: argparse.Namespace, loaded: loading.Loaded) -> None:
    """The model's outputs fit the loss asked for (a GGN's or Fisher's), in train mode."""
    from lightning_curvature.measure.objective import measurement_mode, muted_logging

    loaded.model.train()
    with measurement_mode(loaded.model, "train"), muted_logging(loaded.model):
        curvature_choice.check_outputs(args, loaded.model, loaded.batches)


def _measure(
    args: argparse.Namespace, loaded: loading.Loaded, stability: tuple[Any, Any, str] | None
) -> _Measured:
    """Measure as the monitor does by default: the training objective (normalization
    layers on batch statistics, their running statistics untouched; dropout off).
    ``stability``: the optimizer's rule, P and note when already read (sharded: whole)."""
    from lightning_curvature._shards import local_part
    from lightning_curvature.measure.objective import (
        measurement_mode,
        muted_logging,
        training_step_loss,
    )
    from lightning_curvature.measure.tiers import MeasureSettings, measure
    from lightning_curvature.monitor.measurer import bounded
    from lightning_curvature.operators.sharded import ShardedHessianOperator

    model, batches = loaded.model, loaded.batches
    settings = MeasureSettings(
        k=args.k,
        tol=args.tol,
        num_probes=args.num_probes,
        density=True,
        lambda_min=not curvature_choice.is_positive_semidefinite(args),
        seed=args.seed,
    )
    trainable = [local_part(p) for p in model.parameters() if p.requires_grad]
    itemsize = max(4, max(p.dtype.itemsize for p in trainable))  # measured in float32 at least
    dim = sum(p.numel() for p in trainable)
    budget = args.memory_budget_mb
    settings, refusal = bounded(settings, dim, itemsize, budget, "--memory-budget-mb")
    if refusal is not None:  # a bound is kept or refused before any product
        raise CliError(refusal)
    with measurement_mode(model, "train"), muted_logging(model), _progress(args) as counted:
        op = (
            ShardedHessianOperator(model, training_step_loss, batches)
            if stability is not None
            else curvature_choice.build_operator(args, model, batches)
        )
        with op:  # releases the kept graph however the measurement ends
            rule, preconditioner, note = stability or _stability(
                model, loaded.checkpoint, op.params
            )
            blocks = per_layer.layer_blocks(op) if args.per_layer else None
            record, _ = measure(
                counted(op),
                loaded.step,
                settings,
                rule=rule,
                preconditioner=preconditioner,
                curvature=args.curvature,
                blocks=blocks,
            )
            measured = _Measured(record, {}, op.total_dim, note)
            if blocks:
                measured.extras["per_layer"] = per_layer.layer_report(
                    record, blocks, args.num_probes
                )
            if args.solve:
                gradient = curvature_choice.mean_gradient(op, model, batches)
                measured.extras["newton_step"], measured.newton_x = newton.newton_step(
                    counted(op),
                    gradient,
                    damping=args.damping,
                    tol=args.solve_tol,
                    max_iters=args.solve_max_iters,
                )
    return measured


def _summary(
    args: argparse.Namespace,
    loaded: loading.Loaded,
    measured: _Measured,
    matrix: str,
    device: torch.device,
) -> dict[str, Any]:
    """summary.json: what was measured, how, and the record."""
    record = measured.record
    summary = {
        "checkpoint": str(args.checkpoint),
        "model": args.model,
        "data": loaded.data_description,
        "curvature": args.curvature,
        "matrix": matrix,
        "num_batches": len(loaded.batches),
        "num_parameters": measured.num_parameters,
        "global_step": loaded.step,
        "stability": measured.stability_note,
        "settings": {
            "k": args.k,
            "tol": args.tol,
            "num_probes": args.num_probes,
            "seed": args.seed,
            "device": str(device),
            "loss": args.loss,
            "fisher_kind": (args.fisher_kind or "true") if args.curvature == "fisher" else None,
        },
        "measurement": record.to_json(),
        **measured.extras,
    }
    if curvature_choice.is_positive_semidefinite(args):
        summary["lambda_min_skipped"] = _psd_note(matrix)
        if record.sharpness_x_lr is not None:  # the rule is stated for the Hessian
            summary["stability"] += f" (applied to the {matrix}'s λmax, not the Hessian's)"
    return summary


def _psd_note(matrix: str) -> str:
    return f"the {matrix} is positive semi-definite (λmin ≥ 0): λmin not measured"


def _stability(
    model: Any, checkpoint: dict[str, Any], params: Sequence[torch.Tensor]
) -> tuple[Any, torch.Tensor | None, str]:
    """The stability rule of the optimizer that trained the model, rebuilt from the module's
    ``configure_optimizers`` and the checkpoint's optimizer state, when both allow it."""
    from lightning_curvature.optim.preconditioners import optimizer_view

    states = checkpoint.get("optimizer_states") or []
    if not states:
        return None, None, "no optimizer state in the checkpoint"
    try:
        optimizer = _first_optimizer(model.configure_optimizers())
        optimizer.load_state_dict(states[0])
        view = optimizer_view([optimizer], params)
    except Exception as error:
        return None, None, f"optimizer not rebuilt ({type(error).__name__}: {one_line(error)})"
    if view.rule is None:
        return None, None, "the rebuilt optimizer does not update the measured parameters"
    return view.rule, view.preconditioner, view.rule.note


def _first_optimizer(configured: Any) -> torch.optim.Optimizer:
    """The first optimizer in whatever ``configure_optimizers`` returned."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict):
        return _first_optimizer(configured["optimizer"])
    if isinstance(configured, (list, tuple)) and configured:
        return _first_optimizer(configured[0])
    raise TypeError(f"configure_optimizers returned {type(configured).__name__}")


class _ProgressOperator(OperatorWrapper):
    """An operator that advances a progress bar with every product it passes on."""

    def __init__(self, inner: Any, bar: Any) -> None:
        super().__init__(inner)
        self.bar = bar

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        self.bar.update(block.shape[1])
        return self.inner.matmat(block)


@contextmanager
def _progress(args: argparse.Namespace) -> Iterator[Callable[[Any], _ProgressOperator]]:
    """A tqdm counter of matrix-vector products (their number depends on convergence, so
    it has no total). Yields a function that wraps an operator to count its products."""
    from tqdm.auto import tqdm

    bar = tqdm(desc="curvature products", unit="product", disable=args.no_progress, leave=False)
    try:
        yield lambda op: _ProgressOperator(op, bar)
    finally:
        bar.close()
