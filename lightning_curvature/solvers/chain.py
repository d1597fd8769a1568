r"""The exact solve of :math:`(H + \varepsilon I)x = b` for a feed-forward chain, linear in depth.

After Rahimi, "The Hessian of tall-skinny networks is easy to invert" (arXiv 2601.06096):
the Hessian of a deep narrow chain is dense, yet the Newton system is a block-banded one in
disguise. The derivation used here, and what each symbol is in the code:

**The chain.** ``nn.Sequential`` of ``L`` ``nn.Linear`` layers with elementwise activations
between them. Per sample :math:`i` of a batch of :math:`n`, with :math:`z_0 = x_i` (after any
leading activation),

.. math:: u_l = W_l z_{l-1} + b_l,\qquad z_l = \sigma_l(u_l)\ (l < L),\qquad
          F(\theta) = h(u_L),

where :math:`h(U_L) = \text{loss}(\sigma_L(U_L), Y)` is the mean (or summed) MSE or
cross-entropy over the batch, :math:`\sigma_L` any trailing activation. ``θ_l = (W_l, b_l)``.

**Constraints and multipliers.** Treat the pre-activations as unknowns tied by
:math:`c_l = W_l\sigma_{l-1}(u_{l-1}) + b_l - u_l = 0`. The Lagrangian
:math:`\mathcal{L} = h(u_L) + \sum_l \lambda_l^\top c_l` is stationary in :math:`u` at the
back-propagated gradients: :math:`\lambda_L = \nabla h`,
:math:`\lambda_{l-1} = \sigma'_{l-1}(u_{l-1}) \odot W_l^\top\lambda_l` (per sample, already
carrying the loss's 1/n). For tangents :math:`(\delta u, \delta\theta)` that satisfy the
linearised constraints :math:`\delta u_l = A_l\,\delta u_{l-1} + B_l\,\delta\theta_l` (forward
tangents: :math:`A_l = W_l\,\mathrm{diag}\,\sigma'_{l-1}` per sample,
:math:`B_l\,\delta\theta_l = \delta W_l z_{l-1} + \delta b_l`), the second variation of
:math:`\mathcal{L}` is exactly :math:`\delta\theta^\top H\,\delta\theta`:

.. math:: \tfrac12\delta\theta^\top H\delta\theta = \tfrac12\delta u_L^\top T\,\delta u_L
   + \sum_l \Big[\tfrac12\delta u_{l-1}^\top Q_l\,\delta u_{l-1}
   + \delta u_{l-1}^\top S_l\,\delta\theta_l\Big],

with :math:`T = \mathrm{blockdiag}_i \nabla^2 h` (per-sample output Hessians),
:math:`Q_l = \mathrm{diag}(\sigma''_{l-1}(u_{l-1}) \odot W_l^\top\lambda_l)` (the activations'
curvature weighted by the back-propagated gradient) and :math:`S_l` the mixed term
:math:`\lambda_l^\top \delta W_l(\sigma'_{l-1}\odot\delta u_{l-1})`. Equivalently,
:math:`H = J^\top T J + \dots` with :math:`J` the chain's Jacobian, the inverse of the
block-bidiagonal matrix :math:`M` (identity diagonal, :math:`-A_l` below it) applied to
:math:`B`: :math:`H` is a quadratic polynomial in :math:`M^{-1}`.

**Block-tridiagonal system.** :math:`(H + \varepsilon I)\delta\theta = b` is the KKT system of
this quadratic under the forward constraints, in the unknowns (δθ, forward tangents δu,
backward adjoints δλ). Ordered layer by layer, :math:`(\delta\theta_l, \delta u_l,
\delta\lambda_l)`, it is block tridiagonal: layer :math:`l` touches only layers
:math:`l \pm 1`. Its block LDU factorisation from the output backwards is the discrete
Riccati recursion of optimal control. With :math:`P_L = T`, :math:`q_L = 0`, for
:math:`l = L, \dots, 1`:

.. math:: R_l = \varepsilon I + B_l^\top P_l B_l,\quad N_l = S_l + A_l^\top P_l B_l,\quad
          g_l = b_l + B_l^\top q_l,

.. math:: P_{l-1} = Q_l + A_l^\top P_l A_l - N_l R_l^{-1} N_l^\top,\quad
          q_{l-1} = A_l^\top q_l - N_l R_l^{-1} g_l,

then forwards from :math:`\delta u_0 = 0`: :math:`\delta\theta_l = R_l^{-1}(g_l - N_l^\top
\delta u_{l-1})`, :math:`\delta u_l = A_l\delta u_{l-1} + B_l\delta\theta_l`. The pivots
:math:`R_l` are the successive Schur complements of :math:`H + \varepsilon I` in the order
:math:`\theta_L, \dots, \theta_1`, so by Sylvester's law the number of negative eigenvalues
of :math:`H + \varepsilon I` is the sum of theirs (reported). A pivot is singular only when
such a Schur complement is: never for a positive-definite system; for an indefinite one
(block elimination without pivoting across layers) it can happen, and the pivots' condition
numbers in the result say how close it came.

**Sizes.** ``a`` is the state size ``n · width`` (the batch's pre-activations of one layer:
samples are coupled through the shared weights, so the state is the whole batch's), ``p``
the parameters of one layer, ``width_out · (width_in + 1)``. Time
:math:`O(L\max(a, p)^3)`, memory :math:`O(L\max(a, p)^2)`, against :math:`O(L^3p^3)` time and
:math:`O(L^2p^2)` memory for the dense Hessian. :math:`B_l^\top P_l B_l` has rank at most
``a``, so when ``p > 2a`` (and ε > 0) each pivot is factorised in :math:`B_l`'s row space,
:math:`O(pa^2 + a^3)`, and the whole solve costs :math:`O(L(a^3 + a^2p))`: linear in
depth *and* in the layer's parameter count. Tall-skinny (deep, narrow, small batch) is
where it wins.

**Accuracy.** The elimination pivots layer by layer, never across layers; when ε is small
against an indefinite :math:`H` it can lose digits (the pivots' condition numbers say
how many). A few steps of iterative refinement on the true residual, measured with the
engine's Hessian-vector product, recover them (``refine``).

**Non-smooth activations.** ReLU and other piecewise-linear activations have
:math:`\sigma'' = 0` almost everywhere, as autograd says: :math:`Q_l = 0`, and :math:`H` is
the Hessian of the current linear region, the Gauss-Newton term plus the mixed terms
:math:`S_l` (first derivatives times back-propagated gradients), which do not vanish. The
kinks' Dirac masses are not part of it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_curvature._checks import check_int, check_number
from lightning_curvature.operators.hessian import HessianOperator
from lightning_curvature.solvers.chain_model import (
    backward,
    forward,
    head,
    parse_batch,
    parse_chain,
    parse_loss,
    parse_rhs,
)
from lightning_curvature.solvers.chain_riccati import factorize, substitute


@dataclass(frozen=True, eq=False)
class ChainSolveResult:
    """The exact solution of ``(H + εI)x = b`` for a chain, with its evidence.

    Attributes:
        x: the solution, shaped like ``b``, in the chain's flat parameter order
            (``model.parameters()``), on the model's device.
        relative_residual: ``‖(H + εI)x − b‖/‖b‖`` (largest over right-hand sides), checked
            with the engine's Hessian-vector product; ``None`` with ``check_residual=False``
            and ``refine=0``.
        pivot_condition_numbers: ``|μ|max/|μ|min`` of each pivot ``R_l``, layer 1 first
            (``inf`` for a singular one); ``()`` with ``diagnostics=False``.
        negative_eigenvalues: the number of negative eigenvalues of ``H + εI`` (Sylvester's
            inertia over the pivots); ``None`` with ``diagnostics=False``.
        num_layers: ``L``, the Linear layers.
        state_size: ``a``, the largest ``batch size × layer width``.
        block_size: ``p``, the most parameters in one layer.
        damping: the ε that was added.
    """

    x: torch.Tensor
    relative_residual: float | None
    pivot_condition_numbers: tuple[float, ...]
    negative_eigenvalues: int | None
    num_layers: int
    state_size: int
    block_size: int
    damping: float


def mlp_chain_solve(
    model: nn.Sequential,
    loss: nn.Module | str,
    batch: Sequence[torch.Tensor],
    b: torch.Tensor,
    damping: float = 1e-3,
    *,
    dtype: torch.dtype | None = None,
    diagnostics: bool = True,
    check_residual: bool = True,
    refine: int = 3,
) -> ChainSolveResult:
    r"""Solve ``(H + εI)x = b`` exactly for a feed-forward chain, in time linear in depth.

    ``H`` is the Hessian of the loss on ``batch`` (its mean, with the loss's default
    reduction) with respect to every parameter of ``model``, in ``model.parameters()``
    order. See the module docstring for the derivation.

    Args:
        model: ``nn.Sequential`` of ``nn.Linear`` layers (with or without bias) and
            elementwise activations (Tanh, Sigmoid, ReLU, GELU, Softplus, SiLU, ...),
            nested ``nn.Sequential`` allowed; every parameter must require grad.
        loss: ``nn.MSELoss()`` or ``nn.CrossEntropyLoss()`` (reduction ``"mean"`` or
            ``"sum"``), or ``"mse"`` / ``"cross_entropy"``.
        batch: ``(inputs, targets)``, inputs of shape ``(n, in_features)``.
        b: right-hand side, ``(dim,)`` or ``(dim, m)``, ``dim`` the number of parameters.
        damping: ε ≥ 0 (0 is allowed when ``H`` is nonsingular).
        dtype: precision of the factorisation; ``None`` is the model's (use
            ``torch.float64`` for ill-conditioned systems).
        diagnostics: compute each pivot's eigenvalues (condition numbers and the inertia
            of ``H + εI``); costs about five LU factorisations of a pivot.
        check_residual: recompute the true relative residual with Hessian-vector products
            (one per right-hand side).
        refine: at most this many steps of iterative refinement (each: one
            Hessian-vector product per right-hand side and one O(L·a·p) re-solve with the
            same factorisation), taken while they halve the residual; 0 for none. Block
            elimination without pivoting across layers can lose digits when ε is small
            against an indefinite H; refinement recovers them.

    Returns:
        A :class:`ChainSolveResult`.

    Raises:
        ValueError: a model that is not such a chain, an unsupported loss, or bad
            arguments (named, with the value and what is allowed).
        torch.linalg.LinAlgError: a singular pivot (the Schur complement of
            ``H + εI`` on the last layers is singular): raise the damping.

    Example::

        >>> import torch, lightning_curvature as lc
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2)).double()
        >>> batch = (torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))
        >>> dim = sum(p.numel() for p in model.parameters())
        >>> res = lc.mlp_chain_solve(model, "cross_entropy", batch,
        ...                          torch.ones(dim, dtype=torch.float64), damping=0.1)
        >>> res.relative_residual < 1e-12
        True
    """
    linears, activations = parse_chain(model)
    loss_module = parse_loss(loss)
    damping = check_number("damping", damping, at_least=0.0)
    for name, flag in (("diagnostics", diagnostics), ("check_residual", check_residual)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    refine = check_int("refine", refine, 0)
    dtype, inputs, targets, rhs = _inputs(model, linears[0].in_features, batch, b, dtype)

    layers, top = forward(linears, activations, inputs, dtype)
    adjoint, output_hessian = head(activations[-1], loss_module, top, targets)
    backward(layers, adjoint)
    offsets = [0]
    for layer in layers:
        offsets.append(offsets[-1] + layer.num_params)
    stages, spectra = factorize(layers, output_hessian, damping, diagnostics)
    x = substitute(stages, rhs, offsets)

    conditions, negatives = _pivot_diagnostics(spectra, dtype) if diagnostics else ((), None)
    residual = None
    if check_residual or refine:
        x, residual = _refine(
            stages, offsets, model, loss_module, (inputs, targets), x, rhs, damping, refine
        )
    n = inputs.shape[0]
    return ChainSolveResult(
        x=x[:, 0] if b.ndim == 1 else x,
        relative_residual=residual,
        pivot_condition_numbers=conditions,
        negative_eigenvalues=negatives,
        num_layers=len(layers),
        state_size=max(n * lin.out_features for lin in linears),
        block_size=max(layer.num_params for layer in layers),
        damping=damping,
    )


def _inputs(
    model: nn.Module, in_features: int, batch: Any, b: Any, dtype: torch.dtype | None
) -> tuple[torch.dtype, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The factorisation's dtype, the batch and the right-hand side (as columns), checked,
    on the model's device."""
    params = list(model.parameters())
    device = params[0].device
    dtype = params[0].dtype if dtype is None else dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    inputs, targets = parse_batch(batch, in_features, device, dtype)
    rhs = parse_rhs(b, sum(p.numel() for p in params), device, dtype)
    return dtype, inputs, targets, rhs


