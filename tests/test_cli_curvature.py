"""``analyze --curvature ggn|fisher``: the GGN and the Fisher of a saved model, checked
against dense float64 matrices built here from the Jacobian (``torch.func.jacrev``) and the
closed-form output-space curvature of the mean squared error, never from the package."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lightning_curvature._lightning import pl
from lightning_curvature.demo import DigitsClassifier, DigitsDataModule
from tests.test_cli import MODEL, first_batches, run_main
from tests.truth import dense_hessian

pytest.importorskip("sklearn")

DATA = "lightning_curvature.demo.DigitsDataModule"
NUM_BATCHES = 2
DAMPING = 0.1


@pytest.fixture(scope="module")
def mse_checkpoint(tmp_path_factory):
    """A 310-parameter MSE DigitsClassifier (one hidden layer of 4) after 10 SGD steps on
    one-hot targets, saved with its data module's hyper-parameters."""
    torch.manual_seed(0)
    model = DigitsClassifier(hidden_sizes=[4], loss="mse", optimizer="sgd", lr=0.5)
    trainer = pl.Trainer(
        max_steps=10,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, DigitsDataModule(batch_size=32, targets="onehot"))
    path = tmp_path_factory.mktemp("mse") / "mse.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def mse_truth(mse_checkpoint):
    """Dense float64 matrices of the mean MSE over the batches analyze takes: the GGN
    mean_b 2/(N·K)·J_bᵀJ_b, the empirical Fisher 1/P·Σ_p J_pᵀ r_p r_pᵀ J_p with
    r_p = 2/K·(f_p − y_p), and the Hessian."""
    net = copy.deepcopy(DigitsClassifier.load_from_checkpoint(mse_checkpoint).net).double()
    batches = first_batches(DigitsDataModule(batch_size=32, targets="onehot"), NUM_BATCHES)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def outputs_at(flat, inputs):
        values, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            values[name] = flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return torch.func.functional_call(net, values, (inputs,))

    ggn, fisher = 0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.double(), targets.double()
        jacobian = torch.func.jacrev(outputs_at)(theta, inputs)  # (N, K, P)
        n, k, _ = jacobian.shape
        ggn = ggn + 2 / (n * k) * torch.einsum("nkp,nkq->pq", jacobian, jacobian)
        residuals = 2 / k * (outputs_at(theta, inputs) - targets)  # (N, K)
        projected = torch.einsum("nk,nkp->np", residuals, jacobian)
        fisher = fisher + projected.T @ projected / n
    hessian = dense_hessian(
        net, lambda model, b: ((model(b[0]) - b[1]) ** 2).mean(), batches, names
    )

    def mean_loss(flat):
        losses = [((outputs_at(flat, x.double()) - y) ** 2).mean() for x, y in batches]
        return sum(losses) / len(losses)

    gradient = torch.func.grad(mean_loss)(theta)
    return ggn / len(batches), fisher / len(batches), hessian, gradient


def analyze(checkpoint, out, *extra):
    code, printed, errors = run_main(
        [
            *("analyze", checkpoint, "--model", MODEL, "--data", DATA, "--out", out),
            *("--num-batches", NUM_BATCHES, "--no-progress", *extra),
        ]
    )
    assert code == 0, errors
    return json.loads((out / "summary.json").read_text()), printed


@pytest.fixture(scope="module")
def ggn_analysis(mse_checkpoint, tmp_path_factory):
    """`analyze --curvature ggn --loss mse --per-layer --solve` once: summary, printed
    table and the saved Newton step."""
    out = tmp_path_factory.mktemp("ggn") / "analysis"
    summary, printed = analyze(
        mse_checkpoint,
        out,
        *("--curvature", "ggn", "--loss", "mse", "--k", 3),
        *("--per-layer", "--solve", "--damping", DAMPING),
    )
    return summary, printed, torch.load(out / "newton_step.pt").double()


def test_ggn_matches_the_dense_gauss_newton_matrix_and_differs_from_the_hessian(
    ggn_analysis, mse_truth
):
    summary, printed, _ = ggn_analysis
    ggn, _, hessian, _ = mse_truth
    exact = torch.linalg.eigvalsh(ggn).flip(0)
    measured = summary["measurement"]
    assert summary["curvature"] == measured["curvature"] == "ggn"
    assert summary["matrix"] == "GGN (mse)"
    assert measured["lambda_max"] == pytest.approx(exact[0].item(), rel=1e-3)
    assert measured["eigenvalues"] == pytest.approx(exact[:3].tolist(), rel=1e-2)
    assert abs(measured["trace"] - exact.sum().item()) <= 4 * measured["trace_stderr"]
    # The GGN is not the Hessian here: the residual term makes the Hessian indefinite and
    # moves its top eigenvalue, and the measured λmax is the GGN's, not the Hessian's.
    hessian_spectrum = torch.linalg.eigvalsh(hessian)
    assert torch.linalg.matrix_norm(hessian - ggn) > 0.05 * torch.linalg.matrix_norm(ggn)
    assert hessian_spectrum[0] < -1e-3 * exact[0] and exact[-1] > -1e-12
    gap = abs(measured["lambda_max"] - hessian_spectrum[-1].item())
    assert gap > 10 * abs(measured["lambda_max"] - exact[0].item())
    # PSD: λmin is skipped, with a line saying why.
    assert measured["lambda_min"] is None
    assert "positive semi-definite" in summary["lambda_min_skipped"]
    assert printed.startswith("GGN (mse) of DigitsClassifier's training loss")
    assert any(line.split()[:2] == ["λmin", "skipped"] for line in printed.splitlines())
    assert summary["stability"].endswith("applied to the GGN (mse)'s λmax, not the Hessian's)")
    # Per layer, each block's λmax is that of the dense GGN's diagonal block.
    layers = summary["per_layer"]["layers"]
    for name, piece in {"net.0": slice(0, 260), "net.2": slice(260, 310)}.items():
        expected = torch.linalg.eigvalsh(ggn[piece, piece])[-1].item()
        assert layers[name]["lambda_max"] == pytest.approx(expected, rel=1e-3)


def test_newton_step_on_the_ggn_solves_the_dense_damped_system(ggn_analysis, mse_truth):
    summary, _, x = ggn_analysis
    ggn, _, _, gradient = mse_truth
    damped = ggn + DAMPING * torch.eye(ggn.shape[0], dtype=torch.float64)
    exact = torch.linalg.solve(damped, gradient)
    assert torch.linalg.vector_norm(x - exact) <= 1e-4 * torch.linalg.vector_norm(exact)
    step = summary["newton_step"]
    predicted = (gradient @ exact - 0.5 * exact @ ggn @ exact).item()
    assert step["predicted_decrease"] == pytest.approx(predicted, rel=1e-4)


def test_empirical_fisher_matches_the_dense_outer_product_of_output_gradients(
    mse_checkpoint, mse_truth, tmp_path
):
    summary, _ = analyze(
        mse_checkpoint,
        tmp_path / "fisher",
        *("--curvature", "fisher", "--loss", "mse", "--fisher-kind", "empirical"),
        *("--k", 1, "--num-probes", 2),
    )
    _, fisher, _, _ = mse_truth
    assert summary["matrix"] == "empirical Fisher (mse)"
    assert summary["settings"]["fisher_kind"] == "empirical"
    expected = torch.linalg.eigvalsh(fisher)[-1].item()
    assert summary["measurement"]["lambda_max"] == pytest.approx(expected, rel=1e-3)
    assert summary["measurement"]["lambda_min"] is None
