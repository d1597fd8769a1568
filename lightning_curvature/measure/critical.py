"""Critical sharpness: how far along the update the loss stays below where it started, from
forward passes only (Kalra et al. 2026).

For a direction d (the optimizer's update per unit learning rate, d = (θ_s − θ_{s−1})/η, or
−g for plain gradient descent) let t_c be the smallest step t > 0 at which
L(θ + t·d) > L(θ). Critical sharpness is 2/t_c. On a quadratic L = ½θᵀHθ − bᵀθ with gradient
g, t_c = 2(−gᵀd)/(dᵀHd) when d descends (−gᵀd > 0), so for d = −g critical sharpness is the
Rayleigh quotient gᵀHg/gᵀg; a direction along which the loss rises at once has no t_c > 0,
and one along which it never rises has t_c = ∞ (critical sharpness 0).

:func:`critical_sharpness` searches t_c with a callable ``loss_at(t)``;
:func:`loss_along` builds that callable for a module, shifting its parameters by t·d and
restoring them bit for bit after every evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_curvature._checks import check_int, check_number
from lightning_curvature.operators.loss import scalar_loss
from lightning_curvature.operators.products import unflatten

#: The default margin a rise must clear, in units of the loss dtype's eps times |L(θ)|: a
#: loss reduced over a batch in that dtype carries a rounding error of a few ulps of |L|.
LOSS_MARGIN_EPS = 16.0


@dataclass(frozen=True)
class CriticalSharpness:
    """The result of :func:`critical_sharpness`.

    ``t_lo``/``t_hi`` bracket the crossing: the loss did not rise at ``t_lo`` (0 when it rose
    at every step tried) and rose at ``t_hi`` (∞ when it rose at none). ``lower``/``upper``
    are the same bracket on critical sharpness, 2/t_hi and 2/t_lo. ``value`` is 2/t at the
    bracket's midpoint t when ``bracketed``, NaN otherwise; ``reason`` says why not.
    """

    value: float
    lower: float
    upper: float
    t_lo: float
    t_hi: float
    num_evals: int
    bracketed: bool
    reason: str = ""

    @property
    def relative_width(self) -> float:
        """(upper − lower)/lower, which equals (t_hi − t_lo)/t_lo: the bracket's relative
        width, the same on t and on critical sharpness (∞ when not bracketed)."""
        if not self.bracketed:
            return math.inf
        return (self.t_hi - self.t_lo) / self.t_lo


class _Search:
    """The evaluations so far: the loss at t = 0, the rise threshold, the bracket."""

    def __init__(self, loss_at: Callable[[float], float], zero: float, rise: float, budget: int):
        self.loss_at = loss_at
        self.zero = zero  # L(θ)
        self.rise = rise  # how far above L(θ) the loss must go to count as risen
        self.budget = budget
        self.num_evals = 0
        self.t_lo, self.f_lo = 0.0, 0.0  # f: L(θ + t·d) − L(θ) at the bracket's ends
        self.t_hi, self.f_hi = math.inf, math.inf

    def left(self) -> int:
        return self.budget - self.num_evals

    def probe(self, t: float) -> bool:
        """Evaluates the loss at ``t``, moves the bracket's end there, and says whether the
        loss rose (a non-finite loss counts as a rise: it is not below L(θ))."""
        loss = float(self.loss_at(t))
        self.num_evals += 1
        rose = not math.isfinite(loss) or loss - self.zero > self.rise
        if rose:
            self.t_hi, self.f_hi = t, loss - self.zero
        else:
            self.t_lo, self.f_lo = t, loss - self.zero
        return rose


def critical_sharpness(
    loss_at: Callable[[float], float],
    lr: float,
    *,
    max_evals: int = 6,
    rel_tol: float = 1e-2,
    loss_at_zero: float | None = None,
    loss_dtype: torch.dtype = torch.float32,
    margin: float | None = None,
) -> CriticalSharpness:
    """Critical sharpness 2/t_c along a direction, from at most ``max_evals`` forward passes.

    ``loss_at(t)`` returns L(θ + t·d) as a Python float; the caller owns the direction and
    the perturbing (:func:`loss_along` does it for a module). The search evaluates L(θ)
    (unless ``loss_at_zero`` gives it), brackets t_c on the grid t = lr·2^k, going up from
    t = lr while the loss does not rise and down while it does, then narrows the bracket.
    Each narrowing probe sits just past the crossing of the quadratic through L(θ) and the
    bracket's two ends, on the side of the end farther from it; a probe on the wrong side
    makes the next one bisect. It stops when ``relative_width`` ≤ ``rel_tol`` or the
    evaluations are spent. On a quadratic with t_c within a factor 2 of ``lr`` that is 4-5
    evaluations in all for ``rel_tol`` = 1e-2 (bisection alone would take 10); each factor 2
    farther costs one more.

    The loss "rises" at t when L(θ + t·d) > L(θ) + ``margin``·|L(θ)|, so float rounding of
    the loss is not taken for a rise; ``margin`` defaults to 16·eps of ``loss_dtype`` (the
    dtype the loss is computed in). Every threshold is relative.

    Along a non-convex line the bracket holds *a* crossing: one below the bracket's lower
    end, with the loss back down by then, is not seen. Unbracketed results have NaN
    ``value``: the loss rose at every step tried (not a descent direction at this scale;
    ``t_lo`` = 0, ``upper`` = ∞) or at none (``t_hi`` = ∞, ``lower`` = 0: critical sharpness
    at most ``upper`` = 2/t_lo, and 0 if the loss never rises).
    """
    if not callable(loss_at):
        raise ValueError(f"loss_at must be callable as loss_at(t) -> float, got {loss_at!r}")
    lr = check_number("lr", lr, above=0.0)
    first = 1 if loss_at_zero is None else 0
    max_evals = check_int("max_evals", max_evals, minimum=first + 1)
    rel_tol = check_number("rel_tol", rel_tol, above=0.0, below=1.0)
    if not isinstance(loss_dtype, torch.dtype) or not loss_dtype.is_floating_point:
        raise ValueError(f"loss_dtype must be a floating torch.dtype, got {loss_dtype!r}")
    if margin is None:
        margin = LOSS_MARGIN_EPS * torch.finfo(loss_dtype).eps
    margin = check_number("margin", margin, at_least=0.0)
    zero = float(loss_at(0.0)) if loss_at_zero is None else float(loss_at_zero)
    if not math.isfinite(zero):
        name = "loss_at(0)" if loss_at_zero is None else "loss_at_zero"
        raise ValueError(f"{name} must be finite, got {zero!r}")
    search = _Search(loss_at, zero, margin * abs(zero), max_evals - first)
    _bracket(search, lr)
    if math.isfinite(search.t_hi) and search.t_lo > 0:
        _narrow(search, rel_tol)
    return _result(search, first)


def _bracket(search: _Search, lr: float) -> None:
    """Walks t = lr·2^k, up from lr while the loss does not rise, down while it does."""
    t = lr
    rose = search.probe(t)
    while search.left() > 0 and (search.t_lo == 0 or math.isinf(search.t_hi)):
        t = t / 2 if rose else t * 2
        rose = search.probe(t)


def _narrow(search: _Search, rel_tol: float) -> None:
    """Shrinks the bracket [t_lo, t_hi] to ``rel_tol`` relative width or the budget's end."""
    bisect = False
    while search.left() > 0 and (search.t_hi - search.t_lo) > rel_tol * search.t_lo:
        width = search.t_hi - search.t_lo
        root = None if bisect else _model_crossing(search)
        if root is None:
            search.probe(search.t_lo + width / 2)
            bisect = False
            continue
        # Move the end farther from the model's crossing, to just past it on that side.
        aim_low = root - search.t_lo > search.t_hi - root
        nudge = 1 - rel_tol / 4 if aim_low else 1 + rel_tol / 4
        inside = min(width / 16, rel_tol * search.t_lo / 8)  # keeps the probe off the ends
        t = min(max(root * nudge, search.t_lo + inside), search.t_hi - inside)
        rose = search.probe(t)
        bisect = rose == aim_low  # the model put the crossing on the wrong side of t


