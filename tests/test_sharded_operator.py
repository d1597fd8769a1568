"""ShardedHessianOperator under FSDP2 (``fully_shard``): two CPU ranks over gloo, checked
against dense float64 truth computed here on the unsharded model and the union of the
ranks' batches (tests/scripts/sharded_operator.py runs the ranks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.truth import cross_entropy_loss, dense_hessian

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("lsq", "mlp64", "mlp32", "mlp_bf16", "mlp_mixed")


def fsdp2_available() -> bool:
    if not torch.distributed.is_available():
        return False
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not fsdp2_available(), reason="torch.distributed or FSDP2's fully_shard missing"
)

# How far the finite-difference products may be from the exact Hessian (relative, in norm).
# Central differences err by O(eps^2) truncation plus O(u / eps) rounding; with the step of
# finite_difference_step the package's contract is 1e-8..1e-7 in float64 and 2e-4..1e-3 on
# smooth models in float32 (HessianOperator's hvp_method docs, benchmarks/RESULTS.md), so
# 1e-6 and 1e-3 (measured here: 2e-8..7e-8 and 3e-4..3.5e-4). Least squares has no
# truncation error (a quadratic), only rounding. bf16 shards, and float32 ones that FSDP2
# casts to bf16 for the forward pass, run the model in bf16 and round the shifted shards
# to it: 2-4% measured (LOW_PRECISION_RELATIVE_STEP), so 1e-1.
PRODUCT_TOLERANCE = {"lsq": 1e-6, "mlp64": 1e-6, "mlp32": 1e-3, "mlp_bf16": 0.1, "mlp_mixed": 0.1}
# Loss and gradient involve no difference quotient: only summation order differs from the
# truth, and in bf16 the forward pass's own rounding (2^-8).
EXACT_TOLERANCE = {"lsq": 1e-12, "mlp64": 1e-12, "mlp32": 1e-5, "mlp_bf16": 3e-2, "mlp_mixed": 3e-2}
# Inner products sum the same numbers in another order; vectors are float32 below float64.
INNER_TOLERANCE = {"lsq": 1e-12, "mlp64": 1e-12, "mlp32": 1e-5, "mlp_bf16": 1e-5, "mlp_mixed": 1e-5}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' reports, per scenario, from one launch of two ranks."""
    tmp_path = tmp_path_factory.mktemp("sharded")
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "sharded_operator.py"), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    reports = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    return {name: [report[name] for report in reports] for name in reports[0]}


def squared_error(model, batch):
    inputs, targets = batch
    return ((model(inputs) - targets) ** 2).mean()


def unsharded_model(name, state):
    """The script's model in float64, with the state every rank started from."""
    if name == "lsq":
        model = nn.Linear(8, 1)
    else:
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model.double().load_state_dict(
        {k: torch.tensor(v, dtype=torch.float64) for k, v in state.items()}
    )
    return model


def union_of_batches(name, ranks):
    """Rank 0's batches, then rank 1's, in float64 (class targets as integers)."""
    batches = []
    for report in ranks:
        for inputs, targets in report["batches"]:
            targets = torch.tensor(targets, dtype=torch.float64 if name == "lsq" else torch.long)
            batches.append((torch.tensor(inputs, dtype=torch.float64), targets))
    return batches


def unsharded(ranks, key):
    """A vector in the unsharded flat order from the ranks' shards: FSDP2 shards each
    parameter on dim 0, rank 0 holding the first rows, so each parameter's flat piece is
    its ranks' pieces concatenated in rank order."""
    per_rank = [
        torch.split(torch.tensor(r[key], dtype=torch.float64), r["local_numels"]) for r in ranks
    ]
    return torch.cat([torch.cat(pieces) for pieces in zip(*per_rank, strict=True)])


def loss_fn_of(name):
    return squared_error if name == "lsq" else cross_entropy_loss


def relative_error(value, truth):
    return float(torch.linalg.vector_norm(value - truth) / torch.linalg.vector_norm(truth))


@pytest.mark.parametrize("name", SCENARIOS)
def test_sharded_products_are_the_hessian_of_the_ranks_mean_loss(ranks, name):
    pair = ranks[name]
    model = unsharded_model(name, pair[0]["state"])
    batches = union_of_batches(name, pair)
    # Each rank has its own data.
    assert not any(torch.equal(a, b) for a, b in zip(batches[0], batches[-1], strict=True))
    hessian = dense_hessian(model, loss_fn_of(name), batches)
    v = unsharded(pair, "v_local")
    truth = hessian @ v
    assert relative_error(unsharded(pair, "hv_local"), truth) < PRODUCT_TOLERANCE[name]
    # vᵀHv by the operator's inner product: one number, the same on every rank, off the
    # truth by at most what the product's error allows (|vᵀe| <= |v| |e|; relative to vᵀHv
    # itself it can be far more, where vᵀHv is small against |v| |Hv|).
    assert pair[0]["vhv"] == pair[1]["vhv"]
    allowed = PRODUCT_TOLERANCE[name] * float(v.norm() * truth.norm())
    assert abs(pair[0]["vhv"] - float(v @ truth)) < allowed
    assert all(r["num_matvecs"] == 2 for r in pair)  # a block of two columns
    assert all(r["repeated_exactly"] for r in pair)


