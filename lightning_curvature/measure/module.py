"""One measurement of a training module, without disturbing it.

This is where the monitor's parts meet: the objective (the module's own loss in the
measurement's mode, with ``training_step``'s side effects undone), the operator over the
chosen parameters (averaged across ranks under data parallelism), the optimizer that owns
those parameters (its learning rate, its stability rule and, for adaptive optimizers, its
preconditioner), and one tier of :func:`~lightning_curvature.measure.tiers.measure`. It knows
torch, not Lightning: the callback hands it the module, its optimizers and schedulers.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_curvature._shards import holds_shards, local_part
from lightning_curvature.batches import detached_copy, move_batch
from lightning_curvature.measure.critical import critical_sharpness, loss_along
from lightning_curvature.measure.objective import (
    Mode,
    measurement_mode,
    muted_logging,
    preserved_python_state,
    training_step_loss,
)
from lightning_curvature.measure.record import Measurement
from lightning_curvature.measure.tiers import (
    MeasureSettings,
    Tier,
    WarmStart,
    measure,
)
from lightning_curvature.operators import AllReduceOperator, HessianOperator
from lightning_curvature.operators.blocks import parameter_blocks
from lightning_curvature.operators.choice import curvature_operator
from lightning_curvature.operators.sharded import ShardedHessianOperator
from lightning_curvature.optim.preconditioners import first_moment_settled, optimizer_view
from lightning_curvature.optim.stability import StabilityRule

# Forward passes a critical-sharpness search may take (at most; 4-6 from a good start).
CRITICAL_EVALS = 8


@dataclass
class Context:
    """Everything about the training run that a measurement reads (and must not change)."""

    module: nn.Module
    loss_fn: Callable[[nn.Module, Any], Any]
    param_names: Sequence[str]
    optimizers: Sequence[Any] = ()
    lr_schedulers: Sequence[Any] = ()
    mode: Mode = "train"
    dropout: bool = False
    distributed: bool = False
    curvature: str = "hessian"
    output_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
    loss_from_output: Any = None
    per_layer: bool | Sequence[str] = False


@dataclass(frozen=True)
class Objective:
    """What a monitor measures, fixed for its run: the loss (``loss_fn``, or None for the
    module's own ``training_step``), its mode, and the curvature of it."""

    loss_fn: Callable[[nn.Module, Any], Any] | None = None
    mode: Mode = "train"
    dropout: bool = False
    curvature: str = "hessian"
    output_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
    loss_from_output: Any = None
    per_layer: bool | Sequence[str] = False

    @property
    def is_training_step(self) -> bool:
        """Whether the loss is ``training_step``'s, called with each probe's own batch_idx
        (a ``loss_fn``, or the GGN's and Fisher's output-space loss, takes the batch alone)."""
        return self.loss_fn is None and self.curvature == "hessian"

    def context(self, module: nn.Module, param_names: Sequence[str]) -> Context:
        """The measurement's context for ``module`` (optimizers come per measurement)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["loss_fn"] = self.loss_fn or training_step_loss
        return Context(module=module, param_names=param_names, **fields)


@dataclass
class Outcome:
    """A measurement's record, what the next one starts from, and notes for the user."""

    record: Measurement
    warm: WarmStart
    rule: StabilityRule | None
    ratio_trusted: bool
    method_used: str | None
    fallback_reason: str | None
    notes: list[str] = field(default_factory=list)
    # (optimizer, param group) that owns the measured parameters: η is read there per step.
    owner: tuple[Any, int] | None = None

    def messages(self) -> list[tuple[str, str]]:
        """What the user should hear about this measurement, as (key, text) pairs: the key
        says when two messages are the same news (each is shown once per run)."""
        said = [(note, note) for note in self.notes]
        if self.fallback_reason:
            said.insert(0, ("fallback", self.fallback_reason))
        if not self.record.converged:
            said.append(
                (
                    "not converged",
                    f"the sharpness did not converge at step {self.record.step} within "
                    f"{self.record.num_matvecs} products, so it is not logged there (raise "
                    "num_iters, or loosen tol).",
                )
            )
        return said


def measure_module(
    context: Context,
    batches: list[Any],
    step: int,
    tier: Tier,
    settings: MeasureSettings,
    *,
    warm: WarmStart | None = None,
    update: torch.Tensor | None = None,
    hvp_method: str = "auto",
    verify: bool = True,
) -> Outcome:
    """Measure ``context.module`` on ``batches`` and leave it exactly as it was."""
    module = context.module
    sharded = holds_shards(module.parameters())
    # A sharded module is measured in place: its operator computes in float32 whatever the
    # shards' precision (a deep copy of a sharded module is no copy of its training).
    target = module if sharded else _float_copy(module)
    if target is not module:
        device = next(target.parameters()).device
        batches = [move_batch(batch, device, torch.float32) for batch in batches]
    named = dict(target.named_parameters())
    params = {name: named[name] for name in context.param_names}
    originals = dict(module.named_parameters())
    view = optimizer_view(context.optimizers, [originals[n] for n in params])
    rule, preconditioner = view.rule, view.preconditioner
    notes = _optimizer_notes(view)
    if sharded and settings.critical_sharpness:
        notes.append("critical sharpness is not measured on a sharded model (FSDP2)")
    with (
        peak_memory(next(target.parameters()).device) as peak,
        preserved_python_state(module, context.optimizers, context.lr_schedulers),
        measurement_mode(target, context.mode, context.dropout),
        muted_logging(target),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        local, op, blocks = _operators(context, target, batches, params, hvp_method, verify)
        hessian = context.curvature == "hessian"
        try:
            record, next_warm = measure(
                op,
                step,
                settings,
                tier=tier,
                rule=rule,
                preconditioner=preconditioner,
                warm=warm,
                update=update,
                batch_ops=None if not hessian else _batch_operators(local, batches),
                # Sharded products are already over every rank's batches (see module doc).
                mean_over_ranks=_mean_over_ranks if context.distributed and not sharded else None,
                blocks=blocks,
                curvature=context.curvature,
            )
            if settings.critical_sharpness and not sharded:
                record = _with_critical_sharpness(record, target, params, context, batches, update)
        except Exception as error:
            _raise_own_failure(op, error)
            raise
        finally:
            op.release()
        _raise_own_failure(op, None)
    notes.extend(str(w.message) for w in caught)
    return Outcome(
        record=dataclasses.replace(record, peak_memory_mb=peak[0] if peak else None),
        warm=next_warm,
        rule=rule,
        ratio_trusted=view.optimizer is None or first_moment_settled(view.optimizer),
        method_used=getattr(local, "method_used", None),
        fallback_reason=getattr(local, "fallback_reason", None),
        notes=notes,
        owner=None if view.optimizer is None else (view.optimizer, view.param_group),
    )


def _with_critical_sharpness(
    record: Measurement,
    target: nn.Module,
    params: Mapping[str, nn.Parameter],
    context: Context,
    batches: list[Any],
    update: torch.Tensor | None,
) -> Measurement:
    """``record`` with the critical sharpness along the last update per unit η (forward
    passes on the probe batches only, the parameters restored bit for bit), when bracketed.
    The search starts at 2/(directional sharpness), where a quadratic along the update
    would cross (the update's Rayleigh quotient sits far below λmax, tens of learning
    rates away, so a search from η spends its passes getting there), or at η."""
    lr = record.learning_rate
    if update is None or not lr or not bool(update.any()):
        return record
    direction = (update / lr).to(next(iter(params.values())).dtype)
    loss_fn = _on_fresh_copies(context.loss_fn)
    along = [loss_along(target, params, direction, loss_fn, batch) for batch in batches]

    def loss_at(t: float) -> float:
        local = sum(f(t) for f in along) / len(along)
        # Under data parallelism every rank sees the mean over all ranks' probe batches, so
        # every rank's search takes the same steps (and the same collectives).
        return _mean_over_ranks(local) if context.distributed else local

    quotient = record.directional_sharpness
    start = 2.0 / quotient if quotient is not None and quotient > 0 else lr
    found = critical_sharpness(loss_at, start, max_evals=CRITICAL_EVALS)
    if not found.bracketed:
        return record
    return dataclasses.replace(
        record, critical_sharpness=found.value, critical_sharpness_x_lr=found.value * lr
    )


def _optimizer_notes(view: Any) -> list[str]:
    """What the user should know about the optimizer's view of the measured parameters."""
    notes = []
    if view.rule is not None and not view.rule.known:
        notes.append(view.rule.note)
    if view.preconditioner is not None and bool(torch.isinf(view.preconditioner).any()):
        notes.append(
            "some measured parameters have no optimizer state yet (unused, frozen or "
            "new): they are left out of the preconditioned sharpness"
        )
    return notes


def _operators(
    context: Context,
    target: nn.Module,
    batches: list[Any],
    params: Mapping[str, nn.Parameter],
    hvp_method: str,
    verify: bool,
) -> tuple[Any, Any, Any]:
    """This rank's curvature operator, the one measured (averaged over ranks under data
    parallelism), and the per-layer blocks when asked. A module sharded by FSDP2 gets the
    sharded operator: finite differences of its own gradients, on this rank's shards."""
    if holds_shards(target.parameters()):
        if context.curvature != "hessian" or context.per_layer:
            raise ValueError(
                "a sharded model is measured as the whole Hessian only: curvature='hessian' "
                f"and per_layer=False (got curvature={context.curvature!r}, "
                f"per_layer={context.per_layer!r})"
            )
        sharded = ShardedHessianOperator(target, _on_fresh_copies(context.loss_fn), batches)
        return sharded, sharded, None
    local: Any = curvature_operator(
        context.curvature,
        target,
        batches,
        params,
        loss_fn=_on_fresh_copies(context.loss_fn),
        output_fn=context.output_fn,
        loss_from_output=context.loss_from_output,
        hvp_method=hvp_method,
        verify=verify,
    )
    op: Any = AllReduceOperator(local) if context.distributed else local
    blocks = (
        parameter_blocks(local.param_names, local.params, context.per_layer)
        if context.per_layer
        else None
    )
    return local, op, blocks


@contextmanager
def peak_memory(device: torch.device) -> Iterator[list[float]]:
    """The peak allocated memory on ``device`` while the block runs, in MB, appended to the
    yielded list at its end: on CUDA only (CUDA's peak statistics are reset for it; a CPU
    keeps no peak, and nothing is reported there)."""
    found: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield found
    finally:
        if device.type == "cuda":
            found.append(torch.cuda.max_memory_allocated(device) / 2**20)


class RankFailure(RuntimeError):
    """A measurement failed on this rank itself; the other ranks only saw its NaN products
    (which they report as non-finite values). Its ``__cause__`` is the original error."""


def _raise_own_failure(op: Any, error: BaseException | None) -> None:
    own = getattr(op, "last_error", None)
    if own is not None and own is not error:
        raise RankFailure(f"{type(own).__name__}: {own}") from own


def flat_parameters(module: nn.Module, names: Sequence[str]) -> torch.Tensor:
    """The named parameters as one detached flat vector (for the last update θ_s − θ_{s−1})."""
    named = dict(module.named_parameters())
    pieces = [local_part(named[name].detach()).reshape(-1).float() for name in names]
    return torch.cat(pieces).clone()


class LastUpdate:
    """The update θ_s − θ_{s−1} of a measured step s: θ_{s−1} is copied just before the
    step (only before steps that will be measured: a copy of θ is not free)."""

    def __init__(self) -> None:
        self._before: tuple[int, torch.Tensor] | None = None

    def keep_before(self, module: nn.Module, names: Sequence[str], step: int) -> None:
        """Copy θ at ``step`` (``global_step`` before the optimizer step)."""
        self._before = (step, flat_parameters(module, names)) if names else None

    def take(self, module: nn.Module, names: Sequence[str], step: int) -> torch.Tensor | None:
        """θ_step − the copy, when the copy was of an earlier step; the copy is used up."""
        before, self._before = self._before, None
        if before is None or before[0] >= step:
            return None
        return flat_parameters(module, names) - before[1]


def _on_fresh_copies(loss_fn: Callable[[nn.Module, Any], Any]) -> Callable[[nn.Module, Any], Any]:
    """``loss_fn`` called on a fresh copy of its batch each time: a ``training_step`` that
    edits its batch in place would otherwise shift the probe between the evaluations of
    one measurement (the graph, the check, finite differences)."""

    def on_copy(module: nn.Module, batch: Any) -> Any:
        return loss_fn(module, detached_copy(batch, next(module.parameters()).device))

    return on_copy


def _batch_operators(op: Any, batches: list[Any]) -> list[Any]:
    """One operator per probe batch, for the batch sharpness g_bᵀH_b g_b / g_bᵀg_b (under
    FSDP2, g_b and H_b of the mean over every rank's batch b: the sharded gradients come
    averaged over the ranks)."""
    if len(batches) == 1:
        return [op]
    if isinstance(op, ShardedHessianOperator):
        return [ShardedHessianOperator(op.module, op.loss_fn, [batch]) for batch in batches]
    return [
        HessianOperator(
            op.model,
            op.loss_fn,
            [batch],
            dict(zip(op.param_names, op.params, strict=True)),
            hvp_method=op.method_used,
            verify=False,
        )
        for batch in batches
    ]


def _mean_over_ranks(value: float) -> float:
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


def _float_copy(module: nn.Module) -> nn.Module:
    """The module itself, or, when its parameters are half precision (``bf16-true``,
    ``16-true``), a float32 copy that is still attached to the module's trainer (so a
    ``training_step`` calling ``self.optimizers()`` or ``self.log`` works on it)."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    if dtypes <= {torch.float32, torch.float64}:
        return module
    trainer = getattr(module, "_trainer", None)
    clone = copy.deepcopy(module).float()
    if trainer is not None and hasattr(type(clone), "trainer"):
        clone.trainer = trainer
    return clone
