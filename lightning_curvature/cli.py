"""The ``lightning-curvature`` command.

* ``lightning-curvature demo``: train a small MLP on scikit-learn's digits with
  :class:`~lightning_curvature.CurvatureMonitor` and write a TensorBoard run in which λmax
  rises (``--edge-of-stability``: full-batch gradient descent, where λmax·η climbs to 2
  and stays).
* ``lightning-curvature analyze CHECKPOINT --model CLASS_PATH (--data CLASS_PATH |
  --demo-data)``: measure the curvature of a saved model with the same operator, the same
  estimators and the same tags as the monitor, and write a JSON summary, a plot of the
  spectrum and a TensorBoard run.
* ``lightning-curvature fit --config configs/demo.yaml``: LightningCLI's ``fit``, for the
  YAML files in ``configs/``.

Bad input ends in a one-line error on stderr and exit status 2; a measurement that fails
on good input ends with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import shlex
import sys
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import torch

PROG = "lightning-curvature"
BAD_INPUT = 2
FAILED = 1
DEMO_MODEL = "lightning_curvature.demo.DigitsClassifier"
DEMO_DATA = "lightning_curvature.demo.DigitsDataModule"


class CliError(Exception):
    """Bad input: reported as one line on stderr (``PROG: error: message``), exit status 2."""

    def __init__(self, message: str, prog: str = PROG) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) and never exits the process:
    :func:`main` turns it into a return code, so tests and callers can use ``main([...])``."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see {self.prog} --help)", prog=self.prog)


# ---------------------------------------------------------------------------- arguments


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-curvature`` and its subcommands."""
    parser = _Parser(
        prog=PROG,
        description="Loss-curvature monitoring for PyTorch Lightning: a demo run, offline "
        "analysis of checkpoints, and LightningCLI training from YAML configs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a small MLP on digits with CurvatureMonitor and write a TensorBoard run",
        description="Train a small MLP on scikit-learn's digits with CurvatureMonitor at its "
        "defaults and a TensorBoard logger (about a minute on a laptop CPU). λmax rises "
        "while the model learns (progressive sharpening). The run also holds the trained "
        "model as a checkpoint for `analyze`.",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("runs/demo"),
        help="directory for the runs (default: runs/demo)",
    )
    demo.add_argument(
        "--edge-of-stability",
        action="store_true",
        help="full-batch gradient descent with MSE on 500 digits instead: λmax·η climbs to "
        "2 and hovers there (Cohen et al., ICLR 2021)",
    )
    demo.add_argument(
        "--max-steps",
        type=_int_at_least(1),
        default=None,
        help="stop after this many steps (default: the recipe's 10,000, or 3,000 with "
        "--edge-of-stability)",
    )
    demo.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed (default 0)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    analyze = commands.add_parser(
        "analyze",
        help="measure the Hessian of a saved model: λmax, top-k, λmin, trace, density",
        description="Load a Lightning checkpoint into a LightningModule class, take batches "
        "from a LightningDataModule's train_dataloader, and measure the Hessian of the mean "
        "training_step loss over them with the estimators CurvatureMonitor uses. Prints a "
        "table and writes summary.json, spectrum.png and a TensorBoard run (the monitor's "
        "tags) into --out. Checkpoints are unpickled: analyze only files you trust.",
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
        type=_int_at_least(1),
        default=1,
        help="training batches the Hessian is averaged over (default 1)",
    )
    analyze.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=None,
        help="passed to the data module as batch_size (default: its own)",
    )
    analyze.add_argument(
        "--k", type=_int_at_least(1), default=5, help="top eigenvalues to report (default 5)"
    )
    analyze.add_argument(
        "--tol", type=_fraction, default=1e-4, help="relative eigenvalue accuracy (default 1e-4)"
    )
    analyze.add_argument(
        "--num-probes",
        type=_int_at_least(2),
        default=30,
        help="Hutchinson probes for the trace (default 30)",
    )
    analyze.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: runs/analyze/<checkpoint name>, or _2, _3, ... "
        "when that exists)",
    )
    analyze.add_argument(
        "--seed",
        type=_int_at_least(0),
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
        type=_int_at_least(1),
        default=None,
        help="CPU threads for PyTorch (default: its own choice; 1 is often fastest for "
        "small models on a busy machine)",
    )
    analyze.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    commands.add_parser(
        "fit",
        add_help=False,
        help="LightningCLI fit, e.g. `fit --config configs/demo.yaml` (needs jsonargparse)",
    )
    return parser


