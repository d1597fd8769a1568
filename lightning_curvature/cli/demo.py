"""``lightning-curvature demo``: train the digits MLP with CurvatureMonitor and say where the
TensorBoard run and the checkpoint are."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from lightning_curvature.cli._shared import (
    DEMO_MODEL,
    PROG,
    CliError,
    int_at_least,
    quiet_lightning,
)


def add_parser(commands: Any) -> None:
    """Add ``demo`` to the subcommands of the main parser."""
    demo = commands.add_parser(
        "demo",
        help="train a small MLP on digits with CurvatureMonitor and write a TensorBoard run",
        description="Train a small MLP on scikit-learn's digits (minibatch SGD on the mean "
        "squared error against one-hot targets) with CurvatureMonitor at its defaults and a "
        "TensorBoard logger (about a minute on a laptop CPU). λmax rises while the model "
        "learns (progressive sharpening). The run also holds the trained model as a "
        "checkpoint for `analyze`.",
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
        "--transformer",
        action="store_true",
        help="a small byte-level transformer language model on the Python standard "
        "library's own source, with AdamW, instead (about 2 minutes on 2 CPU cores)",
    )
    demo.add_argument(
        "--max-steps",
        type=int_at_least(1),
        default=None,
        help="stop after this many steps (default: the recipe's 10,000, or 3,000 with "
        "--edge-of-stability, or 1,500 with --transformer)",
    )
    demo.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (default 0)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train the demo recipe that ``args`` names; print the run, the checkpoint and how to
    look at both."""
    try:
        import sklearn  # noqa: F401  (fail here with the install hint, not mid-run)

        from lightning_curvature.demo import CHECKPOINT_NAME, demo_recipe, run_demo
    except ImportError as error:
        raise CliError(
            f"the demo needs {error.name or 'an optional package'}: "
            "pip install 'lightning_curvature[demo]'"
        ) from None
    if args.edge_of_stability and args.transformer:
        raise CliError("--edge-of-stability and --transformer are two demos: choose one")
    recipe = demo_recipe(args.edge_of_stability, args.transformer)
    print(f"Training the '{recipe.name}' demo: {recipe.summary}", flush=True)
    with quiet_lightning():
        log_dir = run_demo(
            args.out,
            edge_of_stability=args.edge_of_stability,
            max_steps=args.max_steps,
            seed=args.seed,
            progress=not args.no_progress,
            transformer=args.transformer,
        )
    checkpoint = log_dir / CHECKPOINT_NAME
    print()
    print(f"Run:        {log_dir}")
    print(f"Checkpoint: {checkpoint}")
    print(curve_summary(log_dir))
    print()
    print("Open it in TensorBoard (the Scalars and Custom Scalars tabs):")
    print(f"  tensorboard --logdir {shlex.quote(str(args.out))}")
    print("Measure the trained model offline:")
    if args.transformer:
        model = "lightning_curvature.demo.CharTransformer"
        data = "--data lightning_curvature.demo.StdlibTextDataModule"
        print(f"  {PROG} analyze {shlex.quote(str(checkpoint))} --model {model} {data}")
    else:
        print(f"  {PROG} analyze {shlex.quote(str(checkpoint))} --model {DEMO_MODEL} --demo-data")
    return 0


def curve_summary(log_dir: Path, prefix: str = "curvature") -> str:
    """λmax and λmax·η at the first and last measurement, read back from the event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    lines = []
    curves = [(f"{prefix}/lambda_max", "λmax"), (f"{prefix}/lambda_max_x_lr", "λmax·η")]
    if f"{prefix}/preconditioned_lambda_max" in tags:  # Adam: the threshold is P⁻¹H's
        curves.append((f"{prefix}/sharpness_x_lr", "λmax(P⁻¹H)·η"))
    for tag, label in curves:
        if tag in tags:
            points = events.Scalars(tag)
            first, last = points[0], points[-1]
            lines.append(
                f"{label + ':':13} {first.value:.4g} at step {first.step} → "
                f"{last.value:.4g} at step {last.step} ({len(points)} measurements)"
            )
    threshold = f"{prefix}/stability_threshold"
    if lines and threshold in tags:
        lines[-1] += f", threshold {events.Scalars(threshold)[-1].value:g}"
    return "\n".join(lines) or "No curvature was logged (see the warnings above)."
