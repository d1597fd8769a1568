"""DDP through Lightning's own strategy="ddp": two CPU processes over gloo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.lightning_models import mlp
from tests.truth import cross_entropy_loss, dense_hessian

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_ddp_ranks_agree_on_the_hessian_of_the_union_of_their_probe_batches(tmp_path):
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
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
    # Identical numbers on every rank (averaged products, shared probe seeds).
    assert ranks[0]["lambda_max"] == ranks[1]["lambda_max"]
    # Each rank probed its own batch; the truth is the Hessian of their mean loss.
    batches = [tuple(torch.tensor(t) for t in r["probe"]) for r in ranks]
    batches = [(x.float(), y.long()) for x, y in batches]
    assert not torch.equal(batches[0][0], batches[1][0])
    net = mlp()
    net.load_state_dict({k: torch.tensor(v) for k, v in ranks[0]["state"].items()})
    truth = torch.linalg.eigvalsh(dense_hessian(net.eval(), cross_entropy_loss, batches))[-1]
    assert ranks[0]["lambda_max"] == pytest.approx(truth.item(), rel=1e-3)
    # Only rank 0 wrote TensorBoard files.
    runs = list((tmp_path / "logs" / "ddp").glob("version_*"))
    assert len(runs) == 1 and list(runs[0].glob("events.out.tfevents.*"))
