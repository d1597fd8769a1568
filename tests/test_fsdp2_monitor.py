"""CurvatureMonitor under ModelParallelStrategy with fully_shard (FSDP2): two CPU ranks over
gloo, each holding half of every parameter. Against the dense float64 Hessian of the same
model unsharded, on the union of the ranks' probe batches; training must be bit-identical
with and without the monitor."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.truth import dense_hessian

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
from fsdp2_monitor import network  # noqa: E402

OPTIMIZERS = ("sgd", "adam")

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed missing"
)

# Finite differences on float32 shards (operators/products.py's step): the product errs by
# about 1e-4 relative on a smooth tanh network, and λmax by less; the contract for
# λmax is 1e-3 relative.
FD_RELATIVE = 1e-3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2") / "report"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "fsdp2_monitor.py"), str(out)],
        cwd=out.parent,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PL_DISABLE_FORK": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    names = [f"{s}-{o}" for s in ("monitored", "plain") for o in OPTIMIZERS]
    names += [f"{s}-sgd" for s in ("fail", "budget", "resume", "resume_plain", "transformer")]
    return {
        name: [json.loads(Path(f"{out}.{name}.rank{r}").read_text()) for r in (0, 1)]
        for name in names
    }


def unsharded(params: dict, kind: str = "mlp") -> nn.Module:
    net = network(kind).double()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.tensor(params[name], dtype=torch.float64))
    return net


def truth_at_last_measurement(ranks, kind: str = "mlp") -> tuple[torch.Tensor, torch.Tensor]:
    """The dense Hessian of the mean loss over both ranks' probe batches, at the gathered
    parameters of the last measured step, and its eigenvalues (ascending)."""
    net = unsharded(ranks[0]["at_last"]["params"], kind)
    batches = [(torch.tensor(r["probe"][0]).double(), torch.tensor(r["probe"][1])) for r in ranks]
    hessian = dense_hessian(net, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), batches)
    return hessian, torch.linalg.eigvalsh(hessian)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_training_is_bit_identical_with_and_without_the_monitor(runs, optimizer):
    monitored, plain = runs[f"monitored-{optimizer}"], runs[f"plain-{optimizer}"]
    for rank in (0, 1):
        assert monitored[rank]["disabled"] is None
        assert monitored[rank]["params"] == plain[rank]["params"]
        assert monitored[rank]["optimizer_state"] == plain[rank]["optimizer_state"]
        assert monitored[rank]["warnings"] == []


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_rank_logs_the_same_numbers(runs, optimizer):
    ranks = runs[f"monitored-{optimizer}"]
    timing = {"curvature/seconds", "curvature/overhead"}
    assert [h["step"] for h in ranks[0]["history"]] == [4, 8, 12]
    for mine, theirs in zip(ranks[0]["history"], ranks[1]["history"], strict=True):
        assert {k: v for k, v in mine.items() if k not in timing} == {
            k: v for k, v in theirs.items() if k not in timing
        }


@pytest.mark.parametrize("run", ["monitored-sgd", "monitored-adam", "transformer-sgd"])
def test_top_eigenvalues_and_trace_against_the_dense_hessian_of_the_union(runs, run):
    ranks = runs[run]
    last = ranks[0]["history"][-1]
    assert ranks[0]["at_last"]["step"] == last["step"] == 12
    kind = "transformer" if run.startswith("transformer") else "mlp"
    _, eigenvalues = truth_at_last_measurement(ranks, kind)
    top = eigenvalues.flip(0)
    assert abs(last["curvature/lambda_max"] - top[0]) <= FD_RELATIVE * top[0]
    assert abs(last["curvature/eigenvalue_2"] - top[1]) <= FD_RELATIVE * top[0]
    # Hutchinson on the complement of the top 2, 4 Rademacher probes: within 4 stderr.
    trace = float(eigenvalues.sum())
    assert abs(last["curvature/trace"] - trace) <= 4 * last["curvature/trace_stderr"]


def test_adams_preconditioned_sharpness_from_the_sharded_optimizer_state(runs):
    ranks = runs["monitored-adam"]
    hessian, _ = truth_at_last_measurement(ranks)
    state = ranks[0]["optimizer_state"]
    # P = (1 − β1ᵗ)(√(v / (1 − β2ᵗ)) + ε), Adam's defaults, t = 12, in parameter order.
    t, beta1, beta2, eps = 12, 0.9, 0.999, 1e-8
    v = torch.cat(
        [torch.tensor(state[f"{i}.exp_avg_sq"], dtype=torch.float64).reshape(-1) for i in range(6)]
    )
    p = (1 - beta1**t) * ((v / (1 - beta2**t)).sqrt() + eps)
    scaled = hessian / p.sqrt()[:, None] / p.sqrt()[None, :]
    exact = float(torch.linalg.eigvalsh(scaled)[-1])
    assert abs(ranks[0]["history"][-1]["curvature/preconditioned_lambda_max"] - exact) <= (
        FD_RELATIVE * exact
    )


def test_a_failure_on_one_rank_is_skipped_on_every_rank_with_its_cause(runs):
    ranks, plain = runs["fail-sgd"], runs["plain-sgd"]
    # Rank 1's loss raised at step 8: both ranks skip that point, and training is untouched.
    assert [h["step"] for h in ranks[0]["history"]] == [4, 12]
    assert [h["step"] for h in ranks[1]["history"]] == [4, 12]
    assert ranks[0]["params"] == plain[0]["params"]
    (warning,) = ranks[0]["warnings"]  # rank zero speaks, naming rank 1's own cause
    assert "on rank 1" in warning and "rank one's loss broke" in warning


def test_the_calibrated_budget_with_a_slowed_rank_agrees_and_does_not_hang(runs):
    ranks = runs["budget-sgd"]
    steps = [[h["step"] for h in r["history"]] for r in ranks]
    assert steps[0] == steps[1] and len(steps[0]) >= 3 and steps[0][-1] == 24


def test_resume_from_a_distributed_checkpoint_goes_on_where_it_stopped(runs):
    resumed, plain = runs["resume-sgd"], runs["resume_plain-sgd"]
    # The history of the first 8 steps came back from the checkpoint; step 12 is new.
    assert [h["step"] for h in resumed[0]["history"]] == [4, 8, 12]
    assert resumed[0]["params"] == plain[0]["params"]
    assert resumed[0]["optimizer_state"] == plain[0]["optimizer_state"]
