r"""AdaHessian (Yao et al., "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
Learning", AAAI 2021): Adam with the squared gradient replaced by a Hutchinson estimate of
the Hessian's diagonal.

For parameters :math:`\theta`, gradient :math:`g_t` and Rademacher probes :math:`z`
(entries ±1), each step (or each ``update_each``-th step) estimates
:math:`D_t = |\tfrac1s\sum_{j=1}^s z_j \odot H z_j|`, averaged over the spatial positions of
convolution kernels (one value per input/output channel pair), then

.. math:: m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
          v_t = \beta_2 v_{t-1} + (1-\beta_2) D_t^2,

.. math:: \theta_{t+1} = \theta_t - \eta\Big(\frac{m_t/(1-\beta_1^t)}
          {(\sqrt{v_t}/\sqrt{1-\beta_2^t})^k + \epsilon} + \lambda\,\theta_t\Big),

with Hessian power :math:`k` and decoupled weight decay :math:`\lambda`. This is the update
of the reference implementation (github.com/amirgholami/adahessian) and of
``torch_optimizer.Adahessian``.

The products :math:`Hz` come from the gradients' own graph (``loss.backward(create_graph=True)``)
through :class:`~lightning_curvature.GradientGraphOperator`, one batched double backward
for all of a step's probes, and the probes from the engine's Hutchinson estimator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_curvature._checks import check_int, check_number
from lightning_curvature.estimators import hutchinson_diagonal
from lightning_curvature.operators import GradientGraphOperator


class AdaHessian(Optimizer):
    r"""AdaHessian: Adam preconditioned by a Hutchinson estimate of the Hessian's diagonal.

    The loss must be back-propagated with ``create_graph=True`` on the steps that update
    the diagonal (``loss.backward(create_graph=True)``; in Lightning, mix
    :class:`HessianBackwardMixin` into the ``LightningModule``). The gradients' graph is
    freed (``grad.detach_()``) once the step has used it.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        lr: the learning rate η (> 0).
        betas: (β1, β2) in [0, 1), the moments' decay rates.
        eps: ε > 0 added to the denominator.
        weight_decay: decoupled weight decay λ ≥ 0 (as AdamW).
        hessian_power: k in [0, 1]; 1 is the paper's AdaHessian, 0 is Adam-like momentum
            SGD with a constant denominator.
        update_each: estimate the diagonal every this many steps (≥ 1) and reuse the last
            estimate in between (``create_graph`` is only needed on those steps).
        num_probes: Rademacher probes per estimate (≥ 1), sent as one block.
        average_conv_kernel: average the estimate over a convolution kernel's spatial
            dimensions (parameters with 3 or more dimensions), as the paper does.
        seed: seeds the probes; the probes of step ``t`` depend on ``seed`` and ``t`` only,
            so a resumed run draws the same ones. The global RNG is never drawn from.

    Raises:
        ValueError: an argument outside the ranges above (named, with its value).

    Example::

        >>> import torch
        >>> from lightning_curvature.optim import AdaHessian
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = AdaHessian(model.parameters(), lr=0.1)
        >>> loss = model(torch.randn(8, 3)).pow(2).mean()
        >>> loss.backward(create_graph=True)
        >>> optimizer.step()
        >>> optimizer.zero_grad()
    """

    # Its stability rule is Adam's, with the P of :meth:`preconditioner_diagonal`.
    stability_family = "AdaHessian"

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        *,
        update_each: int = 1,
        num_probes: int = 1,
        average_conv_kernel: bool = True,
        seed: int = 0,
    ) -> None:
        check_number("lr", lr, above=0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for index, beta in enumerate(betas):
            check_number(f"betas[{index}]", beta, at_least=0.0, below=1.0)
        check_number("eps", eps, above=0.0)
        check_number("weight_decay", weight_decay, at_least=0.0)
        check_number("hessian_power", hessian_power, at_least=0.0, at_most=1.0)
        self.update_each = check_int("update_each", update_each, 1)
        self.num_probes = check_int("num_probes", num_probes, 1)
        if not isinstance(average_conv_kernel, bool):
            raise ValueError(
                f"average_conv_kernel must be True or False, got {average_conv_kernel!r}"
            )
        self.average_conv_kernel = average_conv_kernel
        self.seed = check_int("seed", seed, 0)
        defaults = {
            "lr": float(lr),
            "betas": (float(betas[0]), float(betas[1])),
            "eps": float(eps),
            "weight_decay": float(weight_decay),
            "hessian_power": float(hessian_power),
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdaHessian step.

        Args:
            closure: re-evaluates the model and back-propagates with ``create_graph=True``
                (Lightning passes one); its return value is returned.

        Raises:
            RuntimeError: the gradients carry no graph on a step that estimates the
                diagonal (``create_graph=True`` was not used).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, groups = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    params.append(p)
                    groups.append(group)
        if not params:
            return loss
        step = self.state[params[0]].get("step", 0)
        if step % self.update_each == 0 or any("hessian_diag" not in self.state[p] for p in params):
            for p, diagonal in zip(params, self._hessian_diagonal(params, step), strict=True):
                self.state[p]["hessian_diag"] = diagonal
        for p, group in zip(params, groups, strict=True):
            p.grad.detach_()  # frees the graph and the parameter ↔ gradient reference cycle
            self._update(p, group)
        return loss

    def preconditioner_diagonal(
        self, params: Iterable[torch.Tensor] | None = None
    ) -> torch.Tensor | None:
        r"""The diagonal of P, the preconditioner of the last update, flat.

        The last update was :math:`\eta P^{-1} m_t` (plus weight decay) with
        :math:`P = (1-\beta_1^t)\,\big((\sqrt{v_t}/\sqrt{1-\beta_2^t})^k + \epsilon\big)`,
        the same convention as ``lightning_curvature.optim.preconditioners.preconditioner_diagonal``
        for Adam. The stability rule is Adam's: λmax(P⁻¹H)·η < 2(1+β1)/(1−β1) (38 at
        β1 = 0.9), λmax(P⁻¹H) computed as that of the symmetric P^-1/2 H P^-1/2. Decoupled
        weight decay λ adds about λ to every eigenvalue of P⁻¹H.

        Args:
            params: the parameters of the Hessian, in its flat order; ``None`` for every
                parameter of every group.

        Returns:
            P's diagonal (``params`` concatenated), or ``None`` before the first step.

        Raises:
            ValueError: a parameter this optimizer has no state for.
        """
        owners = {id(p): group for group in self.param_groups for p in group["params"]}
        if params is None:
            params = [p for group in self.param_groups for p in group["params"]]
        params = list(params)
        for index, p in enumerate(params):
            if id(p) not in owners:
                raise ValueError(
                    f"params[{index}] (shape {tuple(p.shape)}) is not in any param group of "
                    "this AdaHessian: pass only the parameters it updates"
                )
        if not any(self.state[p].get("step", 0) > 0 for p in params):
            return None
        pieces = []
        for index, p in enumerate(params):
            state = self.state[p]
            if state.get("step", 0) == 0:
                raise ValueError(
                    f"params[{index}] (shape {tuple(p.shape)}) has no AdaHessian state: it "
                    "has not been updated yet (frozen, or no gradient so far)"
                )
            group = owners[id(p)]
            pieces.append(
                (1 - group["betas"][0] ** state["step"])
                * self._denominator(state, group).reshape(-1)
            )
        return torch.cat(pieces)

    def _hessian_diagonal(self, params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        """|mean of z ⊙ Hz| per parameter, kernel-averaged, through the engine's Hutchinson."""
        grads = [p.grad for p in params]
        if not any(g is not None and g.requires_grad for g in grads):
            raise RuntimeError(
                "AdaHessian needs the gradients' graph: call loss.backward(create_graph=True) "
                "(in Lightning, mix HessianBackwardMixin into the LightningModule)"
            )
        with torch.enable_grad():
            op = GradientGraphOperator(params, grads)
            estimate = hutchinson_diagonal(
                op, self.num_probes, self.seed + step, probes_per_block=self.num_probes
            ).estimate
            op.release()
        diagonals = []
        for p, piece in zip(params, estimate.split([p.numel() for p in params]), strict=True):
            diagonal = piece.view_as(p).abs()
            if self.average_conv_kernel and p.ndim >= 3:
                diagonal = diagonal.mean(dim=tuple(range(2, p.ndim)), keepdim=True)
            diagonals.append(diagonal)
        return diagonals

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_hessian_diag_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        diagonal = state["hessian_diag"]
        state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
        state["exp_hessian_diag_sq"].mul_(beta2).addcmul_(diagonal, diagonal, value=1 - beta2)
        denominator = self._denominator(state, group)
        bias_correction1 = 1 - beta1 ** state["step"]
        update = state["exp_avg"] / bias_correction1 / denominator + group["weight_decay"] * p
        p.sub_(group["lr"] * update)

    @staticmethod
    def _denominator(state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        k = group["hessian_power"]
        bias_correction2 = 1 - group["betas"][1] ** state["step"]
        return (state["exp_hessian_diag_sq"].sqrt() ** k / math.sqrt(bias_correction2) ** k).add_(
            group["eps"]
        )


class HessianBackwardMixin:
    """Back-propagate with ``create_graph=True`` in a ``LightningModule``, for AdaHessian.

    Lightning's automatic optimization calls ``LightningModule.backward(loss)`` inside the
    closure it hands to ``optimizer.step``; this mix-in adds ``create_graph=True`` there.
    Put it before ``LightningModule`` in the bases::

        class Model(HessianBackwardMixin, pl.LightningModule):
            def configure_optimizers(self):
                return AdaHessian(self.parameters(), lr=0.15)

    Without Lightning, call ``loss.backward(create_graph=True)`` yourself.
    """

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        kwargs["create_graph"] = True
        super().backward(loss, *args, **kwargs)  # type: ignore[misc]