# ---------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-curvature`` with ``argv`` (default: ``sys.argv[1:]``); return the
    exit status (0 ok, 1 the measurement failed, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:
        return _fit(argv[1:])
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # --help
            return int(done.code or 0)
        if args.command == "demo":
            return _demo(args)
        return _analyze(args)
    except CliError as error:
        print(f"{error.prog}: error: {error}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


@contextmanager
def _quiet_lightning():
    """Lightning's start-up banners (GPU available, tips) and warnings that do not apply to
    these runs would bury what the command prints."""
    from lightning_curvature._lightning import LIGHTNING_PACKAGE

    loggers = [logging.getLogger(name) for name in (LIGHTNING_PACKAGE, "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


# ---------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    try:
        import sklearn  # noqa: F401  (fail here with the install hint, not mid-run)

        from lightning_curvature.demo import CHECKPOINT_NAME, demo_recipe, run_demo
    except ImportError as error:
        raise CliError(
            f"the demo needs {error.name or 'an optional package'}: "
            "pip install 'lightning_curvature[demo]'"
        ) from None
    recipe = demo_recipe(args.edge_of_stability)
    print(f"Training the '{recipe.name}' demo: {recipe.summary}", flush=True)
    with _quiet_lightning():
        log_dir = run_demo(
            args.out,
            edge_of_stability=args.edge_of_stability,
            max_steps=args.max_steps,
            seed=args.seed,
            progress=not args.no_progress,
        )
    checkpoint = log_dir / CHECKPOINT_NAME
    print()
    print(f"Run:        {log_dir}")
    print(f"Checkpoint: {checkpoint}")
    print(_curve_summary(log_dir))
    print()
    print("Open it in TensorBoard (the Scalars and Custom Scalars tabs):")
    print(f"  tensorboard --logdir {shlex.quote(str(args.out))}")
    print("Measure the trained model offline:")
    print(f"  {PROG} analyze {shlex.quote(str(checkpoint))} --model {DEMO_MODEL} --demo-data")
    return 0


def _curve_summary(log_dir: Path) -> str:
    """λmax and λmax·η at the first and last measurement, read back from the event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    lines = []
    for tag, label in (("curvature/lambda_max", "λmax"), ("curvature/lambda_max_x_lr", "λmax·η")):
        if tag in tags:
            points = events.Scalars(tag)
            first, last = points[0], points[-1]
            lines.append(
                f"{label + ':':11} {first.value:.4g} at step {first.step} → "
                f"{last.value:.4g} at step {last.step} ({len(points)} measurements)"
            )
    if lines and "curvature/stability_threshold" in tags:
        lines[-1] += f", threshold {events.Scalars('curvature/stability_threshold')[-1].value:g}"
    return "\n".join(lines) or "No curvature was logged (see the warnings above)."


# ---------------------------------------------------------------------------- analyze


def _analyze(args: argparse.Namespace) -> int:
    device = _device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    checkpoint = _read_checkpoint(args.checkpoint)
    model_class = _import_class(args.model, "--model")
    data_class = _import_class(DEMO_DATA if args.demo_data else args.data, "--data")
    if not hasattr(model_class, "load_from_checkpoint"):
        raise CliError(f"--model {args.model} is not a LightningModule class")
    if not hasattr(data_class, "train_dataloader"):
        raise CliError(f"--data {data_class.__name__} has no train_dataloader()")
    out = args.out or _unused_dir(Path("runs/analyze") / args.checkpoint.stem)
    # Imported after the cheap checks: bad paths are reported before Lightning loads.
    from lightning_curvature.measurement import MeasureSettings, measure
    from lightning_curvature.monitor.objective import muted_logging, training_step_loss
    from lightning_curvature.operators import HessianOperator

    step = int(checkpoint.get("global_step", 0))

    with _quiet_lightning():
        model = _load_model(model_class, args.model, args.checkpoint, device)
        datamodule, data_description = _build_data(data_class, checkpoint, args.batch_size)
        batches = _sample_batches(datamodule, data_description, args.num_batches, args.seed)
    model.eval()  # as the monitor measures: running statistics, no dropout
    settings = MeasureSettings(
        k=args.k,
        tol=args.tol,
        num_probes=args.num_probes,
        density=True,
        lambda_min=True,
        seed=args.seed,
    )
    op = None
    with muted_logging(model), _hvp_progress(not args.no_progress) as count:
        try:
            op = HessianOperator(model, training_step_loss, batches)
            rule, preconditioner, stability_note = _stability(model, checkpoint, op.params)
            record, _ = measure(count(op), step, settings, rule=rule, preconditioner=preconditioner)
        except Exception as error:  # the model's own code ran: report it, not a traceback
            print(
                f"{PROG}: error: measuring the Hessian failed: {type(error).__name__}: "
                f"{_one_line(error)}",
                file=sys.stderr,
            )
            return FAILED
        finally:
            if op is not None:
                op.release()

    summary = {
        "checkpoint": str(args.checkpoint),
        "model": args.model,
        "data": data_description,
        "num_batches": len(batches),
        "num_parameters": op.dim,
        "global_step": step,
        "stability": stability_note,
        "settings": {
            "k": args.k,
            "tol": args.tol,
            "num_probes": args.num_probes,
            "seed": args.seed,
            "device": str(device),
        },
        "measurement": record.to_json(),
    }
    _write_outputs(out, record, summary, step)
    print(_table(record, summary))
    print()
    print(f"Wrote {out / 'summary.json'}, {out / 'spectrum.png'} and a TensorBoard run:")
    print(f"  tensorboard --logdir {shlex.quote(str(out))}")
    return 0


def _unused_dir(path: Path) -> Path:
    """``path``, or ``path_2``, ``path_3``, ... if it is taken: one analysis per directory,
    so TensorBoard never mixes two of them in one run."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}_{number}")
    return candidate


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint as a dict, or a one-line reason why it is not one."""
    if not path.exists():
        raise CliError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CliError(f"checkpoint {path} is not a file")
    try:
        # Lightning checkpoints hold hyper-parameters as arbitrary Python objects.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CliError(
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: "
            f"{_one_line(error)})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CliError(f"{path} is not a Lightning checkpoint: it has no 'state_dict'")
    return checkpoint


def _import_class(path: str, flag: str) -> type:
    """``package.module.Class`` imported, or a one-line reason why not."""
    module_name, _, name = path.rpartition(".")
    if not module_name or not name:
        raise CliError(f"{flag} {path!r} is not a class path like package.module.Class")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise CliError(
            f"{flag} {path}: cannot import {module_name!r} ({type(error).__name__}: "
            f"{_one_line(error)})"
        ) from None
    try:
        found = getattr(module, name)
    except Exception:
        raise CliError(f"{flag} {path}: module {module_name!r} has no {name!r}") from None
    if not inspect.isclass(found):
        raise CliError(f"{flag} {path} is a {type(found).__name__}, not a class")
    return found


def _load_model(model_class: type, name: str, path: Path, device: torch.device) -> Any:
    try:
        model = model_class.load_from_checkpoint(path, map_location=device)
    except RuntimeError as error:
        if "state_dict" in str(error):  # missing/unexpected keys, size mismatches
            raise CliError(f"checkpoint {path} does not match {name}: {_one_line(error)}") from None
        raise CliError(f"cannot load {path} into {name}: {_one_line(error)}") from None
    except Exception as error:
        raise CliError(
            f"cannot load {path} into {name} ({type(error).__name__}: {_one_line(error)})"
        ) from None
    return model


def _build_data(
    data_class: type, checkpoint: dict[str, Any], batch_size: int | None
) -> tuple[Any, str]:
    """The data module, built as it was for training when the checkpoint says how."""
    saved = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    accepts = inspect.signature(data_class).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepts.values())
    kwargs = {k: v for k, v in saved.items() if k in accepts or takes_any}
    if batch_size is not None:
        if "batch_size" not in accepts and not takes_any:
            raise CliError(f"--batch-size: {data_class.__name__} takes no batch_size argument")
        if not kwargs.get("full_batch"):
            kwargs["batch_size"] = batch_size
        else:
            raise CliError("--batch-size: the checkpoint's data module is full-batch")
    try:
        datamodule = data_class(**kwargs)
    except Exception as error:
        raise CliError(
            f"cannot build {data_class.__name__}({_kwargs_text(kwargs)}): "
            f"{type(error).__name__}: {_one_line(error)}"
        ) from None
    return datamodule, f"{data_class.__module__}.{data_class.__name__}({_kwargs_text(kwargs)})"


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _sample_batches(datamodule: Any, description: str, num_batches: int, seed: int) -> list:
    """The first ``num_batches`` training batches, drawn under ``seed`` (so a loader that
    shuffles with the global RNG gives the same batches every time)."""
    batches: list = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for hook in ("prepare_data", "setup"):
                if hasattr(datamodule, hook):
                    getattr(datamodule, hook)(*(("fit",) if hook == "setup" else ()))
            for batch in datamodule.train_dataloader():
                batches.append(batch)
                if len(batches) == num_batches:
                    break
    except Exception as error:
        raise CliError(
            f"{description}: the training data failed to load ({type(error).__name__}: "
            f"{_one_line(error)})"
        ) from None
    if not batches:
        raise CliError(f"{description}: train_dataloader() yielded no batches")
    if len(batches) < num_batches:
        print(f"note: the training data has only {len(batches)} batches; using all of them")
    return batches


def _stability(model: Any, checkpoint: dict[str, Any], params: list) -> tuple[Any, Any, str]:
    """The stability rule of the optimizer that trained the model, rebuilt from the module's
    ``configure_optimizers`` and the checkpoint's optimizer state, when both allow it."""
    from lightning_curvature.stability import preconditioner_diagonal, stability_rule

    states = checkpoint.get("optimizer_states") or []
    if not states:
        return None, None, "no optimizer state in the checkpoint"
    try:
        configured = model.configure_optimizers()
        optimizer = _first_optimizer(configured)
        optimizer.load_state_dict(states[0])
        rule = stability_rule(optimizer)
        preconditioner = preconditioner_diagonal(optimizer, params) if rule.preconditioned else None
    except Exception as error:
        return None, None, f"optimizer not rebuilt ({type(error).__name__}: {_one_line(error)})"
    return rule, preconditioner, rule.note


def _first_optimizer(configured: Any) -> torch.optim.Optimizer:
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict):
        return _first_optimizer(configured["optimizer"])
    if isinstance(configured, (list, tuple)) and configured:
        return _first_optimizer(configured[0])
    raise TypeError(f"configure_optimizers returned {type(configured).__name__}")


@contextmanager
def _hvp_progress(enabled: bool):
    """A tqdm counter of Hessian-vector products (their number depends on convergence, so
    it has no total). Yields a function that wraps an operator to count its products."""
    from tqdm.auto import tqdm

    bar = tqdm(desc="Hessian-vector products", unit="HVP", disable=not enabled, leave=False)

    def counted(op: Any) -> _CountedOperator:
        return _CountedOperator(op, bar)

    try:
        yield counted
    finally:
        bar.close()


class _CountedOperator:
    """An operator that advances a progress bar with every product it passes on."""

    def __init__(self, op: Any, bar: Any) -> None:
        self.op, self.bar = op, bar
        self.dim, self.device, self.dtype = op.dim, op.device, op.dtype

    @property
    def num_matvecs(self) -> int:
        return self.op.num_matvecs

    @property
    def loss(self) -> float:
        return self.op.loss

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.bar.update(1)
        return self.op.matvec(v)

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        self.bar.update(block.shape[1])
        return self.op.matmat(block)


def _write_outputs(out: Path, record: Any, summary: dict[str, Any], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from lightning_curvature.tensorboard import density_figure, write_layout, write_measurement

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CliError(f"--out {out}: cannot create it ({_one_line(error)})") from None
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    figure = density_figure(record)
    if figure is not None:
        figure.savefig(out / "spectrum.png")
        import matplotlib.pyplot as plt

        plt.close(figure)
    writer = SummaryWriter(log_dir=str(out))
    try:
        write_layout(writer)
        for tag, value in record.scalars().items():
            writer.add_scalar(tag, value, step)
        write_measurement(writer, record, step)
    finally:
        writer.close()


def _table(record: Any, summary: dict[str, Any]) -> str:
    """The measurement as a plain-text table with its convergence evidence."""
    rows: list[tuple[str, str, str]] = []
    status = "converged" if record.converged else "NOT converged (raise --tol?)"
    for index, (value, bound) in enumerate(
        zip(record.eigenvalues, record.error_bounds, strict=True)
    ):
        name = "λmax" if index == 0 else f"eigenvalue {index + 1}"
        evidence = f"error bound {bound:.2g}" + (f", {status}" if index == 0 else "")
        rows.append((name, f"{value:.6g}", evidence))
    if record.lambda_min is not None:
        rows.append(("λmin", f"{record.lambda_min:.6g}", "most negative curvature"))
    if record.trace is not None:
        rows.append(
            (
                "trace",
                f"{record.trace:.6g} ± {record.trace_stderr:#.2g}",
                f"± 1 stderr, {summary['settings']['num_probes']} Hutchinson probes",
            )
        )
    if record.preconditioned_lambda_max is not None:
        rows.append(("λmax(P⁻¹H)", f"{record.preconditioned_lambda_max:.6g}", "preconditioned"))
    if record.sharpness_x_lr is not None:
        rows.append(
            (
                "sharpness·η",
                f"{record.sharpness_x_lr:.4g}",
                f"threshold {record.stability_threshold:.4g}, ratio {record.stability_ratio:.3g}",
            )
        )
    rows.append(("loss", f"{record.loss:.6g}", f"mean over {summary['num_batches']} batches"))
    rows.append(("HVPs", str(record.num_matvecs), f"{record.seconds:.2f} s"))
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    header = (
        f"Hessian of {summary['model'].rsplit('.', 1)[-1]}'s training loss at step "
        f"{summary['global_step']}: {summary['num_parameters']:,} parameters, "
        f"{summary['num_batches']} batch(es) of {summary['data']}\n"
        f"Stability: {summary['stability']}"
    )
    lines = [f"  {a:<{width}}  {b:>{value_width}}  {c}" for a, b, c in rows]
    return "\n".join([header, *lines])


# ---------------------------------------------------------------------------- fit


def _fit(args: list[str]) -> int:
    """LightningCLI ``fit`` with ``args``: any LightningModule/LightningDataModule by class
    path, e.g. ``--config configs/demo.yaml``."""
    from lightning_curvature._lightning import LIGHTNING_PACKAGE

    try:
        cli_module = importlib.import_module(f"{LIGHTNING_PACKAGE}.cli")
        cli_module.LightningCLI  # noqa: B018  (fails without jsonargparse)
    except (ImportError, AttributeError) as error:
        print(
            f"{PROG}: error: fit needs LightningCLI's extras ({_one_line(error)}): "
            "pip install 'lightning_curvature[demo]'",
            file=sys.stderr,
        )
        return BAD_INPUT
    argv, sys.argv = sys.argv, [f"{PROG} fit"]  # args only: LightningCLI warns on both
    try:
        cli_module.LightningCLI(args=["fit", *args], save_config_kwargs={"overwrite": True})
    except SystemExit as done:
        return int(done.code or 0)
    finally:
        sys.argv = argv
    return 0
