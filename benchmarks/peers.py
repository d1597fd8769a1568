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
At each tool's Hessian-vector-product boundary, never inside torch:

* hessian-eigenthings and curvlinops/ARPACK take an operator object: the solver gets a
  counting wrapper (:class:`CountingEigenthingsOperator`, or a scipy ``LinearOperator``
  whose ``matvec``/``matmat`` count columns) around the tool's own operator.
* PyHessian has no operator object: its solver calls the module-level function
  ``pyhessian.hessian.hessian_vector_product(gradsH, params, v)`` once per HVP, and
  :func:`count_pyhessian_products` swaps that one name for a counting wrapper while the
  block runs. Its constructor's forward/backward (one, reused for every HVP) is not an HVP.

Forward passes are counted with a forward hook on the model (public API).

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

import numpy as np
import torch
from torch import nn

__all__ = [
    "Counts",
    "PeerResult",
    "count_pyhessian_products",
    "curvlinops_top_eigenvalues",
    "eigenthings_top_eigenvalues",
    "eigenthings_trace",
    "preserve_model_state",
    "pyhessian_top_eigenvalues",
    "pyhessian_trace",
    "scipy_eigsh_top_eigenvalues",
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
    raw: Any = field(default=None, repr=False, compare=False)  # the peer's own result object


# --------------------------------------------------------------------------- counting


@dataclass
class Counts:
    hvps: int = 0
    forwards: int = 0


@contextlib.contextmanager
def count_forwards(model: nn.Module, counts: Counts) -> Iterator[Counts]:
    handle = model.register_forward_hook(
        lambda *_: setattr(counts, "forwards", counts.forwards + 1)
    )
    try:
        yield counts
    finally:
        handle.remove()


@contextlib.contextmanager
def count_pyhessian_products(model: nn.Module) -> Iterator[Counts]:
    """Count PyHessian's HVPs at its one product function (see the module docstring)."""
    import sys

    import pyhessian  # noqa: F401  (loads pyhessian.hessian)

    module = sys.modules["pyhessian.hessian"]
    original = module.hessian_vector_product
    counts = Counts()

    def counted(gradsH: Any, params: Any, v: Any) -> Any:
        counts.hvps += 1
        return original(gradsH, params, v)

    module.hessian_vector_product = counted
    try:
        with count_forwards(model, counts):
            yield counts
    finally:
        module.hessian_vector_product = original


def counting_eigenthings_operator(inner: Any, counts: Counts) -> Any:
    """An eigenthings ``CurvatureOperator`` that forwards to ``inner`` and counts products."""
    import hessian_eigenthings as he

    class CountingEigenthingsOperator(he.CurvatureOperator):
        size = property(lambda self: inner.size)
        device = property(lambda self: inner.device)
        dtype = property(lambda self: inner.dtype)

        def matvec(self, v: torch.Tensor) -> torch.Tensor:
            counts.hvps += 1 if v.ndim == 1 else v.shape[-1]
            return inner.matvec(v)

    return CountingEigenthingsOperator()


def counting_scipy_operator(dim: int, matmat: Callable[[Any], Any], counts: Counts) -> Any:
    """A float64 scipy ``LinearOperator`` whose products are counted per column."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator

    def product(block: Any) -> Any:
        block = np.asarray(block, dtype=np.float64)
        columns = block.reshape(dim, -1)
        counts.hvps += columns.shape[1]
        return np.asarray(matmat(columns), dtype=np.float64).reshape(block.shape)

    return LinearOperator((dim, dim), matvec=product, matmat=product, dtype=np.float64)


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
        with count_pyhessian_products(model) as counts:
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
        counts = Counts()
        with count_forwards(model, counts):
            t0 = time.perf_counter()
            op = _eigenthings_operator(model, criterion, x, y, hvp_method, operator_kwargs)
            op = counting_eigenthings_operator(op, counts)
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
        counts.hvps,
        notes,
        eigenvalues=values,
        num_forwards=counts.forwards,
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
        counts = Counts()
        with count_forwards(model, counts):
            t0 = time.perf_counter()
            op = _eigenthings_operator(model, criterion, x, y, hvp_method, operator_kwargs)
            op = counting_eigenthings_operator(op, counts)
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
        counts.hvps,
        notes,
        trace=float(res.estimate),
        num_forwards=counts.forwards,
        raw=res,
    )


# --------------------------------------------------------------------------- ARPACK


def scipy_eigsh_top_eigenvalues(op: Any, top_n: int = 1, *, tol: float = 1e-4) -> PeerResult:
    """scipy's ``eigsh`` (ARPACK, implicitly restarted Lanczos) on *our* HVP operator:
    the same products, another algorithm. ``tol`` is ARPACK's relative accuracy."""
    from scipy.sparse.linalg import eigsh

    counts = Counts()

    def matmat(block: Any) -> Any:
        tensor = torch.as_tensor(block, dtype=op.dtype, device=op.device)
        return op.matmat(tensor).double().cpu().numpy()

    linear = counting_scipy_operator(op.dim, matmat, counts)
    start = np.random.default_rng(0).standard_normal(op.dim)
    t0 = time.perf_counter()
    values = eigsh(linear, k=top_n, which="LA", tol=tol, v0=start, return_eigenvectors=False)
    seconds = time.perf_counter() - t0
    return PeerResult(
        "scipy eigsh",
        seconds,
        counts.hvps,
        f"ARPACK which='LA', tol={tol:g}",
        eigenvalues=_sorted_desc(values),
    )


def curvlinops_top_eigenvalues(
    model: nn.Module,
    criterion: Criterion,
    x: torch.Tensor,
    y: torch.Tensor,
    top_n: int = 1,
    *,
    tol: float = 1e-4,
) -> PeerResult:
    """curvlinops' ``HessianLinearOperator`` (its own HVPs) with scipy's ``eigsh`` on it, the
    way curvlinops' documentation computes top eigenvalues."""
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    counts = Counts()
    with preserve_model_state(model):
        with count_forwards(model, counts):
            t0 = time.perf_counter()
            hessian = HessianLinearOperator(
                model, criterion, params, [(x, y)], check_deterministic=False
            ).to_scipy()
            dim = hessian.shape[0]
            linear = counting_scipy_operator(dim, hessian.matmat, counts)
            start = np.random.default_rng(0).standard_normal(dim)
            values = eigsh(
                linear, k=top_n, which="LA", tol=tol, v0=start, return_eigenvectors=False
            )
            seconds = time.perf_counter() - t0
    return PeerResult(
        "curvlinops",
        seconds,
        counts.hvps,
        f"HessianLinearOperator + eigsh(which='LA', tol={tol:g})",
        eigenvalues=_sorted_desc(values),
        num_forwards=counts.forwards,
    )