def test_sharded_least_squares_is_two_over_n_xtx_even_with_a_rank_holding_nothing(ranks):
    lsq = ranks["lsq"]
    # nn.Linear(8, 1): one weight row and one bias, both on rank 0; rank 1's vectors are empty.
    assert [r["dim"] for r in lsq] == [9, 0] and all(r["local_dims"] == [9, 0] for r in lsq)
    assert all(r["total_dim"] == 9 for r in lsq)
    inputs = torch.cat([x for x, _ in union_of_batches("lsq", lsq)])
    design = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], dim=1)
    hessian = 2 / len(inputs) * design.T @ design
    v = unsharded(lsq, "v_local")
    assert relative_error(unsharded(lsq, "hv_local"), hessian @ v) < PRODUCT_TOLERANCE["lsq"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_sharded_inner_products_sum_over_ranks_with_matmul_shapes(ranks, name):
    pair = ranks[name]
    block = torch.stack([unsharded(pair, "v_local"), unsharded(pair, "u_local")], dim=1)
    products = torch.stack([unsharded(pair, "hv_local"), unsharded(pair, "hu_local")], dim=1)
    assert pair[0]["inner_block"] == pair[1]["inner_block"]
    inner = torch.tensor(pair[0]["inner_block"], dtype=torch.float64)
    assert inner.shape == (2, 2)
    assert torch.allclose(inner, block.T @ products, rtol=INNER_TOLERANCE[name], atol=0)
    # vector·vector, vector·block, block·vector, block·block: as aᵀ @ b would be.
    assert pair[0]["inner_shapes"] == [[], [2], [2], [2, 2]]


@pytest.mark.parametrize("name", SCENARIOS)
def test_sharded_loss_and_gradient_are_the_ranks_means(ranks, name):
    model = unsharded_model(name, ranks[name][0]["state"])
    batches = union_of_batches(name, ranks[name])
    loss = sum(loss_fn_of(name)(model, b) for b in batches) / len(batches)
    gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, model.parameters())])
    tolerance = EXACT_TOLERANCE[name]
    assert ranks[name][0]["loss"] == ranks[name][1]["loss"]
    assert ranks[name][0]["loss"] == pytest.approx(loss.item(), rel=tolerance)
    assert relative_error(unsharded(ranks[name], "gradient_local"), gradient) < tolerance


@pytest.mark.parametrize("name", SCENARIOS)
def test_sharded_operator_leaves_parameters_and_grads_bit_identical(ranks, name):
    for report in ranks[name]:
        assert report["after"] == report["before"]  # exact floats, through JSON's repr
        assert report["same_grad_objects"] and report["rng_unchanged"]
    # Least squares started without .grad (it stays None); the MLPs with a training step's,
    # which the same step after the operator reproduces bit for bit (no state left behind).
    had_grads = [g is not None for g in ranks[name][0]["before"]["grads"]]
    assert all(had_grads) if name != "lsq" else not any(had_grads)
    if name != "lsq":
        for report in ranks[name]:
            assert report["training_grads_after"] == report["before"]["grads"]


def test_sharded_operator_refuses_unequal_batch_counts_on_every_rank(ranks):
    for report in ranks["mismatch"]:
        assert "same number of probe batches" in report["error"]
        assert "[2, 1]" in report["error"]


def test_sharded_operator_refuses_a_module_that_is_not_sharded():
    from lightning_curvature.operators.sharded import ShardedHessianOperator

    with pytest.raises(ValueError, match="'weight' is a plain tensor, not a DTensor"):
        ShardedHessianOperator(nn.Linear(2, 1), squared_error, [(torch.ones(1, 2), torch.ones(1))])


def test_sharded_operator_steps_for_the_precision_the_model_runs_in(ranks):
    # bf16 storage, or a bf16 forward pass under FSDP2's MixedPrecisionPolicy: vectors in
    # float32, the step of LOW_PRECISION_RELATIVE_STEP (a float32 step vanishes in the cast).
    expected = {
        "lsq": ("torch.float64", "None"),
        "mlp64": ("torch.float64", "None"),
        "mlp32": ("torch.float32", "None"),
        "mlp_bf16": ("torch.float32", "torch.bfloat16"),
        "mlp_mixed": ("torch.float32", "torch.bfloat16"),
    }
    for name, (dtype, low_precision) in expected.items():
        assert all((r["dtype"], r["low_precision"]) == (dtype, low_precision) for r in ranks[name])


def test_sharded_operator_fixes_each_batchs_dropout_mask(ranks):
    # Dropout in train mode: with a fresh mask in every forward pass the differences would be
    # noise, asymmetric by O(1); with one fixed mask per batch the operator is one symmetric
    # matrix (uᵀHv = vᵀHu within the float64 products' error) and repeats bit for bit.
    pair = ranks["dropout"]
    block = torch.stack([unsharded(pair, "v_local"), unsharded(pair, "u_local")], dim=1)
    products = torch.stack([unsharded(pair, "hv_local"), unsharded(pair, "hu_local")], dim=1)
    inner = block.T @ products
    scale = float(block[:, 0].norm() * products[:, 1].norm())
    assert abs(float(inner[0, 1] - inner[1, 0])) < PRODUCT_TOLERANCE["mlp64"] * scale
    assert all(r["repeated_exactly"] for r in pair)