def _refine(stages, offsets, model, loss, batch, x, rhs, damping, steps):
    """Iterative refinement on the true residual, measured with the engine's
    Hessian-vector product (independent of the structured factorisation): ``x += solve(r)``
    while it lowers the residual, at most ``steps`` times. Returns x and its residual."""

    def loss_fn(module: nn.Module, pair: Any) -> torch.Tensor:
        return loss(module(pair[0]), pair[1])

    norms = torch.linalg.vector_norm(rhs, dim=0)
    norms = torch.where(norms > 0, norms, 1.0)
    with HessianOperator(model, loss_fn, [batch], dtype=rhs.dtype) as op:

        def residual_of(candidate: torch.Tensor) -> torch.Tensor:
            return rhs - op.matmat(candidate) - damping * candidate

        residual = residual_of(x)
        worst = float((torch.linalg.vector_norm(residual, dim=0) / norms).max())
        for _ in range(steps):
            candidate = x + substitute(stages, residual, offsets)
            candidate_residual = residual_of(candidate)
            relative = torch.linalg.vector_norm(candidate_residual, dim=0) / norms
            if float(relative.max()) >= 0.5 * worst:
                break  # refinement no longer pays (or the factorisation is too inaccurate)
            x, residual, worst = candidate, candidate_residual, float(relative.max())
    return x, worst


