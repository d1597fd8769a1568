"""`analyze` under torchrun: two CPU processes, the checkpoint's model sharded by FSDP2,
against the dense Hessian of the same probe batches and Adam's preconditioner read whole."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning_fabric.plugins.environments.lightning import find_free_network_port
from torch.nn import functional as F

from lightning_curvature.demo import DigitsClassifier, DigitsDataModule
from tests.test_cli import MODEL, first_batches, tiny_adam_checkpoint  # noqa: F401
from tests.truth import adam_preconditioner, dense_hessian, preconditioned_lambda_max

ROOT = Path(__file__).resolve().parents[1]
BATCHES = 4  # two per process

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed missing"
)


def torchrun(checkpoint, out, *extra):
    return subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
            *(
                "--master_port",
                str(find_free_network_port()),
                "-m",
                "lightning_curvature",
                "analyze",
            ),
            *(
                str(checkpoint),
                "--model",
                MODEL,
                "--data",
                "lightning_curvature.demo.DigitsDataModule",
            ),
            *("--num-batches", str(BATCHES), "--num-probes", "8", "--k", "2", "--out", str(out)),
            *("--threads", "1", "--no-progress", *extra),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_analyze_under_torchrun_matches_the_dense_hessian(tiny_adam_checkpoint, tmp_path):  # noqa: F811
    completed = torchrun(tiny_adam_checkpoint, tmp_path / "sharded")
    assert completed.returncode == 0, completed.stderr[-3000:]
    measured = json.loads((tmp_path / "sharded" / "summary.json").read_text())["measurement"]
    model = DigitsClassifier.load_from_checkpoint(tiny_adam_checkpoint)
    batches = first_batches(DigitsDataModule(batch_size=32), BATCHES)
    hessian = dense_hessian(model.net, lambda n, b: F.cross_entropy(n(b[0]), b[1]), batches)
    exact = torch.linalg.eigvalsh(hessian).flip(0)
    # Finite differences on float32 shards: the contract is 1e-3 relative for λmax.
    assert measured["lambda_max"] == pytest.approx(exact[0].item(), rel=1e-3)
    assert measured["eigenvalues"][1] == pytest.approx(exact[1].item(), rel=1e-2)
    assert abs(measured["trace"] - exact.sum().item()) <= 4 * measured["trace_stderr"]
    # Adam's P, read from the checkpoint whole and sliced as FSDP2 slices the parameters.
    state = torch.load(tiny_adam_checkpoint, weights_only=False)["optimizer_states"][0]
    step = state["state"][0]["step"].item()
    v = torch.cat([s["exp_avg_sq"].reshape(-1) for s in state["state"].values()])
    expected = preconditioned_lambda_max(hessian, adam_preconditioner(v, step))
    assert measured["preconditioned_lambda_max"] == pytest.approx(expected, rel=1e-3)


def test_torchrun_refuses_what_a_sharded_analysis_cannot_do(tiny_adam_checkpoint, tmp_path):  # noqa: F811
    completed = torchrun(tiny_adam_checkpoint, tmp_path / "refused", "--per-layer")
    assert completed.returncode != 0
    assert "under torchrun analyze measures the whole Hessian only" in completed.stderr
