"""How a :class:`~lightning_curvature.operators.hessian.HessianOperator` checks its
products, and what it does when a check fails.

The first product block of an operator carries one random column more: symmetry
(``uᵀ(Hv)`` against ``vᵀ(Hu)``) and a central difference along ``v`` test it, at the price of
that column and two gradients (the one at θ comes from the kept graph). A pass is
remembered per model, loss, method and parameters (:data:`~.checks.PASSED`); a failure
switches ``"auto"`` to finite differences with one warning, or raises when the method was
asked for by name. :class:`ProductChecks` is a mixin: it reads the operator's state.
"""

from __future__ import annotations

import numbers
import warnings
from typing import TYPE_CHECKING, Any

import torch

from lightning_curvature.operators.checks import (
    FINITE_DIFFERENCE_TOLERANCE,
    PASSED,
    HvpCheck,
    UnreliableProductError,
    check_key,
    explain_failure,
    judge_products,
)
from lightning_curvature.operators.products import gradients_along

# The seed of the check's random probe (see ProductChecks._checked_products).
CHECK_SEED = 2**31 - 1


class ProductChecks:
    """``check()``, the first block's check, and giving a method up."""

    # Set by the operator (typed there).
    dim: int
    device: torch.device
    dtype: torch.dtype
    num_matvecs: int
    params: Any
    param_names: Any
    loss_fn: Any
    last_check: HvpCheck | None
    _method: str
    _requested: str
    _fallback_reason: str | None
    _gradients: Any
    _checked_model: Any

    if TYPE_CHECKING:  # provided by the operator and by BatchEvaluation

        def _products(self, block: torch.Tensor) -> torch.Tensor: ...
        def _gradient_at(self, values: Any) -> Any: ...
        def _held_gradient(self) -> torch.Tensor | None: ...
        def _custom_functions(self) -> list[str]: ...

    def check(self, seed: int = 0) -> HvpCheck:
        r"""Check the products of :attr:`method_used` on random vectors drawn from ``seed``.

        Two products :math:`Hu, Hv` (one block) and three first-order gradients, at
        :math:`\theta` and :math:`\theta \pm \epsilon v`: :math:`u^\top Hv` against
        :math:`v^\top Hu`, and :math:`Hv` against the central difference
        :math:`(\nabla L(\theta + \epsilon v) - \nabla L(\theta - \epsilon v)) / 2\epsilon`,
        forgiving the difference its own inexactness (see :class:`HvpCheck`). Never raises
        for a product that fails: the failure is the result's ``cause``. Products by
        ``"finite_difference"`` use first-order gradients alone, so they cannot drop a path;
        their check reports the errors and fails only on non-finite values.

        Example::

            >>> op.check().passed  # doctest: +SKIP
            True
        """
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got {seed!r}")
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        probes = torch.randn(self.dim, 2, generator=generator, device=self.device, dtype=self.dtype)
        method = self._method
        try:
            self.num_matvecs += 2
            products = self._products(probes)
            gradients, step = gradients_along(self._gradient_at, self.params, probes[:, 1])
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:
            nan = float("nan")
            result = HvpCheck(False, nan, nan, nan, explain_failure(error, method), method, 2, 3)
        else:
            result = judge_products(probes, products, gradients, step, method, [])
            if not result.passed:  # name the suspects, at the price of one more forward pass
                suspects = self._custom_functions()
                result = judge_products(probes, products, gradients, step, method, suspects)
        self.last_check = result
        return result

    def _check_key(self) -> object:
        return check_key(self.loss_fn, self._method, self.param_names, self.dtype, self.device)

    def _checked_products(self, block: torch.Tensor) -> torch.Tensor | None:
        """``H V``, checked on the way: the block's product with one random column ``u``
        appended, ``uᵀ(Hv)`` against ``vᵀ(Hu)`` for the block's first column ``v``, and
        ``Hv`` against the central difference along ``v`` (two gradients; the one at θ
        comes from the kept graph). Returns ``None`` when the check failed (the method has
        been given up, or this raised); remembers a pass."""
        # Not seed 0: estimators draw their start vectors from small seeds, and u = v would
        # make the symmetry test trivial.
        generator = torch.Generator(device=self.device).manual_seed(CHECK_SEED)
        probes = torch.randn(self.dim, 2, generator=generator, device=self.device, dtype=self.dtype)
        u, v = probes[:, :1], probes[:, 1:]
        extra = [u, v]
        if bool(block[:, 0].any()):  # else a zero column probes nothing: use a random one
            v, extra = block[:, :1], [u]
        method = self._method
        cost = (len(extra), 3)
        try:
            self.num_matvecs += len(extra)
            products = self._products(torch.cat([block, *extra], dim=1))
            center = self._held_gradient()
            cost = (len(extra), 3 if center is None else 2)
            gradients, step = gradients_along(self._gradient_at, self.params, v[:, 0], center)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:
            nan = float("nan")
            result = HvpCheck(False, nan, nan, nan, explain_failure(error, method), method, *cost)
        else:
            m = block.shape[1]
            hv = products[:, m + 1] if len(extra) == 2 else products[:, 0]
            pair = torch.cat([u, v], dim=1)
            pair_products = torch.stack([products[:, m], hv], dim=1)
            result = judge_products(pair, pair_products, gradients, step, method, [], cost)
            if not result.passed:  # name the suspects, at the price of one more forward pass
                suspects = self._custom_functions()
                result = judge_products(
                    pair, pair_products, gradients, step, method, suspects, cost
                )
        self.last_check = result
        if result.passed:
            PASSED.remember(self._checked_model, self._check_key(), result)
            # Contiguous, as a fresh product is: collectives (all_reduce) need it.
            return products[:, : block.shape[1]].contiguous()
        assert result.cause is not None
        self._give_up(result.cause)
        return None

    def _give_up(self, reason: str, error: BaseException | None = None) -> None:
        """The method in use is unreliable: raise when it was asked for, else switch
        ``"auto"`` to finite differences with one warning."""
        if self._requested != "auto":
            raise UnreliableProductError(reason) from error
        self._fallback_reason = reason
        self._method = "finite_difference"
        self._gradients = None
        caveat = ""
        uncertainty = self.last_check.finite_difference_uncertainty if self.last_check else 0.0
        if uncertainty > FINITE_DIFFERENCE_TOLERANCE[self.dtype]:
            caveat = (
                f" Beware: in {str(self.dtype).removeprefix('torch.')} they are inexact on this "
                "model (the step crosses kinks such as ReLU, or rounding dominates); pass "
                "dtype=torch.float64 for accurate products."
            )
        warnings.warn(
            f"HessianOperator: {reason}. Falling back to finite differences of the gradient "
            "(two gradients per product); pass hvp_method='finite_difference' to choose it "
            f"and silence this warning.{caveat}",
            stacklevel=4,
        )
