"""The block LDU factorisation of the chain's KKT system, the discrete Riccati recursion,
and the solve with it (the derivation is in :mod:`~lightning_curvature.solvers.chain`).

:func:`factorize` sweeps backwards from the output, factorising each layer's pivot
``R_l = εI + B_lᵀP_lB_l`` (in ``B_l``'s row space when that is much smaller);
:func:`substitute` solves for any right-hand side with the factors, in O(L·a·p).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lightning_curvature.solvers.chain_model import (
    Layer,
    activation_curvature,
    apply_blocks,
    block_diagonal,
    congruence,
    mixed_term,
    parameter_tangent_map,
    state_map,
    transpose_apply_blocks,
)

# A pivot with more than this many times as many parameters as B has rows is handled in
# B's row space (see factor_pivot).
LOW_RANK_RATIO = 2


@dataclass
class Stage:
    """One layer's share of the factorisation: its pivot's solve, ``B_l``, ``A_l``, ``N_l``
    and the gain ``R_l⁻¹N_lᵀ`` (the last three absent for layer 1)."""

    solve_pivot: Callable[[torch.Tensor], torch.Tensor]
    tangent_map: torch.Tensor
    transition: torch.Tensor | None = None  # A_l
    coupling: torch.Tensor | None = None
    gain: torch.Tensor | None = None


def factorize(
    layers: list[Layer], output_hessian: torch.Tensor, damping: float, diagnostics: bool
) -> tuple[list[Stage], list[torch.Tensor]]:
    """The backward Riccati sweep: every pivot factorised, layer 1 first in the result."""
    riccati = block_diagonal(output_hessian)  # P_L = T, (n·w_L, n·w_L)
    stages, spectra, failures = [], [], []
    for index in range(len(layers) - 1, -1, -1):
        layer = layers[index]
        tangent_map = parameter_tangent_map(layer)  # B_l, (a_l, p_l)
        pb = riccati @ tangent_map
        solve_pivot, spectrum, info = factor_pivot(riccati, tangent_map, pb, damping, diagnostics)
        if spectrum is not None:
            spectra.append(spectrum)
        failures.append(info)  # checked once at the end: no host sync per layer
        if index == 0:
            stages.append(Stage(solve_pivot, tangent_map))
            break
        transition = state_map(layer)  # A_l per sample, (n, w_l, w_{l-1})
        coupling = mixed_term(layer) + transpose_apply_blocks(transition, pb)  # N_l, (a_{l-1}, p_l)
        gain = solve_pivot(coupling.mT)  # R⁻¹Nᵀ
        stages.append(Stage(solve_pivot, tangent_map, transition, coupling, gain))
        riccati = congruence(transition, riccati) - coupling @ gain
        riccati = 0.5 * (riccati + riccati.mT)
        riccati.diagonal().add_(activation_curvature(layer).reshape(-1))  # + Q_l
    stages.reverse()
    spectra.reverse()
    singular = torch.stack(failures).flip(0).nonzero()
    if singular.numel():
        layer_number = int(singular[0, 0]) + 1
        raise torch.linalg.LinAlgError(
            f"the pivot of layer {layer_number} (of {len(layers)}) is singular: the Schur "
            "complement of H + εI on the layers from there to the output has a zero "
            "eigenvalue; raise the damping"
        )
    return stages, spectra


def substitute(stages: list[Stage], rhs: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Solve with the factorisation: backwards for ``q_l`` and ``R_l⁻¹g_l``, then forwards
    for the tangents δu_l and the steps δθ_l. O(L·a·p) per right-hand side."""
    linear = rhs.new_zeros(stages[-1].tangent_map.shape[0], rhs.shape[1])  # q_L = 0
    feedforwards = []
    for index in range(len(stages) - 1, -1, -1):
        stage = stages[index]
        local = rhs[offsets[index] : offsets[index + 1]] + stage.tangent_map.mT @ linear
        feedforward = stage.solve_pivot(local)
        feedforwards.append(feedforward)
        if stage.transition is not None:
            assert stage.coupling is not None  # set with the transition
            linear = transpose_apply_blocks(stage.transition, linear) - stage.coupling @ feedforward
    feedforwards.reverse()
    pieces, state = [], None
    for stage, feedforward in zip(stages, feedforwards, strict=True):
        if state is None:
            step = feedforward
            pieces.append(step)
            state = stage.tangent_map @ step
            continue
        assert stage.gain is not None and stage.transition is not None  # all but layer 1
        step = feedforward - stage.gain @ state
        pieces.append(step)
        state = apply_blocks(stage.transition, state) + stage.tangent_map @ step
    return torch.cat(pieces)


def factor_pivot(
    riccati: torch.Tensor,
    tangent_map: torch.Tensor,
    pb: torch.Tensor,
    damping: float,
    diagnostics: bool,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor | None, torch.Tensor]:
    """Factor the pivot ``R = εI + BᵀPB`` (p × p); returns its solve, its eigenvalues (with
    ``diagnostics``) and a nonzero tensor when it is singular.

    ``BᵀPB`` has rank at most ``a`` (the rows of B). When ``p > 2a`` and ε > 0 the pivot is
    handled in B's row space: with the thin QR ``Bᵀ = QT`` (Q p × a orthonormal),
    ``R = Q(εI + TPTᵀ)Qᵀ + ε(I − QQᵀ)``, so
    ``R⁻¹X = Q(εI + TPTᵀ)⁻¹QᵀX + ε⁻¹(X − QQᵀX)`` in O(pa² + a³) instead of O(p³), and R's
    eigenvalues are those of the a × a matrix ``εI + TPTᵀ`` and ε (p − a times). Both
    pieces are orthogonal projections: no cancellation, unlike Woodbury's identity.
    """
    rows, size = tangent_map.shape
    if damping > 0 and size > LOW_RANK_RATIO * rows:
        basis, triangle = torch.linalg.qr(tangent_map.mT)  # Bᵀ = QT
        inner = triangle @ riccati @ triangle.mT
        inner = 0.5 * (inner + inner.mT)
        inner.diagonal().add_(damping)
        values, vectors = torch.linalg.eigh(inner)

        def solve(block: torch.Tensor) -> torch.Tensor:
            coordinates = basis.mT @ block
            inside = vectors @ ((vectors.mT @ coordinates) / values[:, None])
            return basis @ inside + (block - basis @ coordinates) / damping

        spectrum = None
        if diagnostics:
            spectrum = torch.cat([values, values.new_full((size - rows,), damping)])
        return solve, spectrum, (values == 0).sum()

    pivot = tangent_map.mT @ pb
    pivot = 0.5 * (pivot + pivot.mT)
    pivot.diagonal().add_(damping)
    factors = torch.linalg.lu_factor_ex(pivot)
    spectrum = torch.linalg.eigvalsh(pivot) if diagnostics else None
    return (
        lambda block: torch.linalg.lu_solve(factors.LU, factors.pivots, block),
        spectrum,
        factors.info,
    )
