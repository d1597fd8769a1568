"""DDP through Lightning's own strategy="ddp": two CPU processes over gloo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_curvature.operators.blocks import parameter_blocks
from tests.lightning_models import mlp
from tests.truth import cross_entropy_loss, dense_hessian

ROOT = Path(__file__).resolve().parents[1]


needs_distributed = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed missing"
)


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    """Both ranks' reports of every scenario of ``tests/scripts/ddp_monitor.py``, from one
    launch of two ranks."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PL_DISABLE_FORK": "1"}
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "scripts" / "ddp_monitor.py"),
            str(out),
            str(tmp_path / "logs"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {
        name: [json.loads(Path(f"{out}.{name}.rank{r}").read_text()) for r in (0, 1)]
        for name in ("union", "budget", "nan", "warn")
    } | {"logs": tmp_path / "logs"}


@needs_distributed
def test_ddp_ranks_agree_on_the_hessian_of_the_union_of_their_probe_batches(scenarios):
    ranks = scenarios["union"]
    # Identical numbers on every rank (averaged products, shared probe seeds), the critical
    # sharpness too (its search sees the loss averaged over ranks at every evaluation).
    assert ranks[0]["lambda_max"] == ranks[1]["lambda_max"]
    assert ranks[0]["critical"] == ranks[1]["critical"] and ranks[0]["critical"][-1] is not None
    # Each rank probed its own batch; the truth is the Hessian of their mean loss.
    batches = [tuple(torch.tensor(t) for t in r["probe"]) for r in ranks]
    batches = [(x.float(), y.long()) for x, y in batches]
    assert not torch.equal(batches[0][0], batches[1][0])
    net = mlp()
    net.load_state_dict({k: torch.tensor(v) for k, v in ranks[0]["state"].items()})
    truth = torch.linalg.eigvalsh(dense_hessian(net.eval(), cross_entropy_loss, batches))[-1]
    assert ranks[0]["lambda_max"] == pytest.approx(truth.item(), rel=1e-3)
    # Each layer's λmax: every rank applies its blocks directly, and one all-reduce averages
    # them; the truth is the union Hessian's diagonal block.
    hessian = dense_hessian(net.eval(), cross_entropy_loss, batches)
    blocks = parameter_blocks(*zip(*net.named_parameters(), strict=True))
    assert ranks[0]["layers"] == ranks[1]["layers"] and len(ranks[0]["layers"]) == len(blocks)
    for name, piece in blocks:
        block_truth = torch.linalg.eigvalsh(hessian[piece, piece])[-1].item()
        logged = ranks[0]["layers"][f"curvature/layer/net.{name}/lambda_max"]
        assert logged == pytest.approx(block_truth, rel=1e-3), name
    # Only rank 0 wrote TensorBoard files.
    runs = list((scenarios["logs"] / "union" / "ddp").glob("version_*"))
    assert len(runs) == 1 and list(runs[0].glob("events.out.tfevents.*"))


@needs_distributed
def test_ddp_with_the_budget_on_and_ranks_at_different_speeds_finishes_in_step(scenarios):
    # Each rank reads its own clock, so their overhead estimates differ; only the
    # calibrated cadence depends on a clock, and rank 0's is used by both.
    ranks = scenarios["budget"]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 60
    assert ranks[0]["steps"] == ranks[1]["steps"]
    assert ranks[0]["steps"][:4] == [1, 2, 4, 8]
    assert ranks[0]["lambda_max"] == ranks[1]["lambda_max"]


@needs_distributed
def test_ddp_a_failure_on_one_rank_is_skipped_everywhere_with_its_real_cause(scenarios):
    ranks = scenarios["nan"]
    for report in ranks:
        assert report["steps"] == [2, 6]  # step 4 skipped on both ranks
        failures = [w for w in report["warnings"] if "a measurement failed" in w]
        if report["rank"] == 0:  # only rank 0 warns (rank_zero_warn)
            assert len(failures) == 1
            assert "rank 1" in failures[0] and "the loss on the probe batches is nan" in failures[0]


@needs_distributed
def test_ddp_early_warning_agrees_across_ranks_without_a_hang(scenarios):
    ranks = scenarios["warn"]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 60
    for key in ("steps", "alerts", "spikes", "triggered"):
        assert ranks[0][key] == ranks[1][key], key
    kinds = {kind: step for kind, step in ranks[0]["alerts"]}
    assert kinds.get("predicted_edge") == 31  # the raised step, before a measurement
    assert ranks[0]["triggered"] >= 1
    # Rank 1's own loss jump at 41-42 (two steps far above: a jump), agreed at the next
    # multiple of min_gap (8): step 48.
    assert ranks[0]["spikes"] == [48]
