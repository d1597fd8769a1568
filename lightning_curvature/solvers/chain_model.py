"""What a feed-forward chain computes, read for the structured solve in :mod:`.mlp_chain`.

``parse_chain`` checks that a model is an ``nn.Sequential`` of ``nn.Linear`` layers and
elementwise activations and splits it into layers and the activations between them;
``forward`` evaluates every layer's input, slope σ' and curvature σ'' (by ``torch.func`` on
the scalar activation, so any elementwise module works); ``head`` gives the loss's gradient
and per-sample Hessian blocks at the output; ``backward`` back-propagates the gradient
(the multipliers λ of the derivation). The matrix builders give the blocks of the
linearised chain that :mod:`.mlp_chain` factorises: ``B_l``, ``A_l``, ``S_l``, ``Q_l``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import grad, vmap

ELEMENTWISE = (
    nn.Identity,
    nn.Tanh,
    nn.Sigmoid,
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.Softplus,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.SiLU,
    nn.Mish,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Hardtanh,
    nn.ReLU6,
)
LOSSES = {"mse": nn.MSELoss, "cross_entropy": nn.CrossEntropyLoss}


@dataclass
class Layer:
    weight: torch.Tensor  # (w_out, w_in)
    has_bias: bool
    inputs: torch.Tensor  # z_{l-1}, (n, w_in)
    input_slope: torch.Tensor | None  # σ'_{l-1}(u_{l-1}), (n, w_in); None for layer 1
    input_curvature: torch.Tensor | None  # σ''_{l-1}(u_{l-1}), (n, w_in)
    adjoint: torch.Tensor | None = None  # λ_l, (n, w_out)

    @property
    def num_params(self) -> int:
        return self.weight.numel() + (self.weight.shape[0] if self.has_bias else 0)


def forward(
    linears: list[nn.Linear],
    activations: list[Callable[[torch.Tensor], torch.Tensor]],
    inputs: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[list[Layer], torch.Tensor]:
    """Pre-activations, slopes and curvatures of every layer; returns u_L too."""
    with torch.no_grad():
        z = activations[0](inputs)
        layers: list[Layer] = []
        slope = curvature = None
        for index, linear in enumerate(linears):
            weight = linear.weight.detach().to(dtype)
            layers.append(Layer(weight, linear.bias is not None, z, slope, curvature))
            u = z @ weight.T
            if linear.bias is not None:
                u = u + linear.bias.detach().to(dtype)
            if index + 1 < len(linears):
                z, slope, curvature = derivatives(activations[index + 1], u)
    return layers, u


def derivatives(
    activation: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """σ(u), σ'(u), σ''(u) elementwise, by torch.func on the scalar function."""
    flat = u.reshape(-1)
    first = vmap(grad(activation))(flat)
    second = vmap(grad(grad(activation)))(flat)
    return activation(u), first.view_as(u), second.view_as(u)