def _pivot_diagnostics(
    spectra: list[torch.Tensor], dtype: torch.dtype
) -> tuple[tuple[float, ...], int]:
    """Each pivot's condition number (a warning when they leave few correct digits) and the
    number of negative eigenvalues of H + εI (Sylvester: the sum of the pivots')."""
    conditions = tuple(_condition(mu) for mu in spectra)
    _warn_if_ill_conditioned(conditions, dtype)
    return conditions, int(sum(int((mu < 0).sum()) for mu in spectra))


def _condition(spectrum: torch.Tensor) -> float:
    magnitude = spectrum.abs()
    smallest = float(magnitude.min())
    return float(magnitude.max()) / smallest if smallest > 0 else float("inf")


def _warn_if_ill_conditioned(conditions: tuple[float, ...], dtype: torch.dtype) -> None:
    worst = max(conditions)
    # Past 1/(1000·eps) fewer than three digits of x are trustworthy.
    if worst * torch.finfo(dtype).eps > 1e-3:
        layer = conditions.index(worst) + 1
        warnings.warn(
            f"the pivot of layer {layer} has condition number {worst:.3g} in {dtype}: the "
            "solution may have few correct digits; raise the damping or use dtype=torch.float64",
            RuntimeWarning,
            stacklevel=4,  # the caller of mlp_chain_solve
        )
