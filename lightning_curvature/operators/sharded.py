r"""The Hessian of a model sharded by FSDP2 (``fully_shard``), on this rank's shards.

Under FSDP2 every parameter is a ``DTensor`` sharded on dim 0 over the ranks, and double
backward does not reach it: ``torch.autograd.grad(loss, params, create_graph=True)`` returns
plain, unsharded, unreduced tensors, and differentiating those again finds the sharded
parameters unused (torch 2.13); forward-mode AD fails too. First-order training works, so
:class:`ShardedHessianOperator` takes central differences of the gradient, each rank on its
own shard:

.. math:: (Hv)_r = \frac{g_r(\theta + \epsilon v) - g_r(\theta - \epsilon v)}{2\epsilon}

where every rank adds :math:`\epsilon v_r` to its local shard in place, one forward and
backward pass leaves the reduce-scattered gradient shard :math:`g_r` in ``p.grad``, and
the shards are put back bit for bit afterwards. FSDP2 averages gradients over the ranks,
so the product is that of the Hessian of the mean of the ranks' losses (each rank's loss the
mean over its own probe batches).

A vector here is this rank's part of a global one: the local shards of the trainable
parameters, flattened and concatenated in ``module.named_parameters()`` order. Inner
products of such vectors must be summed over the ranks: :meth:`ShardedHessianOperator.inner`
does it with one all-reduce.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_curvature._shards import sharded_parameters
from lightning_curvature.operators.base import CurvatureOperator
from lightning_curvature.operators.context import FORWARD_SEED, private_buffers
from lightning_curvature.operators.loss import LossFn, native_dtype, scalar_loss
from lightning_curvature.operators.products import step_from_norms, unflatten

# The relative step of the central difference (see finite_difference_step) when the shards
# are stored in half precision: the shifted shards are rounded to it, so the step must move
# them by many units in the last place (bf16: 2^-8 relative; fp16: 2^-11). Measured on a
# tanh MLP 6-8-3 on two ranks, against the float64 Hessian at the rounded parameters: bf16
# 2-4% at 3e-2 (5-8% at 1e-2, 5-10% at 1e-1); fp16 0.6% at 1.5e-2 (1.4% at 5e-3, 0.7-1.1% at
# 3e-2). Coarse either way: keep float32 shards for products you rely on.
LOW_PRECISION_RELATIVE_STEP = {torch.bfloat16: 3e-2, torch.float16: 1.5e-2}


class OtherRankFailed(RuntimeError):
    """The loss failed on another rank of a sharded model (this rank's was fine); every
    rank raises, so none waits alone in the backward pass's collectives."""


class ShardedHessianOperator(CurvatureOperator):
    r"""The Hessian of the mean probe loss of an FSDP2 (``fully_shard``) module, on shards.

    Args:
        module: the module ``fully_shard`` was applied to; every trainable parameter must be
            a ``DTensor`` sharded on dim 0 over the ranks of ``group`` (a 1-D mesh). Its
            train/eval mode is used as it is. Its parameters and ``.grad`` fields are left
            bit-identical after every call (the shards are saved once per call and copied
            back; their version counters move); buffers are evaluated on private copies and
            the global RNG streams do not move.
        loss_fn: ``loss_fn(module, batch) -> scalar loss`` (a mapping with a ``"loss"`` entry
            also works).
        batches: this rank's probe batches, a non-empty list; every rank must pass the same
            number (each batch is a forward and a backward pass, whose collectives must
            match). Tensors are moved to the shards' device, floating ones cast to their
            dtype.
        group: the process group of the shards (``None``: the default group).

    Vectors are this rank's shards (length :attr:`dim`); :attr:`total_dim` is the number of
    parameters. Products, :meth:`inner`, :attr:`loss` and :meth:`gradient` are collectives:
    every rank must call them in the same order, with blocks of the same number of columns.
    Each column costs two forward and backward passes per probe batch, and the block one
    all-reduce (for the step).

    Precision: ``dtype`` is the shards' own when float32 or float64. Shards stored in
    bfloat16 or float16 are measured in float32 (vectors, steps, differences, inner
    products), but the model still runs in its own precision and the shifted shards are
    rounded to it; so are float32 shards that FSDP2's ``MixedPrecisionPolicy(param_dtype=
    torch.bfloat16)`` casts for the forward pass (:attr:`low_precision` names the dtype).
    Their products are coarse: the step is then the larger ``LOW_PRECISION_RELATIVE_STEP``
    (without it, a float32 step vanishes in the cast: errors of 600%), 2-4% off in norm in
    bf16 on a small MLP, and a Rayleigh quotient ``vᵀHv``, small against ``|v| |Hv|``,
    seen 20% off. Measure with float32 parameters and forward passes to be accurate.

    Attributes:
        dim: this rank's vector length; total_dim: the sum over the ranks; shard_index:
            this rank's place in the group;
        local_dims: every rank's ``dim``, in rank order (the global vector is the ranks'
            vectors concatenated in that order);
        device, dtype: the shards' device, and the precision of the vectors;
        low_precision: ``torch.bfloat16`` or ``torch.float16`` when the parameters are
            stored or run in it (the step is chosen for it), else ``None``;
        num_matvecs: products computed so far; param_names, params: the covered
            parameters (``DTensor``\ s), in vector order.
    """

    method_used = "finite_difference"
    fallback_reason: str | None = None

    def __init__(
        self, module: nn.Module, loss_fn: LossFn, batches: Sequence[Any], *, group: Any = None
    ) -> None:
        from lightning_curvature.batches import move_batch

        if not callable(loss_fn):
            raise ValueError("loss_fn must be callable as loss_fn(module, batch)")
        if isinstance(batches, (torch.Tensor, Mapping)) or not isinstance(batches, Sequence):
            raise ValueError("batches must be a list of batches (wrap a single batch in a list)")
        if len(batches) == 0:
            raise ValueError("batches must hold at least one batch, got an empty list")
        self.group = group
        self.param_names, self.params = sharded_parameters(module, group)
        shards = self._shards()
        storage = {shard.dtype for shard in shards}
        self.storage_dtype = storage.pop() if len(storage) == 1 else None
        self.low_precision = lowest_precision({s.dtype for s in shards} | forward_dtypes(module))
        super().__init__(sum(s.numel() for s in shards), shards[0].device, native_dtype(shards))
        self.module = module
        self.loss_fn = loss_fn
        self.batches = [move_batch(b, self.device, self.storage_dtype) for b in batches]
        self.local_dims = self._agreed_sizes()
        self._total_dim = sum(self.local_dims)
        self._shard_index = dist.get_rank(group)
        self._center: tuple[torch.Tensor, float] | None = None

    # ------------------------------------------------------------------ public API
    @property
    def total_dim(self) -> int:
        return self._total_dim

    @property
    def shard_index(self) -> int:
        return self._shard_index

    def sum_over_shards(self, partial: torch.Tensor) -> torch.Tensor:
        """``partial`` summed over the ranks: one all-reduce (a collective: every rank
        calls it, in the same order)."""
        total = partial.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def inner(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The global inner products ``aᵀb`` of sharded vectors, with one all-reduce.

        ``a`` and ``b`` are (dim,) vectors or (dim, r) blocks of this rank's shards; the
        result is shaped as ``aᵀ @ b`` would be (0-dim, (r,), (s,) or (r, s)), summed over
        the ranks, in the operator's dtype. A collective: every rank calls it."""
        for name, x in (("a", a), ("b", b)):
            if x.ndim not in (1, 2) or x.shape[0] != self.dim:
                raise ValueError(
                    f"{name} must have shape ({self.dim},) or ({self.dim}, k), got {tuple(x.shape)}"
                )
        a = a.to(device=self.device, dtype=self.dtype)
        b = b.to(device=self.device, dtype=self.dtype)
        return self.sum_over_shards((a.mT if a.ndim == 2 else a) @ b)

    def gradient(self) -> torch.Tensor:
        """This rank's shard of the gradient at θ (flat, in the operator's dtype): the
        gradient of the mean of the ranks' probe losses. A collective (computed on first
        use together with :attr:`loss`, then kept until :meth:`release`)."""
        return self._at_center()[0]

    @property
    def loss(self) -> float:
        """The mean probe loss over the ranks (the same on every rank). A collective on
        first use (one forward and backward pass per batch, kept with :meth:`gradient`).

        Raises:
            FloatingPointError: on every rank, when it is not finite.
        """
        return self._at_center()[1]

    def release(self) -> None:
        """Forget the gradient and loss kept at θ."""
        self._center = None

    # ------------------------------------------------------------------ products
    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        """``H V``, one central difference per column, on this rank's shards."""
        if block.shape[1] == 0:  # on every rank alike: no collective is skipped unevenly
            return block.clone()
        shards = self._shards()
        with self._saved_grads(), self._restored(shards) as saved:
            base = [s.to(self.dtype) for s in saved]
            steps = self._steps(base, block)
            columns = []
            for j in range(block.shape[1]):
                shift = unflatten(block[:, j] * steps[j], base)
                self._write(shards, [b + s for b, s in zip(base, shift, strict=True)])
                plus = self._gradient_here()[0]
                self._write(shards, [b - s for b, s in zip(base, shift, strict=True)])
                minus = self._gradient_here()[0]
                columns.append((plus - minus) / (2 * steps[j]))
        return torch.stack(columns, dim=1)

    def _steps(self, base: Sequence[torch.Tensor], block: torch.Tensor) -> torch.Tensor:
        """Each column's step, from the global norms of θ and of the column (one
        all-reduce), so every rank shifts along the same global direction."""
        local = torch.cat(
            [
                torch.stack([b.square().sum() for b in base]).sum().reshape(1),
                block.square().sum(dim=0),
            ]
        )
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self.group)
        low = self.low_precision
        relative = None if low is None else LOW_PRECISION_RELATIVE_STEP[low]
        return step_from_norms(local[0], local[1:].sqrt(), self.total_dim, self.dtype, relative)

    # ------------------------------------------------------------------ internals
    def _shards(self) -> list[torch.Tensor]:
        """The parameters' local shards, sharing their storage (writes reach the model)."""
        with torch.no_grad():
            return [p.to_local() for p in self.params]

    def _agreed_sizes(self) -> list[int]:
        """Every rank's vector length (one all-gather); checks the ranks' batch counts."""
        mine = torch.tensor([self.dim, len(self.batches)], dtype=torch.int64, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(gathered, mine, group=self.group)
        counts = [int(g[1]) for g in gathered]
        if len(set(counts)) > 1:  # every rank sees the same counts: all raise, none hangs
            raise ValueError(
                "every rank must pass the same number of probe batches (their forward and "
                f"backward passes are collectives), got {counts} in rank order"
            )
        return [int(g[0]) for g in gathered]

    def _at_center(self) -> tuple[torch.Tensor, float]:
        if self._center is None:
            with self._saved_grads():
                gradient, local_loss = self._gradient_here()
            total = local_loss.to(torch.float64).reshape(1)
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
            mean = float(total) / dist.get_world_size(self.group)
            if mean != mean or mean in (float("inf"), float("-inf")):
                raise FloatingPointError(
                    f"the loss on the probe batches is {mean}: curvature is undefined there "
                    "(lower the learning rate, or measure on other batches)"
                )
            self._center = (gradient, mean)
        return self._center

    def _gradient_here(self) -> tuple[torch.Tensor, torch.Tensor]:
        """At the shards' current values: this rank's flat gradient shard of the mean of
        the ranks' losses (FSDP2's reduce-scatter averages over the ranks; the batches'
        gradients accumulate in ``p.grad``), and this rank's mean loss (0-dim)."""
        for p in self.params:
            p.grad = None
        total = torch.zeros((), device=self.device, dtype=self.dtype)
        for index, batch in enumerate(self.batches):
            with self._evaluating(index):
                loss = self._agreed_loss(batch)
                torch.autograd.backward(loss / len(self.batches))
            total = total + loss.detach().to(self.dtype)
        with torch.no_grad():
            flat = torch.cat(
                [
                    torch.zeros(p.to_local().numel(), device=self.device, dtype=self.dtype)
                    if p.grad is None
                    else p.grad.to_local().reshape(-1).to(self.dtype)
                    for p in self.params
                ]
            )
        for p in self.params:
            p.grad = None
        return flat, total / len(self.batches)

    def _agreed_loss(self, batch: Any) -> torch.Tensor:
        """``loss_fn`` on ``batch``, once every rank has one that backward can run on.

        The backward pass is a collective (FSDP2 reduce-scatters in it): a rank whose loss
        failed, or does not reach the parameters, must not leave the others waiting there.
        One all-gather of a flag after the forward pass makes every rank raise instead:
        this rank its own error, the others one that names the failing ranks (a failure
        before the forward's own collectives cannot be caught this way)."""
        error: BaseException | None = None
        try:
            loss = scalar_loss(self.loss_fn(self.module, batch))
            if not loss.requires_grad:
                raise ValueError("the loss does not depend on the sharded parameters")
        except Exception as caught:
            error = caught
        mine = torch.tensor([float(error is not None)], device=self.device)
        flags = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(flags, mine, group=self.group)
        failed = [rank for rank, flag in enumerate(flags) if bool(flag)]
        if error is not None:
            raise error
        if failed:
            raise OtherRankFailed(f"the loss failed on rank(s) {failed} of the sharded model")
        return loss

    @contextmanager
    def _evaluating(self, batch_index: int) -> Iterator[None]:
        """Gradients on, autocast off, the batch's own fixed RNG stream (the same dropout
        mask for every evaluation) and private buffers. Not ``isolated_evaluation``: that
        one forces the math attention kernel and eager submodules, which only double
        backward needs, at a price in memory the large models sharded here cannot pay."""
        cuda = self.device.type == "cuda"
        with ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast(self.device.type, enabled=False))
            cuda_ids = [self.device.index if self.device.index is not None else 0] if cuda else []
            stack.enter_context(torch.random.fork_rng(devices=cuda_ids))
            torch.default_generator.manual_seed(FORWARD_SEED + batch_index)
            if cuda:
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(FORWARD_SEED + batch_index)
            stack.enter_context(private_buffers(self.module))
            yield

    @contextmanager
    def _saved_grads(self) -> Iterator[None]:
        """Put every covered ``p.grad`` back as it was (the same tensor, or ``None``)."""
        grads = [p.grad for p in self.params]
        try:
            yield
        finally:
            for p, grad in zip(self.params, grads, strict=True):
                p.grad = grad

    @contextmanager
    def _restored(self, shards: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
        """Clones of the shards (yielded), copied back bit for bit at the end: θ + εv - εv
        is not θ in floating point."""
        with torch.no_grad():
            saved = [s.clone() for s in shards]
        try:
            yield saved
        finally:
            self._write(shards, saved)

    @staticmethod
    def _write(shards: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for shard, value in zip(shards, values, strict=True):
                shard.copy_(value)


def lowest_precision(dtypes: set[torch.dtype]) -> torch.dtype | None:
    """The half-precision dtype among ``dtypes`` (bfloat16, the coarser, first), or
    ``None`` when there is none."""
    for dtype in LOW_PRECISION_RELATIVE_STEP:
        if dtype in dtypes:
            return dtype
    return None


def forward_dtypes(module: nn.Module) -> set[torch.dtype]:
    """The dtypes FSDP2 casts ``module``'s parameters to for the forward pass
    (``MixedPrecisionPolicy.param_dtype``, where one is set).

    Read from FSDP2's state, which torch does not expose publicly (``_get_fsdp_state``,
    its parameter groups' ``mp_policy``): if that ever changes, the answer is empty and
    the step is chosen from the stored dtypes alone."""
    found: set[torch.dtype] = set()
    for submodule in module.modules():
        get_state = getattr(submodule, "_get_fsdp_state", None)
        if not callable(get_state):
            continue
        try:
            state = get_state()
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:
                group = getattr(state, "_fsdp_param_group", None)
                groups = [] if group is None else [group]
            for group in groups:
                dtype = group.mp_policy.param_dtype
                if isinstance(dtype, torch.dtype):
                    found.add(dtype)
        except Exception:  # private torch state: unreadable means unknown, never a failure
            continue
    return found