def _model_crossing(search: _Search) -> float | None:
    """Where f(t) = a·t + b·t², through f(0) = 0 and the bracket's two ends, reaches
    ``search.rise`` (exact on a quadratic); None when that model has no crossing inside the
    bracket."""
    t1, f1, t2, f2 = search.t_lo, search.f_lo, search.t_hi, search.f_hi
    if not (math.isfinite(f1) and math.isfinite(f2)):
        return None
    slope1, slope2 = f1 / t1, f2 / t2
    b = (slope2 - slope1) / (t2 - t1)
    a = slope1 - b * t1
    discriminant = a * a + 4 * b * search.rise
    if b <= 0 or discriminant < 0:
        return None
    root = (-a + math.sqrt(discriminant)) / (2 * b)
    return root if search.t_lo < root < search.t_hi else None


def _result(search: _Search, first: int) -> CriticalSharpness:
    t_lo, t_hi = search.t_lo, search.t_hi
    lower = 0.0 if math.isinf(t_hi) else 2 / t_hi
    upper = math.inf if t_lo == 0 else 2 / t_lo
    reason = ""
    if t_lo == 0:
        reason = (
            f"the loss rose at every step tried, down to t={t_hi:g}: not a descent direction "
            "at this scale"
        )
    elif math.isinf(t_hi):
        reason = f"the loss did not rise at any step tried, up to t={t_lo:g}"
    bracketed = not reason
    return CriticalSharpness(
        value=4 / (t_lo + t_hi) if bracketed else math.nan,
        lower=lower,
        upper=upper,
        t_lo=t_lo,
        t_hi=t_hi,
        num_evals=search.num_evals + first,
        bracketed=bracketed,
        reason=reason,
    )


