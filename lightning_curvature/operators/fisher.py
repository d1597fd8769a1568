r"""The Fisher of the mean loss over probe batches, true (Monte Carlo) or empirical: the
Gauss-Newton operator of :mod:`.ggn` with the output-space curvature replaced by the
expected (or observed) outer product of the loss's output gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Integral
from typing import Any

import torch
from torch import nn

from lightning_curvature.operators.ggn import (
    GGNOperator,
    LossFromOutput,
    OutputFn,
    ProductMethod,
)
from lightning_curvature.operators.names import FISHER_KINDS, FisherKind
from lightning_curvature.operators.output_space import (
    empirical_fisher,
    true_fisher,
)


class FisherOperator(GGNOperator):
    r"""The Fisher of the mean loss over probe batches: true (Monte Carlo) or empirical.

    .. math:: F = \frac1P \sum_p J_p^\top \, \mathbb{E}[r_p r_p^\top] \, J_p,
        \qquad r_p = \nabla_{f_p} \ell_p(f_p, y_p)

    with ``y_p`` the labels (``kind="empirical"``) or ``num_samples`` draws from the model's
    predictive distribution (``kind="true"``): a categorical on ``softmax(outputs)`` per
    position for cross-entropy, :math:`\mathcal N(f_n, \tfrac K2 I)` per sample for MSE
    (K outputs per sample: the Gaussian whose negative log-likelihood is torch's mean
    squared error up to a constant). Then :math:`\mathbb{E}[F_{true}] = G`, the GGN, and the
    Monte Carlo error shrinks as :math:`1/\sqrt{\text{num\_samples}}`. The draws come from a
    private generator seeded by ``seed`` (never the global RNG) and are fixed for the
    operator's life, so it is one symmetric PSD matrix. A product costs the same for any
    ``num_samples`` (the draws only enter in output space); memory grows as
    ``num_samples`` × the outputs.

    A term ``p`` is a summand of the mean loss: a position (sample × extra dimensions) for
    cross-entropy, a row of the outputs along the batch dimension for MSE and for a callable
    loss (``kind="empirical"`` only: sampling needs a known likelihood).

    Args:
        kind: ``"true"`` (default) or ``"empirical"``.
        num_samples: Monte Carlo draws per term for the true Fisher (default 1).
        seed: seeds the draws.
        model, batches, params, output_fn, loss_from_output, dtype, product_method: as for
            :class:`GGNOperator`.

    Raises:
        ValueError: for a bad argument, and for ``kind="true"`` with a callable loss.

    Example (least squares: the true Fisher is the GGN :math:`\tfrac2N X^\top X` in
    expectation)::

        >>> import torch
        >>> from lightning_curvature.operators.fisher import FisherOperator
        >>> X, y = torch.randn(50, 3, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> op = FisherOperator(model, [(X, y)], loss_from_output="mse", num_samples=20000,
        ...                     dtype=torch.float64)
        >>> fisher = op.matmat(torch.eye(3, dtype=torch.float64))
        >>> bool(torch.allclose(fisher, 2 / 50 * X.T @ X, rtol=0.05, atol=0.05))
        True
    """

    kind: str
    num_samples: int
    seed: int

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Any],
        params: Mapping[str, nn.Parameter] | Iterable[nn.Parameter] | None = None,
        *,
        kind: FisherKind = "true",
        output_fn: OutputFn | None = None,
        loss_from_output: LossFromOutput,
        num_samples: int = 1,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        product_method: ProductMethod = "reuse_graph",
    ) -> None:
        if kind not in FISHER_KINDS:
            raise ValueError(f"kind must be one of {FISHER_KINDS}, got {kind!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, Integral):
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, Integral):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if kind == "true" and callable(loss_from_output):
            raise ValueError(
                "kind='true' samples targets from the model's predictive distribution, which "
                "is known only for loss_from_output='mse' or 'cross_entropy'; use "
                "kind='empirical' (or GGNOperator) with a callable loss"
            )
        super().__init__(
            model,
            batches,
            params,
            output_fn=output_fn,
            loss_from_output=loss_from_output,
            dtype=dtype,
            product_method=product_method,
        )
        self.kind = kind
        self.num_samples = int(num_samples)
        self.seed = int(seed)

    def _make_generator(self) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed)
        return generator

    def _output_curvature(
        self, outputs: torch.Tensor, loss_on: Callable[[Any], Any], generator: Any
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        class_dim = self.loss_from_output == "cross_entropy"
        if self.kind == "empirical":
            return empirical_fisher(outputs, loss_on, class_dim)
        assert isinstance(self.loss_from_output, str)
        return true_fisher(outputs, self.loss_from_output, self.num_samples, generator)
