"""Adapters that run the two peer Hessian tools on one model and one batch, on CPU.

Peers (public APIs only, nothing copied from them):

* PyHessian 0.1 (PyPI ``pyhessian``): ``pyhessian.hessian(model, criterion, data=(x, y),
  cuda=False)`` then ``.eigenvalues(maxIter=100, tol=1e-3, top_n=1)`` (power iteration,
  deflation by Gram-Schmidt against earlier eigenvectors; ``maxIter`` is per eigenvalue; stops
  when the Rayleigh quotient changes by a relative ``tol``) and ``.trace(maxIter=100, tol=1e-3)``
  (Hutchinson, Rademacher probes; stops when the running mean changes by a relative ``tol``).
* hessian-eigenthings 1.0.0a5 (PyPI ``hessian-eigenthings``; a rewrite, no
  ``compute_hessian_eigenthings``): build ``HessianOperator(model, dataloader, loss_fn)`` where
  ``dataloader`` is any iterable of batches (we pass ``[(x, y)]``) and ``loss_fn(model, batch)``
  comes from ``supervised_loss(criterion)``; then ``lanczos(op, k=10, max_iter=min(2k, n-1),
  tol=1e-4, which="LM", reorthogonalize=max_iter<=50, seed=None)`` or
  ``deflated_power_iteration(op, k=10, max_iter=100, tol=1e-4, momentum=0.0, seed=None)``;
  both return an ``EigenResult`` (eigenvalues, eigenvectors, residuals, iterations, converged).
  ``trace(op, num_matvecs=100, method="hutch++", distribution="rademacher")`` returns a
  ``TraceResult`` (estimate, stderr, samples).

How HVPs are counted (independently of the peers' own reports)
---------------------------------------------------------------
Inside :func:`count_autograd` we temporarily replace ``torch.autograd.grad`` and
``torch.autograd.backward`` (``Tensor.backward`` calls the latter through the module
attribute, so it is covered too; both peers look the functions up at call time) with
counting wrappers, and put a forward hook on the model's root module. A call is
classified by what it differentiates:

* one 0-dim tensor (the scalar loss) -> first-order gradient (``num_grads``);
* anything else (a list of per-parameter gradient tensors, differentiated against a
  ``grad_outputs`` vector) -> second-order call, i.e. one Hessian-vector product
  (``num_hvps``); with ``is_grads_batched=True`` it counts one per batched vector.

This is exact for both peers because the only vector-valued quantity either one
differentiates is the gradient (it would misclassify only a model whose trainable
parameters are all 0-dim, or a loss that is not a scalar):

* PyHessian: the constructor does one forward and ``loss.backward(create_graph=True)``
  (1 first-order call, reused for every HVP); each power/Hutchinson step is one
  ``torch.autograd.grad(gradsH, params, grad_outputs=v, retain_graph=True)`` (1 HVP, no
  forward).
* eigenthings ``HessianOperator(method="autograd")``: each ``matvec`` redoes the forward,
  calls ``torch.autograd.grad(loss, params, create_graph=True)`` (first order) and then
  ``torch.autograd.grad(grads, params, grad_outputs=v)`` (1 HVP). So it costs one forward
  and one first-order backward more per HVP than PyHessian. It does not use torch.func for
  the Hessian (only its GGN/Fisher operators use ``torch.func.jvp/vjp/vmap``).
  With ``hvp_method="finite_difference"`` there is no second-order call: each HVP is two
  plain gradients, so we report ``num_hvps = num_grads // 2`` for that mode.

Side effects handled by :func:`preserve_model_state` (every adapter runs inside it)
----------------------------------------------------------------------------------
* PyHessian calls ``model.eval()``: per-module ``training`` flags are restored.
* PyHessian accumulates into ``.grad`` with ``create_graph=True`` (the grads keep the
  double-backward graph alive and form a param<->grad reference cycle; torch may warn) and
  calls ``model.zero_grad()`` (sets ``.grad`` to None). Pre-existing ``.grad`` would also be
  *added* into its gradient. We set every ``.grad`` to None before the peer runs and
  restore clones of the original ``.grad`` afterwards.
* eigenthings runs the model in whatever mode it is in (train by default): BatchNorm running
  stats would be updated on every HVP and dropout resampled per HVP (so the operator is not a
  fixed matrix). Buffers are snapshotted and restored; pass ``force_eval=True`` to match
  PyHessian, which always differentiates the eval-mode loss.
* eigenthings ``"finite_difference"`` perturbs parameters in place (it restores them itself).
* RNG: PyHessian draws its start/probe vectors from the *global* torch RNG; with ``seed``
  given we run it under ``torch.random.fork_rng`` so the global stream is untouched.
  eigenthings uses a private ``torch.Generator``; with ``seed=None`` that generator has
  torch's fixed default seed, so its runs are deterministic anyway.
* PyHessian's ``density()`` calls ``torch.eig`` (removed from torch 2.x); not wrapped.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "AutogradCounts",
    "PeerResult",
    "count_autograd",
    "eigenthings_top_eigenvalues",
    "eigenthings_trace",
    "preserve_model_state",
    "pyhessian_top_eigenvalues",
    "pyhessian_trace",
]

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PeerResult:
    """Result of one peer call.

    ``eigenvalues`` is sorted descending (algebraically). Both peers select by largest
    *magnitude*, so a negative value can appear if it dominates; the notes say so.
    ``seconds`` covers the peer's setup (PyHessian's constructor does the forward/backward)
    and its solver call, not our state snapshot/restore.
    """

    tool: str
    seconds: float
    num_hvps: int
    notes: str
    eigenvalues: list[float] | None = None
    trace: float | None = None
    num_forwards: int = 0  # forward passes of the model during the peer call
    num_grads: int = 0  # first-order gradient evaluations (autograd calls on the scalar loss)
    raw: Any = field(default=None, repr=False, compare=False)  # the peer's own result object


# --------------------------------------------------------------------------- counting


@dataclass
class AutogradCounts:
    hvps: int = 0
    grads: int = 0
    forwards: int = 0


def _as_tensor_tuple(obj: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(obj, torch.Tensor):
        return (obj,)
    return tuple(t for t in obj if isinstance(t, torch.Tensor))


def _classify(counts: AutogradCounts, outputs: Any, grad_outputs: Any, batched: bool) -> None:
    outs = _as_tensor_tuple(outputs)
    if len(outs) == 1 and outs[0].dim() == 0:
        counts.grads += 1
        return
    n = 1
    if batched and grad_outputs is not None:
        gos = _as_tensor_tuple(grad_outputs)
        n = int(gos[0].shape[0]) if gos else 1
    counts.hvps += n


@contextlib.contextmanager
def count_autograd(model: nn.Module | None = None) -> Iterator[AutogradCounts]:
    """Count HVPs, first-order gradients and forwards while the block runs (see module doc).

    Not thread-safe: it patches ``torch.autograd.grad`` / ``torch.autograd.backward``.
    """
    counts = AutogradCounts()
    orig_grad = torch.autograd.grad
    orig_backward = torch.autograd.backward

    def grad(outputs: Any, inputs: Any, grad_outputs: Any = None, *args: Any, **kwargs: Any):
        _classify(counts, outputs, grad_outputs, bool(kwargs.get("is_grads_batched", False)))
        return orig_grad(outputs, inputs, grad_outputs, *args, **kwargs)

    def backward(tensors: Any, grad_tensors: Any = None, *args: Any, **kwargs: Any):
        _classify(counts, tensors, grad_tensors, False)
        return orig_backward(tensors, grad_tensors, *args, **kwargs)

    handle = None
    if model is not None:

        def hook(*_: Any) -> None:
            counts.forwards += 1

        handle = model.register_forward_hook(hook)
    torch.autograd.grad = grad
    torch.autograd.backward = backward
    try:
        yield counts
    finally:
        torch.autograd.grad = orig_grad
        torch.autograd.backward = orig_backward
        if handle is not None:
            handle.remove()


# --------------------------------------------------------------------------- state


@contextlib.contextmanager
def preserve_model_state(model: nn.Module, seed: int | None = None) -> Iterator[None]:
    """Restore train/eval flags, ``.grad`` and buffers afterwards; clear ``.grad`` before.

    With ``seed`` set, the block runs on a forked global RNG seeded with ``seed``.
    """
    modes = {m: m.training for m in model.modules()}
    grads = {p: (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    for p in model.parameters():
        p.grad = None
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    try:
        with rng, torch.enable_grad():
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, g in grads.items():
            p.grad = g
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])


def _defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    return {
        k: v.default
        for k, v in inspect.signature(fn).parameters.items()
        if v.default is not inspect.Parameter.empty
    }


def _sorted_desc(values: Any) -> list[float]:
    return sorted((float(v) for v in values), reverse=True)


def _neg_note(values: list[float]) -> str:
    return "; NOTE negative eigenvalue selected (largest magnitude)" if min(values) < 0 else ""


_CYCLE_WARNING = r"Using backward\(\) with create_graph=True"


# --------------------------------------------------------------------------- PyHessian


def _pyhessian_run(
    model: nn.Module,
    criterion: Criterion,
    x: Any,
    y: Any,
    call: str,
    kwargs: dict[str, Any],
    seed: int | None,
):
    from pyhessian import hessian

    with preserve_model_state(model, seed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CYCLE_WARNING)
        with count_autograd(model) as counts:
            t0 = time.perf_counter()
            comp = hessian(model, criterion, data=(x, y), cuda=False)
            out = getattr(comp, call)(**kwargs)
            seconds = time.perf_counter() - t0
        del comp
    return out, seconds, counts


def pyhessian_top_eigenvalues(
    model: nn.Module,
    criterion: Criterion,
    x: torch.Tensor,
    y: torch.Tensor,
    top_n: int = 1,
    *,
    max_iter: int | None = None,
    tol: float | None = None,
    seed: int | None = None,
    **peer_kwargs: Any,
) -> PeerResult:
    """PyHessian ``hessian(...).eigenvalues(maxIter, tol, top_n)``; None = the peer's default.

    ``max_iter`` is PyHessian's ``maxIter`` (per eigenvalue, default 100); ``tol`` is the
    relative change of the Rayleigh quotient between two steps (default 1e-3).
    """
    from pyhessian import hessian

    kwargs = dict(peer_kwargs)
    kwargs["top_n"] = top_n
    if max_iter is not None:
        kwargs["maxIter"] = max_iter
    if tol is not None:
        kwargs["tol"] = tol
    eff = {**_defaults(hessian.eigenvalues), **kwargs}
    (vals, _vecs), seconds, counts = _pyhessian_run(
        model, criterion, x, y, "eigenvalues", kwargs, seed
    )
    values = _sorted_desc(vals)
    notes = (
        f"power iteration + Gram-Schmidt deflation, maxIter={eff['maxIter']} per "
        f"eigenvalue, tol={eff['tol']} (rel. change of Rayleigh quotient), eval mode, "
        f"graph of one forward reused; raw order={[float(v) for v in vals]}"
        f"{_neg_note(values)}"
    )
    return PeerResult(
        "pyhessian",
        seconds,
        counts.hvps,
        notes,
        eigenvalues=values,
        num_forwards=counts.forwards,
        num_grads=counts.grads,
        raw=vals,
    )


def pyhessian_trace(
    model: nn.Module,
    criterion: Criterion,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_iter: int | None = None,
    tol: float | None = None,
    seed: int | None = None,
    **peer_kwargs: Any,
) -> PeerResult:
    """PyHessian ``hessian(...).trace(maxIter, tol)`` (Hutchinson); estimate = mean of samples.

    Its stop rule is ``|mean_k - mean_{k-1}| / (mean_{k-1} + 1e-6) < tol`` (no abs() in the
    denominator: with a negative running mean it stops after 2 probes).
    """
    from pyhessian import hessian

    kwargs = dict(peer_kwargs)
    if max_iter is not None:
        kwargs["maxIter"] = max_iter
    if tol is not None:
        kwargs["tol"] = tol
    eff = {**_defaults(hessian.trace), **kwargs}
    samples, seconds, counts = _pyhessian_run(model, criterion, x, y, "trace", kwargs, seed)
    est = float(sum(samples) / len(samples))
    notes = (
        f"Hutchinson (Rademacher), {len(samples)} probes, maxIter={eff['maxIter']}, "
        f"tol={eff['tol']} (rel. change of running mean), eval mode"
    )
    return PeerResult(
        "pyhessian",
        seconds,
        counts.hvps,
        notes,
        trace=est,
        num_forwards=counts.forwards,
        num_grads=counts.grads,
        raw=samples,
    )


# --------------------------------------------------------------------------- eigenthings


def _eigenthings_operator(
    model: nn.Module,
    criterion: Criterion,
    x: Any,
    y: Any,
    hvp_method: str,
    operator_kwargs: dict[str, Any] | None,
):
    import hessian_eigenthings as he

    return he.HessianOperator(
        model, [(x, y)], he.supervised_loss(criterion), method=hvp_method, **(operator_kwargs or {})
    )


def _hvps(counts: AutogradCounts, hvp_method: str) -> int:
    return counts.grads // 2 if hvp_method == "finite_difference" else counts.hvps


def eigenthings_top_eigenvalues(
    model: nn.Module,
    criterion: Criterion,
    x: torch.Tensor,
    y: torch.Tensor,
    top_n: int = 1,
    method: str = "lanczos",
    *,
    max_iter: int | None = None,
    tol: float | None = None,
    which: str | None = None,
    seed: int | None = None,
    hvp_method: str = "autograd",
    force_eval: bool = False,
    operator_kwargs: dict[str, Any] | None = None,
    **peer_kwargs: Any,
) -> PeerResult:
    """hessian-eigenthings top-``top_n`` eigenvalues (its ``k``); None = the peer's default.

    ``method="lanczos"``: ``lanczos(op, k=top_n, max_iter=..., tol=..., which=...)``. It always
    runs exactly ``max_iter`` Lanczos steps (= HVPs; default ``min(2*k, n-1)``, i.e. only 2 for
    k=1); ``tol`` only sets the ``converged`` flags. ``which``: "LM" (default, largest
    magnitude), "LA" (largest algebraic: what λmax means), "SA". Extra ``peer_kwargs`` (e.g.
    ``reorthogonalize``) go to the peer.
    ``method="power"``: ``deflated_power_iteration(op, k=top_n, max_iter=..., tol=...)``;
    ``max_iter`` (default 100) is per eigenvalue, it stops when both the relative change of
    the Rayleigh quotient and the relative residual are below ``tol`` (default 1e-4);
    always largest magnitude; ``momentum`` via ``peer_kwargs``.
    """
    import hessian_eigenthings as he

    if method == "lanczos":
        solver: Callable[..., Any] = he.lanczos
    elif method in ("power", "power_iteration"):
        solver = he.deflated_power_iteration
        if which not in (None, "LM"):
            raise ValueError("eigenthings power iteration only supports which='LM'")
    else:
        raise ValueError(f"unknown method={method!r} (use 'lanczos' or 'power')")
    kwargs = dict(peer_kwargs)
    kwargs["k"] = top_n
    for name, val in (("max_iter", max_iter), ("tol", tol), ("seed", seed)):
        if val is not None:
            kwargs[name] = val
    if which is not None and method == "lanczos":
        kwargs["which"] = which

    with preserve_model_state(model):
        if force_eval:
            model.eval()
        with count_autograd(model) as counts:
            t0 = time.perf_counter()
            op = _eigenthings_operator(model, criterion, x, y, hvp_method, operator_kwargs)
            res = solver(op, **kwargs)
            seconds = time.perf_counter() - t0
        del op

    eff = {**_defaults(solver), **kwargs}
    values = _sorted_desc(res.eigenvalues.tolist())
    n_conv = int(res.converged.sum())
    steps = eff["max_iter"] if eff.get("max_iter") is not None else f"min(2k,n-1)={res.iterations}"
    notes = (
        f"{solver.__name__}: k={top_n}, max_iter={steps}, tol={eff['tol']}, "
        f"which={eff.get('which', 'LM')}, seed={eff.get('seed')}, hvp={hvp_method}, "
        f"mode={'eval' if force_eval else 'as-is'}; peer says iterations={res.iterations}, "
        f"converged {n_conv}/{top_n}, residuals={[f'{r:.2e}' for r in res.residuals.tolist()]}"
        f"{_neg_note(values)}"
    )
    return PeerResult(
        "hessian-eigenthings",
        seconds,
        _hvps(counts, hvp_method),
        notes,
        eigenvalues=values,
        num_forwards=counts.forwards,
        num_grads=counts.grads,
        raw=res,
    )


def eigenthings_trace(
    model: nn.Module,
    criterion: Criterion,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_matvecs: int | None = None,
    method: str | None = None,
    seed: int | None = None,
    hvp_method: str = "autograd",
    force_eval: bool = False,
    operator_kwargs: dict[str, Any] | None = None,
    **peer_kwargs: Any,
) -> PeerResult:
    """hessian-eigenthings ``trace(op, num_matvecs=100, method="hutch++")``.

    Hutch++ uses ``3 * (num_matvecs // 3)`` HVPs (99 by default); ``method="hutchinson"``
    uses ``num_matvecs``. ``distribution`` ("rademacher"/"gaussian") via ``peer_kwargs``.
    """
    import hessian_eigenthings as he

    kwargs = dict(peer_kwargs)
    for name, val in (("num_matvecs", num_matvecs), ("method", method), ("seed", seed)):
        if val is not None:
            kwargs[name] = val
    with preserve_model_state(model):
        if force_eval:
            model.eval()
        with count_autograd(model) as counts:
            t0 = time.perf_counter()
            op = _eigenthings_operator(model, criterion, x, y, hvp_method, operator_kwargs)
            res = he.trace(op, **kwargs)
            seconds = time.perf_counter() - t0
        del op
    eff = {**_defaults(he.trace), **kwargs}
    notes = (
        f"trace: method={eff['method']}, num_matvecs={eff['num_matvecs']}, "
        f"stderr={res.stderr:.3g}, hvp={hvp_method}, "
        f"mode={'eval' if force_eval else 'as-is'}"
    )
    return PeerResult(
        "hessian-eigenthings",
        seconds,
        _hvps(counts, hvp_method),
        notes,
        trace=float(res.estimate),
        num_forwards=counts.forwards,
        num_grads=counts.grads,
        raw=res,
    )