def loss_along(
    module: nn.Module,
    params: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    direction: torch.Tensor | Sequence[torch.Tensor],
    loss_fn: Callable[[nn.Module, Any], Any],
    batch: Any,
) -> Callable[[float], float]:
    """``loss_at(t)``: ``loss_fn(module, batch)`` with ``params`` shifted by t·``direction``.

    ``direction`` is one flat tensor over ``params`` in their order (as the operators' flat
    vectors are), or one tensor per parameter. Each call runs under ``torch.no_grad()`` and
    restores every parameter BIT-EXACTLY by copying back a saved copy (θ + t·d − t·d is not
    θ in floating point), and the module's buffers likewise (normalization layers' running
    statistics), also when ``loss_fn`` raises, so training is untouched. The in-place
    writes do bump the tensors' version counters: call it between optimizer steps, not
    between a forward pass and its backward. The module is evaluated in whatever mode it is
    in (:func:`~lightning_curvature.measure.objective.measurement_mode` sets one): dropout
    left on makes the loss, and the crossing, random, and draws from the RNG. ``loss_fn``
    returns a scalar tensor or a mapping with a ``"loss"`` entry.
    """
    tensors = list(params.values()) if isinstance(params, Mapping) else list(params)
    if not tensors or not all(isinstance(p, torch.Tensor) for p in tensors):
        raise ValueError("params must be a non-empty name->tensor mapping or tensor sequence")
    steps = _direction_per_parameter(tensors, direction)
    if not callable(loss_fn):
        raise ValueError("loss_fn must be callable as loss_fn(module, batch)")

    def loss_at(t: float) -> float:
        with torch.no_grad():
            touched = tensors + list(module.buffers())
            saved = [x.detach().clone() for x in touched]
            try:
                for p, step in zip(tensors, steps, strict=True):
                    p.add_(step, alpha=t)
                return float(scalar_loss(loss_fn(module, batch)))
            finally:
                for x, original in zip(touched, saved, strict=True):
                    x.copy_(original)

    return loss_at


def _direction_per_parameter(
    tensors: list[torch.Tensor], direction: torch.Tensor | Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``direction`` split into one detached tensor per parameter, in its dtype and device."""
    if isinstance(direction, torch.Tensor):
        total = sum(p.numel() for p in tensors)
        if direction.dim() != 1 or direction.numel() != total:
            raise ValueError(
                f"direction must be a flat tensor of {total} entries (the parameters' "
                f"total), got shape {tuple(direction.shape)}"
            )
        parts = unflatten(direction.detach(), tensors)
    else:
        parts = [d.detach() for d in direction]
        if len(parts) != len(tensors) or any(
            d.numel() != p.numel() for d, p in zip(parts, tensors, strict=False)
        ):
            raise ValueError("direction must hold one tensor per parameter, of its size")
    return [
        d.reshape(p.shape).to(device=p.device, dtype=p.dtype)
        for d, p in zip(parts, tensors, strict=True)
    ]
