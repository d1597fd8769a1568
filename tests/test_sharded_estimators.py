"""The estimators on vectors sharded across two processes (gloo, CPU), against the same
matrix's known spectrum: every reduction goes through the operator's ``sum_over_shards``,
so each process holds only its slice of every Krylov vector and both report the same
numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.truth import matrix_with_spectrum

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
from sharded_estimators import SIZE, spectrum  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed missing"
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "report.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "sharded_estimators.py"), str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]


def test_the_shards_partition_the_vector(ranks):
    assert ranks[0]["rows"] == [0, 150] and ranks[1]["rows"] == [150, SIZE]


def test_every_process_reports_the_same_numbers(ranks):
    for key in ("top", "warm", "smallest", "power", "trace", "density"):
        if key == "top":
            assert ranks[0][key]["eigenvalues"] == ranks[1][key]["eigenvalues"]
        else:
            assert ranks[0][key] == ranks[1][key], key


def test_top_eigenpairs_against_the_known_spectrum(ranks):
    top = ranks[0]["top"]
    truth = spectrum().sort(descending=True).values[:5]
    values, bounds = torch.tensor(top["eigenvalues"]), torch.tensor(top["error_bounds"])
    assert top["converged"]
    assert ((values - truth).abs() <= bounds).all()
    assert (bounds <= 1e-4 * 40.0).all()  # within tol of the spectral scale
    # The shards put together are the eigenvectors of the whole matrix.
    shards = [torch.tensor(r["top"]["vector_shards"], dtype=torch.float64) for r in ranks]
    vectors = torch.cat(shards, dim=1)
    exact = torch.linalg.eigh(matrix_with_spectrum(spectrum(), seed=3)).eigenvectors
    overlap = (vectors @ exact[:, -5:].flip(1)).diagonal().abs()
    assert torch.allclose(overlap, torch.ones(5, dtype=torch.float64), atol=1e-6)


def test_warm_start_from_the_shards_of_an_eigenvector_converges_at_its_seed(ranks):
    assert ranks[0]["warm"]["num_matvecs"] == 1
    assert abs(ranks[0]["warm"]["eigenvalue"] - 40.0) <= 1e-4 * 40.0


def test_smallest_and_power_iteration(ranks):
    smallest = ranks[0]["smallest"]
    assert smallest["converged"] and abs(smallest["eigenvalue"] + 9.0) <= smallest["error_bound"]
    # Power iteration's Rayleigh quotient errs by about residual² / gap (gap 9).
    power = ranks[0]["power"]
    assert abs(power["eigenvalue"] - 40.0) <= power["residual"] ** 2 / 9.0 * 10 + 1e-9


def test_traces_are_unbiased_over_sharded_probes(ranks):
    # Probes differ per shard (their seeds do), so the sharded Rademacher vector has
    # independent entries and Hutchinson stays unbiased: within 4 standard errors.
    exact = float(spectrum().sum())
    for estimate, stderr in ranks[0]["trace"].values():
        assert abs(estimate - exact) <= 4 * stderr


def test_spectral_density_reaches_the_top_and_unshardable_estimators_refuse(ranks):
    assert abs(ranks[0]["density"]["nodes_max"] - 40.0) < 1e-6
    for message in ranks[0]["refused"].values():
        assert "sharded" in message and "150 of 301" in message
    assert set(ranks[0]["refused"]) == {"hutch++", "blockwise"}