def head(
    activation: Callable[[torch.Tensor], torch.Tensor],
    loss: nn.Module,
    top: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """λ_L = ∇h and the per-sample blocks of ∇²h, h(U) = loss(σ_L(U), Y).

    MSE and cross-entropy are sums over samples, so ∇²h is block diagonal: its blocks are
    read off with one Hessian-vector product per output coordinate, each probing that
    coordinate in every sample at once.
    """
    width = top.shape[1]
    with torch.enable_grad():
        outputs = top.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(
            loss(activation(outputs), targets), outputs, create_graph=True
        )
        columns = []
        for j in range(width):
            direction = torch.zeros_like(top)
            direction[:, j] = 1.0
            (column,) = torch.autograd.grad(
                gradient, outputs, direction, retain_graph=True, allow_unused=True
            )
            columns.append(torch.zeros_like(top) if column is None else column)
    # columns[j][i, :] is column j of sample i's block.
    return gradient.detach(), torch.stack(columns, dim=2).detach()


def backward(layers: list[Layer], adjoint: torch.Tensor) -> None:
    """Back-propagate λ: λ_{l-1} = σ'_{l-1} ⊙ (W_lᵀ λ_l), stored on each layer."""
    for layer in reversed(layers):
        layer.adjoint = adjoint
        if layer.input_slope is not None:
            adjoint = layer.input_slope * (adjoint @ layer.weight)


def parse_chain(model: object) -> tuple[list[nn.Linear], list[Callable]]:
    """Linear layers, and the elementwise function before each one and after the last."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"model must be an nn.Sequential of nn.Linear layers and elementwise activations, "
            f"got {type(model).__name__}"
        )
    linears: list[nn.Linear] = []
    groups: list[list[nn.Module]] = [[]]
    for name, module in _leaves(model):
        if isinstance(module, nn.Linear):
            if any(module is seen for seen in linears):
                raise ValueError(
                    f"model must be a chain of distinct layers; its module {name!r} reuses an "
                    "earlier nn.Linear (shared weights)"
                )
            linears.append(module)
            groups.append([])
        elif isinstance(module, ELEMENTWISE):
            groups[-1].append(module)
        else:
            raise ValueError(
                f"model must be an nn.Sequential of nn.Linear layers and elementwise "
                f"activations ({', '.join(c.__name__ for c in ELEMENTWISE)}); its module "
                f"{name!r} is {type(module).__name__}"
            )
    if not linears:
        raise ValueError("model must contain at least one nn.Linear layer, got none")
    for index, linear in enumerate(linears[1:], start=1):
        if linear.in_features != linears[index - 1].out_features:
            raise ValueError(
                f"model's Linear layers do not chain: layer {index} has out_features "
                f"{linears[index - 1].out_features}, layer {index + 1} in_features "
                f"{linear.in_features}"
            )
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(f"every parameter of model must require grad; frozen: {frozen}")
    return linears, [_compose(group) for group in groups]


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    leaves = []
    # Not named_children(): it skips a module met twice, and a reused layer runs twice.
    for name, child in module._modules.items():
        if child is None:
            continue
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            leaves.extend(_leaves(child, path + "."))
        else:
            leaves.append((path, child))
    return leaves


def _compose(modules: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    def apply(t: torch.Tensor) -> torch.Tensor:
        for module in modules:
            t = module(t)
        return t

    return apply


def parse_loss(loss: object) -> nn.Module:
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)} as a string, got {loss!r}")
        return LOSSES[loss]()
    if not isinstance(loss, tuple(LOSSES.values())):
        raise ValueError(
            "loss must be nn.MSELoss(), nn.CrossEntropyLoss(), 'mse' or 'cross_entropy', got "
            f"{type(loss).__name__}"
        )
    reduction = getattr(loss, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss.reduction must be 'mean' or 'sum', got {reduction!r}")
    assert isinstance(loss, nn.Module)
    return loss


def parse_batch(batch, in_features, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError("batch must be a pair (inputs, targets)")
    inputs, targets = batch
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 2:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs)
        raise ValueError(f"batch's inputs must have shape (n, {in_features}), got {shape}")
    if inputs.shape[1] != in_features:
        raise ValueError(
            f"batch's inputs must have shape (n, {in_features}), got {tuple(inputs.shape)}"
        )
    if not isinstance(targets, torch.Tensor) or targets.shape[0] != inputs.shape[0]:
        raise ValueError("batch's targets must be a tensor with one row per input")
    if targets.is_floating_point():
        targets = targets.to(device=device, dtype=dtype)
    return inputs.to(device=device, dtype=dtype), targets.to(device)


def parse_rhs(b: object, dim: int, device, dtype) -> torch.Tensor:
    if not isinstance(b, torch.Tensor) or b.ndim not in (1, 2) or b.shape[0] != dim:
        shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
        raise ValueError(f"b must be a tensor of shape ({dim},) or ({dim}, m), got {shape}")
    if not b.is_floating_point() or (b.ndim == 2 and b.shape[1] == 0):
        raise ValueError(f"b must be a non-empty floating-point tensor, got {b.dtype}")
    b = b.to(device=device, dtype=dtype)
    return b[:, None] if b.ndim == 1 else b


# The chain's linearisation as matrices, samples in the leading position (see mlp_chain).


def parameter_tangent_map(layer: Layer) -> torch.Tensor:
    """``B_l``: δθ_l ↦ δu_l = δW z_{l-1} + δb for every sample, as an (n·w_out, p) matrix
    whose columns follow the flat order of ``weight`` (row-major) then ``bias``."""
    n, width_in = layer.inputs.shape
    width_out = layer.weight.shape[0]
    eye = torch.eye(width_out, device=layer.weight.device, dtype=layer.weight.dtype)
    weight_part = torch.einsum("rs,ic->irsc", eye, layer.inputs).reshape(
        n * width_out, width_out * width_in
    )
    if not layer.has_bias:
        return weight_part
    return torch.cat([weight_part, eye.repeat(n, 1)], dim=1)


def state_map(layer: Layer) -> torch.Tensor:
    """``A_l`` per sample: δu_{l-1} ↦ W_l (σ'_{l-1} ⊙ δu_{l-1}), shape (n, w_out, w_in)."""
    assert layer.input_slope is not None
    return layer.weight[None] * layer.input_slope[:, None, :]


def mixed_term(layer: Layer) -> torch.Tensor:
    """``S_l``: the bilinear term λ_lᵀ δW (σ'_{l-1} ⊙ δu_{l-1}), as (n·w_in, p)."""
    assert layer.input_slope is not None and layer.adjoint is not None
    n, width_in = layer.inputs.shape
    width_out = layer.weight.shape[0]
    eye = torch.eye(width_in, device=layer.weight.device, dtype=layer.weight.dtype)
    weight_part = torch.einsum("ir,ic,cd->icrd", layer.adjoint, layer.input_slope, eye)
    weight_part = weight_part.reshape(n * width_in, width_out * width_in)
    if not layer.has_bias:
        return weight_part
    return torch.cat([weight_part, weight_part.new_zeros(n * width_in, width_out)], dim=1)


def activation_curvature(layer: Layer) -> torch.Tensor:
    """``Q_l``'s diagonal: σ''_{l-1}(u_{l-1}) ⊙ W_lᵀλ_l, shape (n, w_in)."""
    assert layer.input_curvature is not None and layer.adjoint is not None
    return layer.input_curvature * (layer.adjoint @ layer.weight)


def apply_blocks(state_map: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``A V`` for per-sample blocks A (n, w_out, w_in) and V (n·w_in, m)."""
    n, _, width_in = state_map.shape
    return torch.einsum("iab,ibm->iam", state_map, vectors.reshape(n, width_in, -1)).reshape(
        -1, vectors.shape[1]
    )


def transpose_apply_blocks(state_map: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``Aᵀ V`` for per-sample blocks A (n, w_out, w_in) and V (n·w_out, m)."""
    n, width_out, _ = state_map.shape
    return torch.einsum("iab,iam->ibm", state_map, vectors.reshape(n, width_out, -1)).reshape(
        -1, vectors.shape[1]
    )


def congruence(state_map: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``Aᵀ P A`` with A block diagonal over samples, in O(n² w³) rather than O(n³ w³)."""
    n, width_out, width_in = state_map.shape
    blocks = matrix.reshape(n, width_out, n, width_out)
    left = torch.einsum("iab,iajc->ibjc", state_map, blocks)
    return torch.einsum("ibjc,jcd->ibjd", left, state_map).reshape(n * width_in, n * width_in)


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """(n, w, w) per-sample blocks as one (n·w, n·w) block-diagonal matrix."""
    n, width, _ = blocks.shape
    eye = torch.eye(n, device=blocks.device, dtype=blocks.dtype)
    return torch.einsum("ij,iab->iajb", eye, blocks).reshape(n * width, n * width)
