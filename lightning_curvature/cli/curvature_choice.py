r"""Which curvature ``analyze`` measures: ``--curvature hessian|ggn|fisher`` with its
``--loss`` and ``--fisher-kind``, checked before Lightning loads, and the operator built for
the whole model or for one block of its parameters.

The Hessian is that of the mean ``training_step`` loss. The GGN :math:`J^\top H_\ell J`
and the Fisher split that loss into the module's outputs, ``module(batch[0])``, and a loss
on them named by ``--loss`` (torch's mean reduction against ``batch[1]``); both are positive
semi-definite, so λmin is not measured for them.

Example::

    lightning-curvature analyze last.ckpt --model mypkg.Classifier --data mypkg.Data \
        --curvature fisher --loss cross_entropy --fisher-kind empirical
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_curvature.cli._shared import CliError, one_line
from lightning_curvature.operators.names import CURVATURES, FISHER_KINDS
from lightning_curvature.operators.names import LOSS_NAMES as LOSSES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--curvature``, ``--loss`` and ``--fisher-kind`` to ``analyze``."""
    parser.add_argument(
        "--curvature",
        choices=CURVATURES,
        default="hessian",
        help="the matrix analyzed (default hessian): the Hessian of the mean training_step "
        "loss; ggn, the generalized Gauss-Newton JᵀH_ℓJ; or fisher, the Fisher (needs "
        "--loss). Both are positive semi-definite, so λmin is skipped for them",
    )
    parser.add_argument(
        "--loss",
        choices=LOSSES,
        default=None,
        help="for ggn and fisher: the loss on the module's outputs model(batch[0]) against "
        "batch[1], with torch's mean reduction (mse needs targets with as many entries as "
        "the outputs, e.g. one-hot; cross_entropy takes class indices or probabilities)",
    )
    parser.add_argument(
        "--fisher-kind",
        choices=FISHER_KINDS,
        default=None,
        help="for fisher: true (default; labels drawn from the model, 32 draws per term, "
        "seeded by --seed) or empirical (the batch's own labels)",
    )


def check_arguments(args: argparse.Namespace) -> None:
    """The flags that only make sense together, checked before anything loads."""
    if args.curvature != "hessian" and args.loss is None:
        raise CliError(
            f"--curvature {args.curvature} needs --loss {'|'.join(LOSSES)}: the loss on "
            "the module's outputs model(batch[0])"
        )
    if args.curvature == "hessian" and args.loss is not None:
        raise CliError(
            f"--loss {args.loss} applies to --curvature ggn or fisher only (the Hessian is "
            "that of training_step's loss)"
        )
    if args.fisher_kind is not None and args.curvature != "fisher":
        raise CliError(
            f"--fisher-kind {args.fisher_kind} applies to --curvature fisher only, "
            f"got --curvature {args.curvature}"
        )


def describe(args: argparse.Namespace) -> str:
    """The measured matrix in words, e.g. ``"GGN (mse)"`` or ``"true Fisher (mse)"``."""
    if args.curvature == "hessian":
        return "Hessian"
    if args.curvature == "ggn":
        return f"GGN ({args.loss})"
    return f"{args.fisher_kind or 'true'} Fisher ({args.loss})"


def is_positive_semidefinite(args: argparse.Namespace) -> bool:
    """The GGN and the Fisher are PSD for a loss convex in the outputs (mse, cross-entropy)."""
    return args.curvature != "hessian"


def check_outputs(args: argparse.Namespace, model: Any, batches: Sequence[Any]) -> None:
    """For ggn and fisher: the module's forward takes ``batch[0]`` and ``--loss`` applies to
    its outputs and ``batch[1]``, or a one-line :class:`CliError` saying which fails.

    Runs the forward once without a graph; call it in the measurement's mode, so that
    normalization layers' running statistics stay as they are.

    Raises:
        CliError: a batch that is not ``(inputs, targets, ...)``, a forward that fails on
            ``batch[0]`` or returns no floating-point tensor, or a ``--loss`` that does not
            fit the outputs and ``batch[1]``.
    """
    if args.curvature == "hessian":
        return
    from lightning_curvature.operators.output_space import builtin_loss

    name = type(model).__name__
    batch = batches[0]
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise CliError(
            f"--curvature {args.curvature}: a training batch must be (inputs, targets, ...), "
            f"got {type(batch).__name__}"
        )
    try:
        with torch.no_grad():
            outputs = model(batch[0])
    except Exception as error:
        raise CliError(
            f"--curvature {args.curvature}: {name}.forward(batch[0]) failed "
            f"({type(error).__name__}: {one_line(error)}); ggn and fisher need a forward that "
            "maps a batch's inputs to outputs"
        ) from None
    if not isinstance(outputs, torch.Tensor) or not outputs.is_floating_point():
        raise CliError(
            f"--curvature {args.curvature}: {name}.forward(batch[0]) must return a "
            f"floating-point tensor, got {type(outputs).__name__}"
        )
    try:
        builtin_loss(args.loss, outputs, batch)
    except Exception as error:
        raise CliError(
            f"--loss {args.loss} does not fit {name}'s outputs of shape "
            f"{tuple(outputs.shape)} and targets batch[1] ({type(error).__name__}: "
            f"{one_line(error)})"
        ) from None


def build_operator(
    args: argparse.Namespace,
    model: Any,
    batches: Sequence[Any],
    params: Mapping[str, torch.nn.Parameter] | None = None,
) -> Any:
    """The operator ``args`` asks for, over ``params`` (default: every trainable one)."""
    from lightning_curvature.measure.objective import training_step_loss
    from lightning_curvature.operators.choice import curvature_operator

    return curvature_operator(
        args.curvature,
        model,
        batches,
        params,
        loss_fn=training_step_loss,
        loss_from_output=args.loss,
        fisher_kind=args.fisher_kind or "true",
        seed=args.seed,
    )


def mean_gradient(op: Any, model: Any, batches: Sequence[Any]) -> torch.Tensor:
    """The mean gradient of the ``training_step`` loss over ``batches``, flat, in the order
    and precision of ``op``'s parameters (the Hessian operator's own for the Hessian)."""
    from lightning_curvature.measure.objective import training_step_loss
    from lightning_curvature.operators import HessianOperator

    if isinstance(op, HessianOperator):
        return op.gradient()
    by_name = dict(model.named_parameters())
    params = {name: by_name[name] for name in op.param_names}
    hessian = HessianOperator(model, training_step_loss, batches, params, dtype=op.dtype)
    try:
        return hessian.gradient()
    finally:
        hessian.release()  # the gradient's graph is not needed after
