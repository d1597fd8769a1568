r"""Is a Hessian-vector product trustworthy? Two cheap probes, and what to say when not.

Autograd does not always raise when it cannot differentiate twice: a
``torch.autograd.Function`` whose backward is marked ``@once_differentiable`` (or written
without differentiable ops) silently drops its path from the second derivative, and the
product is then the Hessian of another function, no longer symmetric. Two products and three
gradients catch that:

* **symmetry**: for random :math:`u, v`, :math:`u^\top H v = v^\top H u` for any symmetric
  :math:`H`; the error is :math:`|u^\top Hv - v^\top Hu| / (\|u\| \|Hv\| + \|v\| \|Hu\|)`
  (Cauchy–Schwarz bounds each term by its part of the denominator);
* **finite differences**: :math:`Hv` against the central difference of first-order gradients
  :math:`(\nabla L(\theta+\epsilon v) - \nabla L(\theta-\epsilon v)) / 2\epsilon`; the
  error is :math:`\|Hv - \mathrm{FD}\| / \|Hv\|`. The central difference is itself
  inexact: float32 rounding, and kinks that the step crosses (ReLU, max-pooling: the
  gradient jumps; in float32 no step avoids them on a large batch) make it so. The gradient at
  :math:`\theta` measures that: half the gap between the forward and the backward
  difference. A disagreement within three times that gap is not held against the product,
  so the finite-difference test is sharp on smooth models and defers to the symmetry test
  on piecewise-linear ones.

Both tolerances sit far above rounding on healthy models and far below what a dropped path
does (see the constants below).

Before its first product an operator checks itself on that product (:func:`judge_products`
with one extra column and two gradients, the gradient at :math:`\theta` taken from the
graph it keeps), and a pass is remembered (:class:`PassedChecks`): later operators on the
same model, loss function, method, parameters, dtype and device do not pay again, except
every ``RECHECK_EVERY``-th one. A failure is never remembered, so every operator after it
checks again.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Tolerances per dtype, measured (benchmarks/RESULTS.md, "Hessian-vector products"):
# healthy models (tanh and ReLU MLPs up to 85k parameters, a CNN with BatchNorm in train
# mode, dropout, attention, adapters) give symmetry errors below 3e-8 in float32 and 6e-17
# in float64; a custom Function with @once_differentiable gives 1.4e-3..1e-2, in the loss or
# in a side branch. Finite differences of healthy models agree to 1e-3 (float32, where the
# step crosses no kink) and 1.3e-7 (float64); the dropped side branch is 4e-2 off. The
# finite-difference test forgives three times the difference's own uncertainty on top.
SYMMETRY_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
FINITE_DIFFERENCE_TOLERANCE = {torch.float32: 1e-2, torch.float64: 1e-5}

FIX = (
    "give every custom torch.autograd.Function on the loss's path a differentiable backward "
    "(no @once_differentiable), or use hvp_method='finite_difference'"
)


class UnreliableProductError(RuntimeError):
    """A Hessian-vector product method cannot give correct products for this model; the
    message names the cause and the fix."""


@dataclass(frozen=True)
class HvpCheck:
    """The outcome of :meth:`HessianOperator.check`.

    Attributes:
        passed: both errors within their tolerance for the operator's dtype.
        symmetry_error: :math:`|u^\\top Hv - v^\\top Hu| / (\\|u\\|\\|Hv\\| + \\|v\\|\\|Hu\\|)`.
        finite_difference_error: :math:`\\|Hv - \\mathrm{FD}\\| / \\|Hv\\|`.
        finite_difference_uncertainty: how far the central difference is from itself:
            half the gap between the forward and the backward difference, relative to
            :math:`\\|Hv\\|`. Rounding (float32) and kinks crossed by the step (ReLU,
            max-pooling) make it large; a disagreement within three times it is not held
            against the product.
        cause: when it failed, one sentence naming the cause and the fix; else ``None``.
            It holds no numbers (they are in the fields), so the warning it becomes is
            shown once however many operators repeat it.
        method: the product method that was checked.
        num_matvecs: products spent on the check (2 by :meth:`HessianOperator.check`; 1
            when it rides along the operator's first product); num_gradients: gradient
            evaluations spent (3: at θ - εv, θ, θ + εv; 2 when the gradient at θ came
            from the kept graph).
    """

    passed: bool
    symmetry_error: float
    finite_difference_error: float
    finite_difference_uncertainty: float
    cause: str | None
    method: str
    num_matvecs: int
    num_gradients: int


def judge_products(
    probes: torch.Tensor,
    products: torch.Tensor,
    gradients: torch.Tensor,
    step: torch.Tensor,
    method: str,
    suspects: list[str],
    cost: tuple[int, int] = (2, 3),
) -> HvpCheck:
    """The :class:`HvpCheck` of ``products`` = H [u, v] for ``probes`` = [u, v], given the
    gradients at θ - εv, θ and θ + εv (the columns of ``gradients``) and ε (``step``);
    ``suspects`` names custom autograd Functions on the loss's path (for the message);
    ``cost`` the products and gradients the check spent (for the record)."""
    u, v, hu, hv = probes[:, 0], probes[:, 1], products[:, 0], products[:, 1]
    minus, center, plus = gradients.unbind(dim=1)
    central = (plus - minus) / (2 * step)
    norm = torch.linalg.vector_norm
    values = torch.stack(
        [
            u @ hv,
            v @ hu,
            norm(u) * norm(hv) + norm(v) * norm(hu),
            norm(hv - central),
            norm(plus - 2 * center + minus) / (2 * step),
            norm(hv),
            norm(central),
        ]
    ).tolist()  # one host sync for the whole check
    uhv, vhu, scale, difference, uncertainty, size, central_size = values
    if not all(map(math.isfinite, values)):
        return HvpCheck(False, math.nan, math.nan, math.nan, _non_finite(method), method, *cost)
    symmetry = abs(uhv - vhu) / scale if scale > 0 else 0.0
    reference = max(size, central_size)
    fd_error = difference / size if size > 0 else (0.0 if difference == 0 else math.inf)
    fd_uncertainty = uncertainty / reference if reference > 0 else 0.0
    where = f" (custom autograd Functions on the path: {', '.join(suspects)})" if suspects else ""
    cause = None
    if method == "finite_difference":
        pass  # products from first-order gradients alone: nothing to drop, nothing to judge
    elif symmetry > SYMMETRY_TOLERANCE[probes.dtype]:
        cause = (
            f"hvp_method={method!r} gives a non-symmetric product (uᵀHv ≠ vᵀHu): an "
            f"operation dropped its path from the second derivative{where}; {FIX}"
        )
    elif difference > FINITE_DIFFERENCE_TOLERANCE[probes.dtype] * reference + 3 * uncertainty:
        cause = (
            f"hvp_method={method!r} disagrees with finite differences of the gradient: an "
            f"operation has a wrong second derivative{where}; {FIX}"
        )
    return HvpCheck(cause is None, symmetry, fd_error, fd_uncertainty, cause, method, *cost)


def _non_finite(method: str) -> str:
    return (
        f"hvp_method={method!r} gives non-finite products at finite parameters: the second "
        "derivative overflows or an operation has none; measure at other parameters or batches, "
        "or use hvp_method='finite_difference'"
    )


def explain_failure(error: BaseException, method: str) -> str:
    """One sentence naming why ``method`` raised ``error``, and the fix."""
    text = str(error)
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if "use_reentrant" in text or "Checkpointing is not compatible" in text:
        cause = "reentrant activation checkpointing (use_reentrant=True) has no double backward"
        fix = "checkpoint with use_reentrant=False, or use hvp_method='finite_difference'"
    elif "derivative for" in text and "not implemented" in text:
        cause = f"an operation has no second derivative ({first})"
        fix = "use hvp_method='finite_difference' (or a differentiable version of that op)"
    elif "double backward" in text.lower() or "compiled" in text.lower():
        cause = f"the model cannot be differentiated twice ({first})"
        fix = "use hvp_method='finite_difference' (or run that part of the model eagerly)"
    else:
        cause = f"the product raised {type(error).__name__}: {first}"
        fix = "use hvp_method='finite_difference', which needs first-order gradients only"
    return f"hvp_method={method!r} failed: {cause}; {fix}"


def custom_functions(loss: torch.Tensor, limit: int = 100_000) -> list[str]:
    """Names of the custom ``torch.autograd.Function`` nodes on ``loss``'s graph, in the
    order first met walking back from the loss (these are where paths get dropped)."""
    found: dict[str, None] = {}
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            found[type(node).__name__.removesuffix("Backward")] = None
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(found)


# A passed check is trusted for this many operators on the same key (then checked again):
# the monitor builds one operator per measurement, and a model's ability to be differentiated
# twice does not change between them unless its code does (which no key can see).
RECHECK_EVERY = 16


class PassedChecks:
    """Which operators have passed their check, so that later ones on the same model skip it.

    Keyed weakly by the model object the caller passed (a new model is checked again), then
    by :func:`check_key` (loss function, method, parameters, dtype, device). Every
    ``RECHECK_EVERY``-th operator on a key is checked again. Only passes are stored; a
    failure, or a method that raised after passing, is forgotten (:meth:`forget`).
    """

    def __init__(self) -> None:
        self._passed: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, list[Any]]] = (
            weakref.WeakKeyDictionary()
        )

    def trusted(self, model: nn.Module, key: Hashable) -> HvpCheck | None:
        """The remembered pass for ``key`` when this operator may skip its check, else
        ``None`` (never checked, forgotten, or its turn to be checked again)."""
        entry = self._passed.get(model, {}).get(key)
        if entry is None:
            return None
        entry[1] += 1
        if entry[1] % RECHECK_EVERY == 0:
            return None
        result: HvpCheck = entry[0]
        return result

    def remember(self, model: nn.Module, key: Hashable, result: HvpCheck) -> None:
        entry = self._passed.setdefault(model, {}).setdefault(key, [result, 0])
        entry[0] = result

    def forget(self, model: nn.Module, key: Hashable) -> None:
        self._passed.get(model, {}).pop(key, None)


PASSED = PassedChecks()


def check_key(
    loss_fn: Callable[..., Any],
    method: str,
    param_names: list[str],
    dtype: torch.dtype,
    device: torch.device,
) -> Hashable:
    """What a passed check holds for, besides the model: the loss function (its code and
    what it captured, so a fresh closure around the same function counts as the same), the
    method, the parameter names, the dtype and the device."""
    return (_callable_identity(loss_fn), method, tuple(param_names), dtype, str(device))


def _callable_identity(function: Callable[..., Any]) -> Hashable:
    """Equal for the same function, a bound method of the same object, or a closure of the
    same code over the same objects (compared by identity)."""
    bound_to = getattr(function, "__self__", None)
    function = getattr(function, "__func__", function)
    code = getattr(function, "__code__", None)
    if code is None:
        return ("object", id(function), id(bound_to))
    cells = getattr(function, "__closure__", None) or ()
    captured = []
    for cell in cells:
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            value = None
        captured.append(
            _callable_identity(value)
            if callable(value) and not isinstance(value, nn.Module)
            else id(value)
        )
    return (code, id(bound_to), tuple(captured))
