"""memory_budget_mb: the estimators' vectors are bounded per rank, kept or refused up front."""

import pytest
import torch

import lightning_curvature.measure.tiers as tiers
from lightning_curvature import CurvatureMonitor
from lightning_curvature.measure.tiers import MeasureSettings
from lightning_curvature.monitor.measurer import bounded, working_vectors
from tests.lightning_models import Classifier, classification_data, loader, mlp, trainer
from tests.truth import cross_entropy_loss, dense_hessian

MLP_DIM = 10 * 16 + 16 + 16 * 4 + 4  # tests.lightning_models.mlp()
VECTOR_MB = MLP_DIM * 4 / 2**20  # float32


def budget_for(basis: int, k: int, trace: bool = True) -> float:
    """The budget that holds a basis of ``basis`` vectors beside the working ones."""
    working = working_vectors(MeasureSettings(k=k, trace=trace))
    return (basis + working + 0.5) * VECTOR_MB


def test_the_budget_caps_the_basis_or_refuses_saying_what_fits():
    settings = MeasureSettings(k=2, density_iters=40)
    capped, refusal = bounded(settings, MLP_DIM, 4, budget_for(12, k=2))
    assert refusal is None and capped.num_iters == 12 and capped.density_iters == 12
    # λmax may restart until it has spent what an unbounded run could (30 + 10k = 50).
    assert capped.restarts == 4
    assert bounded(settings, MLP_DIM, 4, None) == (settings, None)
    _, refusal = bounded(settings, MLP_DIM, 4, budget_for(3, k=2))  # under k + 2 = 4
    assert refusal is not None
    assert "memory_budget_mb=" in refusal and f"{MLP_DIM} entries" in refusal
    # float64 vectors take twice the room: the same budget holds half as many.
    halved, _ = bounded(settings, MLP_DIM // 2, 8, budget_for(12, k=2))
    assert halved.num_iters == 12
    # Without the trace there is no probe block to hold: 16 more basis vectors fit.
    untraced, _ = bounded(MeasureSettings(k=2, trace=False), MLP_DIM, 4, budget_for(12, k=2))
    assert untraced.num_iters == 12 + 16


def test_a_budget_too_small_is_refused_at_the_start_and_training_goes_on(tmp_path):
    monitor = CurvatureMonitor(every_n_steps=2, memory_budget_mb=budget_for(2, k=5))
    with pytest.warns(UserWarning, match="memory_budget_mb"):
        run = trainer(tmp_path, [monitor], max_steps=6, logger=False)
        run.fit(Classifier(mlp()), loader(classification_data()))
    assert run.global_step == 6 and monitor.history == []
    assert "memory_budget_mb" in monitor.disabled_reason


def test_a_bounded_basis_gives_the_unbounded_lambda_max_and_stays_under_the_cap(
    tmp_path, monkeypatch
):
    seen = []
    original = tiers.lanczos

    def recording(op, **kwargs):
        result = original(op, **kwargs)
        seen.append((kwargs.get("num_iters"), result.num_iters))
        return result

    monkeypatch.setattr(tiers, "lanczos", recording)
    histories = {}
    for cap in (None, 24, 12):
        torch.manual_seed(0)
        budget = None if cap is None else budget_for(cap, k=2)
        monitor = CurvatureMonitor(
            every_n_steps=4, log_spaced=False, max_overhead=None, k=2, memory_budget_mb=budget
        )
        run = trainer(tmp_path, [monitor], max_steps=16, logger=False)
        module = Classifier(mlp())
        run.fit(module, loader(classification_data()))
        histories[cap] = {h["step"]: h.get("curvature/lambda_max") for h in monitor.history}
        # Independent truth at the last measured step (16, the final parameters): the dense
        # float64 Hessian on the probe batch, within the monitor's tol (1e-3).
        probe = tuple(monitor.probes.stored[0])
        exact = torch.linalg.eigvalsh(dense_hessian(module.net, cross_entropy_loss, [probe]))
        assert histories[cap][16] == pytest.approx(exact[-1].item(), rel=1e-3)
        if cap is not None:
            assert all(asked == cap and used <= cap for asked, used in seen)
        seen.clear()
    unbounded = histories[None]
    assert None not in unbounded.values()
    assert list(histories[24].values()) == pytest.approx(list(unbounded.values()), rel=1e-3)
    # At 12 the full measurement at step 4 (top 2 with their guards) needs more steps than
    # the cap: unconverged, it is not logged; the warm track points still converge.
    tight = histories[12]
    assert tight[4] is None
    assert [tight[s] for s in (8, 12, 16)] == pytest.approx(
        [unbounded[s] for s in (8, 12, 16)], rel=1e-3
    )


def test_peak_memory_is_reported_on_cuda_only(tmp_path):
    from lightning_curvature.measure.module import peak_memory

    with peak_memory(torch.device("cpu")) as found:
        torch.ones(1000)
    assert found == []  # a CPU keeps no peak: nothing is claimed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_on_cuda_covers_what_the_measurement_held(tmp_path):
    from lightning_curvature.measure.module import peak_memory

    device = torch.device("cuda")
    with peak_memory(device) as found:
        block = torch.ones(2**20, device=device)  # 4 MiB held inside the block
        del block
    assert found and found[0] >= 4.0
