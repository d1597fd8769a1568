r"""The ways one Hessian-vector product is computed, on tensors alone (no operator state).

* :func:`products_from_graph` differentiates a gradient that carries its graph
  (``create_graph=True``) once more: :math:`Hv = \nabla_\theta (g^\top v)`. A block of ``m``
  columns is one batched backward pass (``is_grads_batched``, a vmap over the backward)
  when every op on the graph has a batching rule, and ``m`` plain backward passes otherwise.
* :func:`finite_difference_products` needs first-order gradients only (``gradient_at``):
  central differences :math:`(\nabla L(\theta + \epsilon v) - \nabla L(\theta - \epsilon v))
  / 2\epsilon`, with :math:`\epsilon` from :func:`finite_difference_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

GradientAt = Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor | None]]


def flatten(tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat vector from per-parameter tensors; ``None`` (an unused parameter) is zeros."""
    return torch.cat(
        [
            torch.zeros(p.numel(), device=p.device, dtype=p.dtype) if t is None else t.reshape(-1)
            for t, p in zip(tensors, like, strict=True)
        ]
    )


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of a flat vector (or of the rows of a (dim, m) block) shaped like ``like``."""
    pieces = torch.split(vector, [p.numel() for p in like], dim=0)
    if vector.ndim == 1:
        return [piece.view_as(p) for piece, p in zip(pieces, like, strict=True)]
    return [piece for piece in pieces]


def batch_columns_by_default(device: torch.device) -> bool:
    """Whether a block of products is one batched backward pass by default on ``device``.

    Not on a CPU: there the vmapped backward measured no faster per column than one backward
    per column, and up to 1.3x slower (benchmarks/RESULTS.md, "Hessian-vector products");
    on accelerators one pass saves a kernel launch per column and per op."""
    return device.type != "cpu"


def products_from_graph(
    gradients: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor],
    block: torch.Tensor,
    batched: bool = True,
) -> tuple[torch.Tensor, str | None]:
    """``H V`` for a (dim, m) block, by differentiating ``gradients`` (one per parameter,
    with their graph) against ``params`` again; ``batched``: try one batched backward pass
    for the whole block first.

    Returns the (dim, m) product and, when the batched backward pass failed and the columns
    were computed one by one, the reason (``None`` otherwise). The graph is kept, so the
    same gradients serve every later product. Gradients that do not depend on the parameters
    (``None``, or no graph) contribute zero rows to the product's input side; parameters the
    gradients do not reach get zero rows in the output.
    """
    m = block.shape[1]
    outputs, grad_outputs = [], []
    for gradient, piece in zip(
        gradients, torch.split(block, [p.numel() for p in params]), strict=True
    ):
        if gradient is not None and gradient.requires_grad:
            outputs.append(gradient.reshape(-1))
            grad_outputs.append(piece)
    if not outputs:
        return torch.zeros_like(block), None  # the gradient is constant: H = 0
    reason = None
    if m > 1 and batched:
        try:
            per_param = torch.autograd.grad(
                outputs,
                list(params),
                grad_outputs=[piece.mT.contiguous() for piece in grad_outputs],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        except RuntimeError as error:  # an op on the graph has no batching rule
            reason = f"batched backward failed ({_first_line(error)}); columns one by one"
        else:
            # Unused parameters get None (materialize_grads would drop the batch dimension).
            return torch.cat(
                [
                    torch.zeros(m, p.numel(), device=block.device, dtype=block.dtype)
                    if g is None
                    else g.reshape(m, -1)
                    for g, p in zip(per_param, params, strict=True)
                ],
                dim=1,
            ).mT, None
    columns = []
    for j in range(m):
        grads = torch.autograd.grad(
            outputs,
            list(params),
            grad_outputs=[piece[:, j] for piece in grad_outputs],
            retain_graph=True,
            allow_unused=True,
        )
        columns.append(flatten(grads, params))
    if m == 1:  # a view, not a copy: most products are single columns
        return columns[0][:, None], reason
    return torch.stack(columns, dim=1), reason


def parameter_ranges(
    params: Sequence[torch.Tensor], pieces: Sequence[slice]
) -> list[tuple[int, int]] | None:
    """For each slice of the flat vector, the range ``(first, stop)`` of the parameters it
    holds whole; ``None`` when a slice cuts through a parameter."""
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    where = {offset: index for index, offset in enumerate(offsets)}
    ranges = []
    for piece in pieces:
        first, stop = where.get(piece.start), where.get(piece.stop)
        if first is None or stop is None:
            return None
        ranges.append((first, stop))
    return ranges


def diagonal_products_from_graph(
    gradients: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor],
    pieces: Sequence[tuple[slice, tuple[int, int]]],
    packed: torch.Tensor,
    batched: bool = True,
) -> torch.Tensor:
    """Each diagonal block's ``H_ll x_l``: for every ``(slice, (first, stop))`` in
    ``pieces``, the gradients of parameters ``first..stop`` differentiated against those
    parameters alone, along ``packed[slice]``. Autograd then walks only the part of the
    graph between them, where a full product on the masked vector walks all of it (on a
    CPU the masked products made per-layer λmax 3× slower than one operator per layer).
    Rows outside every slice are zero."""
    result = torch.zeros_like(packed)
    for piece, (first, stop) in pieces:
        result[piece], _ = products_from_graph(
            gradients[first:stop], params[first:stop], packed[piece], batched
        )
    return result


# The step of a central difference, relative to the parameters' scale (see
# finite_difference_step), per dtype; measured in benchmarks/RESULTS.md ("Hessian-vector
# products"), relative errors against the float64 double-backward product.
RELATIVE_STEP = {torch.float32: 5e-5, torch.float64: 1e-9}


def finite_difference_step(params: Sequence[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    r"""The step :math:`\epsilon` of a central difference along ``v`` (a 0-dim tensor on
    ``v``'s device, so choosing it costs no host sync).

    The perturbation :math:`\epsilon v` is given a root-mean-square size of :math:`s` times
    the parameters' (at least 1, so parameters near zero still move):

    .. math:: \epsilon = s \, \frac{\max(1, \|\theta\|_{rms}) \sqrt{d}}{\|v\|}

    with :math:`s` from ``RELATIVE_STEP``, about :math:`\sqrt{u}/5` in float32 and
    :math:`\sqrt{u}/15` in float64 (:math:`u` the unit roundoff), far below the textbook
    :math:`u^{1/3}` that balances truncation (:math:`O(\epsilon^2)`) against rounding
    (:math:`O(u/\epsilon)`) for a unit-scale function. Networks are not unit-scale: along
    their sharpest directions the gradient changes fast, and the truncation error there is
    what λmax sees. Measured on the tanh digits MLP in float32 (benchmarks/RESULTS.md): the
    product along the top eigenvector is off by 13% at :math:`s = 10^{-3}`, 3.6% at
    :math:`5\cdot 10^{-4}` and 0.16% at :math:`5\cdot 10^{-5}` (λmax by Lanczos: 5.5%, 1.5%,
    1.6e-4), while random directions stay within 2e-4. In float64 a step that small also
    rarely crosses a kink of ReLU or max-pooling, where the gradient jumps: ReLU MLP 8e-9,
    against O(1) at :math:`u^{1/3}`. In float32 no step avoids the kinks on a large batch:
    there finite differences measure a smoothed Hessian, O(1) away from autograd's.
    A zero ``v`` gets a step of 1.
    """
    dim = sum(p.numel() for p in params)
    with torch.no_grad():
        squares = torch.stack([p.detach().to(v.dtype).square().sum() for p in params]).sum()
        return step_from_norms(squares, torch.linalg.vector_norm(v), dim, v.dtype)


def step_from_norms(
    squares: torch.Tensor,
    norm_v: torch.Tensor,
    dim: int,
    dtype: torch.dtype,
    relative: float | None = None,
) -> torch.Tensor:
    """The step of :func:`finite_difference_step` from the norms alone: ``squares`` the sum
    of squares of the parameters, ``norm_v`` the norm of the direction (0-dim tensors, or
    1-dim for one step per direction), ``dim`` the parameters' count, ``dtype`` the one
    whose ``RELATIVE_STEP`` applies unless ``relative`` gives :math:`s` itself. Operators
    whose vectors are sharded over ranks pass the global sums (so every rank takes the same
    step)."""
    rms = (squares / dim).sqrt().clamp(min=1.0)
    scale = RELATIVE_STEP.get(dtype, 5e-4) if relative is None else relative
    step = scale * rms * dim**0.5 / norm_v
    return torch.where(norm_v > 0, step, torch.ones_like(step))


def finite_difference_products(
    gradient_at: GradientAt,
    params: Sequence[torch.Tensor],
    block: torch.Tensor,
) -> torch.Tensor:
    """``H V`` by central differences of first-order gradients, column by column:
    two gradient evaluations per column. ``gradient_at(values)`` returns the gradient of the
    loss (one tensor per parameter, ``None`` where unused) with the parameters replaced by
    ``values``."""
    base = [p.detach().to(block.dtype) for p in params]
    columns = []
    for j in range(block.shape[1]):
        column = block[:, j]
        step = finite_difference_step(base, column)
        shift = unflatten(column * step, base)
        plus = gradient_at([b + s for b, s in zip(base, shift, strict=True)])
        minus = gradient_at([b - s for b, s in zip(base, shift, strict=True)])
        columns.append((flatten(plus, base) - flatten(minus, base)) / (2 * step))
    return torch.stack(columns, dim=1)


def gradients_along(
    gradient_at: GradientAt,
    params: Sequence[torch.Tensor],
    v: torch.Tensor,
    center: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat gradients at θ - εv, θ and θ + εv as the columns of a (dim, 3) block, with
    the step ε of :func:`finite_difference_step` (for checking products against them).
    ``center``: the flat gradient at θ when the caller already holds it (one gradient
    fewer)."""
    base = [p.detach().to(v.dtype) for p in params]
    step = finite_difference_step(base, v)
    shift = unflatten(v * step, base)
    minus = flatten(gradient_at([b - s for b, s in zip(base, shift, strict=True)]), base)
    if center is None:
        center = flatten(gradient_at(base), base)
    plus = flatten(gradient_at([b + s for b, s in zip(base, shift, strict=True)]), base)
    return torch.stack([minus, center, plus], dim=1), step


def forward_over_reverse_products(
    loss_at: Callable[..., torch.Tensor], params: Sequence[torch.Tensor], block: torch.Tensor
) -> torch.Tensor:
    """``H V`` of ``loss_at(*values)`` at the parameters' values: ``torch.func.jvp`` of
    ``torch.func.grad``, one forward-mode pass per column."""
    primals = tuple(p.detach() for p in params)
    gradient = torch.func.grad(loss_at, argnums=tuple(range(len(primals))))
    columns = []
    for j in range(block.shape[1]):
        hv = torch.func.jvp(gradient, primals, tuple(unflatten(block[:, j], primals)))[1]
        columns.append(torch.cat([h.reshape(-1) for h in hv]))
    return torch.stack(columns, dim=1)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
