"""The ``lightning-curvature`` command: the demo runs, offline analysis of checkpoints, and
one-line errors for bad input.

The numbers are checked against truth computed here without the package: ARPACK
(``scipy.sparse.linalg.eigsh``) on float64 Hessian-vector products from ``torch.func``, or
the dense float64 Hessian of ``tests.truth``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature._lightning import pl
from lightning_curvature.cli import main
from lightning_curvature.demo import (
    CHECKPOINT_NAME,
    EDGE_OF_STABILITY,
    SHARPENING,
    DigitsClassifier,
    DigitsDataModule,
    run_demo,
)
from tests.lightning_models import DESIGN_TAGS, read_events
from tests.truth import adam_preconditioner, dense_hessian, preconditioned_lambda_max

pytest.importorskip("sklearn")

MODEL = "lightning_curvature.demo.DigitsClassifier"


# ---------------------------------------------------------------------------- truth


def top_eigenvalues(net: nn.Module, loss_fn, batches, k: int = 1) -> np.ndarray:
    """The k largest eigenvalues of the float64 Hessian of the mean loss over ``batches``
    (over the parameters that require grad), descending: ARPACK on ``torch.func``
    forward-over-reverse products."""
    net64 = copy.deepcopy(net).double()
    trainable = {n: p.detach() for n, p in net64.named_parameters() if p.requires_grad}
    shapes = {n: p.shape for n, p in trainable.items()}
    batches64 = [tuple(t.double() if t.is_floating_point() else t for t in b) for b in batches]

    def mean_loss(theta: torch.Tensor) -> torch.Tensor:
        values, offset = {}, 0
        for name, shape in shapes.items():
            values[name] = theta[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        losses = [loss_fn(torch.func.functional_call(net64, values, (x,)), y) for x, y in batches64]
        return sum(losses) / len(losses)

    theta = torch.cat([p.reshape(-1) for p in trainable.values()])
    gradient = torch.func.grad(mean_loss)

    def hvp(v: np.ndarray) -> np.ndarray:
        tangent = torch.from_numpy(np.ascontiguousarray(v).reshape(-1))
        return torch.func.jvp(gradient, (theta,), (tangent,))[1].numpy()

    operator = LinearOperator((theta.numel(), theta.numel()), matvec=hvp, dtype=np.float64)
    values = eigsh(operator, k=k, which="LA", tol=1e-10, return_eigenvectors=False)
    return np.sort(values)[::-1]


def mse(outputs, targets):
    # Spelled out: F.mse_loss's backward does not support forward-mode AD over it.
    return ((outputs - targets) ** 2).mean()


def first_batches(datamodule: DigitsDataModule, count: int) -> list:
    datamodule.setup("fit")
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(batch)
        if len(batches) == count:
            return batches
    return batches


def scalars(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def run_main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def sharpening_demo(tmp_path_factory):
    """A shortened `lightning-curvature demo`: its output directory and what it printed."""
    out = tmp_path_factory.mktemp("demo")
    code, printed, _ = run_main(["demo", "--out", out, "--max-steps", 1500, "--no-progress"])
    assert code == 0
    (log_dir,) = (out / SHARPENING.name).iterdir()
    return out, log_dir, printed


@pytest.fixture(scope="module")
def final_demo_truth(sharpening_demo):
    """The top 5 eigenvalues of the saved demo model's Hessian on the monitor's probe batch
    (the first training batch), by ARPACK: shared by the demo and the analyze tests."""
    _, log_dir, _ = sharpening_demo
    probe = first_batches(DigitsDataModule(**SHARPENING.data), 1)
    final_model = DigitsClassifier.load_from_checkpoint(log_dir / CHECKPOINT_NAME)
    return top_eigenvalues(final_model.net, mse, probe, k=5)


def test_demo_prints_the_run_the_checkpoint_and_the_tensorboard_command(sharpening_demo):
    out, log_dir, printed = sharpening_demo
    assert f"tensorboard --logdir {out}" in printed
    assert str(log_dir / CHECKPOINT_NAME) in printed
    assert (log_dir / CHECKPOINT_NAME).is_file()
    restored = DigitsClassifier.load_from_checkpoint(log_dir / CHECKPOINT_NAME)
    assert restored.hparams.lr == SHARPENING.model["lr"]


def test_demo_lambda_max_rises_and_every_sgd_tag_is_logged(sharpening_demo, final_demo_truth):
    _, log_dir, _ = sharpening_demo
    events = read_events(log_dir)
    tags = set(events.Tags()["scalars"])
    assert DESIGN_TAGS | {f"curvature/eigenvalue_{i}" for i in range(1, 6)} <= tags
    assert "curvature/preconditioned_lambda_max" not in tags  # plain SGD
    points = scalars(events, "curvature/lambda_max")
    curve = [value for _, value in points]
    assert len(curve) >= 5
    assert curve[-1] > 1.8 * curve[0]
    # λmax first dips for a few steps (the log-spaced points see it), then rises steadily.
    later = [value for step, value in points if step >= 256]
    rises = sum(b > a for a, b in itertools.pairwise(later))
    assert len(later) >= 3 and rises >= 0.8 * (len(later) - 1)

    # Independent truth: λmax of the model at initialisation and of the saved final model,
    # on the monitor's probe batch (the first training batch).
    probe = first_batches(DigitsDataModule(**SHARPENING.data), 1)
    torch.manual_seed(0)
    initial = top_eigenvalues(DigitsClassifier(**SHARPENING.model).net, mse, probe)[0]
    final = final_demo_truth[0]
    assert final > 1.8 * initial
    assert curve[0] == pytest.approx(initial, rel=0.05)  # measured after one small step
    threshold = dict(scalars(events, "curvature/stability_threshold"))
    assert set(threshold.values()) == {2.0}
    lr = SHARPENING.model["lr"]
    for (_, product), (_, lam) in zip(
        scalars(events, "curvature/lambda_max_x_lr"),
        scalars(events, "curvature/lambda_max"),
        strict=True,
    ):
        assert product == pytest.approx(lam * lr, rel=1e-6)


def test_edge_of_stability_demo_hovers_at_lambda_max_lr_2(tmp_path):
    log_dir = run_demo(tmp_path, edge_of_stability=True, max_steps=1600, progress=False)
    events = read_events(log_dir)
    tags = set(events.Tags()["scalars"])
    assert DESIGN_TAGS | {"curvature/eigenvalue_1", "curvature/eigenvalue_2"} <= tags
    sharpness_lr = scalars(events, "curvature/lambda_max_x_lr")
    early = [v for step, v in sharpness_lr if step <= 200]
    late = [v for step, v in sharpness_lr if step >= 1100]
    assert max(early) < 1.2  # it starts well below the edge ...
    assert len(late) >= 20  # ... and, measured every 20 steps, ...
    assert all(1.7 <= v <= 2.4 for v in late)  # ... then stays at 2
    assert 1.9 <= float(np.mean(late)) <= 2.2

    # The last logged λmax is the truth for the saved model on the full batch.
    full_batch = first_batches(DigitsDataModule(**EDGE_OF_STABILITY.data), 1)
    model = DigitsClassifier.load_from_checkpoint(log_dir / CHECKPOINT_NAME)
    exact = top_eigenvalues(model.net, mse, full_batch)[0]
    step, logged = scalars(events, "curvature/lambda_max")[-1]
    assert step == 1600
    assert logged == pytest.approx(exact, rel=1e-3)
    assert sharpness_lr[-1][1] == pytest.approx(exact * EDGE_OF_STABILITY.model["lr"], rel=1e-3)


def test_digits_data_module_splits_scales_and_batches_as_documented():
    from sklearn.datasets import load_digits

    pixels = torch.as_tensor(load_digits().data, dtype=torch.float32)
    data = DigitsDataModule(num_samples=500, full_batch=True, targets="onehot")
    data.setup("fit")
    (inputs, targets), *rest = list(data.train_dataloader())
    assert not rest and inputs.shape == (500, 64) and targets.shape == (500, 10)
    assert inputs.min() >= 0 and inputs.max() <= 1
    assert torch.equal(targets.sum(1), torch.ones(500))
    # Every training image is a digit scaled by 1/16, and none is in the validation set.
    rows = {tuple(row.tolist()) for row in pixels / 16}
    assert all(tuple(row.tolist()) in rows for row in inputs)
    validation = {tuple(row.tolist()) for row in data.val_set.inputs}
    assert len(data.val_set) == round(0.2 * len(pixels))
    assert not validation & {tuple(row.tolist()) for row in inputs}
    shuffled = DigitsDataModule(batch_size=64)
    sizes = [len(batch[0]) for batch in shuffled.train_dataloader()]
    assert sizes == [64] * 22 + [len(pixels) - len(data.val_set) - 64 * 22]


def test_mse_loss_accepts_class_or_onehot_targets_alike():
    torch.manual_seed(0)
    model = DigitsClassifier(loss="mse")
    model.log = lambda *args, **kwargs: None
    inputs, labels = torch.rand(8, 64), torch.arange(8)
    onehot = torch.eye(10)[labels]
    expected = ((model(inputs) - onehot) ** 2).mean()
    assert model.training_step((inputs, labels), 0).item() == pytest.approx(expected.item())
    assert model.training_step((inputs, onehot), 0).item() == pytest.approx(expected.item())


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"freeze_backbone": True}, "adapter_rank"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"lr": 0}, "lr"),
        ({"hidden_sizes": [0]}, "hidden_sizes"),
        ({"activation": "gelu"}, "activation"),
    ],
)
def test_digits_classifier_rejects_bad_arguments_by_name(kwargs, named):
    with pytest.raises(ValueError, match=named):
        DigitsClassifier(**kwargs)


# ---------------------------------------------------------------------------- analyze


def test_analyze_on_the_demo_checkpoint_matches_arpack(sharpening_demo, final_demo_truth, tmp_path):
    _, log_dir, _ = sharpening_demo
    checkpoint = log_dir / CHECKPOINT_NAME
    out = tmp_path / "analysis"
    code, printed, _ = run_main(
        [
            *("analyze", checkpoint, "--model", MODEL, "--demo-data", "--num-batches", 1),
            *("--out", out, "--no-progress"),
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    measured = summary["measurement"]

    exact = final_demo_truth
    assert measured["lambda_max"] == pytest.approx(exact[0], rel=1e-3)
    np.testing.assert_allclose(measured["eigenvalues"], exact, rtol=1e-2)
    assert measured["converged"] is True
    assert measured["lambda_min"] < 0.05 * exact[0]  # the bottom of the spectrum
    assert measured["step"] == summary["global_step"] == 1500
    # The optimizer was rebuilt from the checkpoint: plain SGD with the demo's η.
    assert measured["stability_threshold"] == 2.0
    assert measured["lambda_max_x_lr"] == pytest.approx(exact[0] * SHARPENING.model["lr"], 1e-3)

    assert f"{measured['lambda_max']:.6g}" in printed  # the table shows the same numbers
    assert (out / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = read_events(out)
    tags = set(events.Tags()["scalars"])
    assert DESIGN_TAGS | {"curvature/lambda_min", "curvature/eigenvalue_5"} <= tags
    assert scalars(events, "curvature/lambda_max") == [
        (1500, pytest.approx(measured["lambda_max"], rel=1e-6))
    ]
    assert "curvature/spectral_density" in events.Tags()["images"]
    assert "custom_scalars__config__" in events.Tags()["tensors"]


@pytest.fixture(scope="module")
def tiny_adam_checkpoint(tmp_path_factory):
    """A 610-parameter DigitsClassifier trained a few Adam steps, saved with its optimizer
    state and its data module's hyper-parameters."""
    directory = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = DigitsClassifier(hidden_sizes=[8], optimizer="adam", lr=0.01)
    trainer = pl.Trainer(
        max_steps=20,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    path = directory / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


TINY_BATCHES = 3


@pytest.fixture(scope="module")
def tiny_analysis(tiny_adam_checkpoint, tmp_path_factory):
    """`analyze` run once on the tiny checkpoint: its summary, what it printed, and how
    many times it unpickled a file."""
    out = tmp_path_factory.mktemp("tiny") / "analysis"
    loads = []
    real_load = torch.load

    def counting_load(*args, **kwargs):
        loads.append(args[0] if args else kwargs.get("f"))
        return real_load(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "load", counting_load)
        code, printed, _ = run_main(
            [
                *("analyze", tiny_adam_checkpoint, "--model", MODEL),
                *("--data", "lightning_curvature.demo.DigitsDataModule"),
                *("--num-batches", TINY_BATCHES, "--num-probes", 60, "--out", out),
                "--no-progress",
            ]
        )
    assert code == 0
    return json.loads((out / "summary.json").read_text()), printed, loads


@pytest.fixture(scope="module")
def tiny_truth(tiny_adam_checkpoint):
    """The tiny model's dense float64 Hessian on the batches analyze takes (the data module
    as saved in the checkpoint), its eigenvalues (descending) and Adam's P."""
    model = DigitsClassifier.load_from_checkpoint(tiny_adam_checkpoint)
    batches = first_batches(DigitsDataModule(batch_size=32), TINY_BATCHES)

    def cross_entropy(net, batch):
        return F.cross_entropy(net(batch[0]), batch[1])

    hessian = dense_hessian(model.net, cross_entropy, batches)
    state = torch.load(tiny_adam_checkpoint, weights_only=False)["optimizer_states"][0]
    step = state["state"][0]["step"].item()
    v = torch.cat([s["exp_avg_sq"].reshape(-1) for s in state["state"].values()])
    return hessian, torch.linalg.eigvalsh(hessian).flip(0), adam_preconditioner(v, step)


def test_analyze_matches_the_dense_hessian_and_adams_preconditioned_sharpness(
    tiny_analysis, tiny_truth
):
    measured = tiny_analysis[0]["measurement"]
    hessian, exact, p = tiny_truth
    assert measured["lambda_max"] == pytest.approx(exact[0].item(), rel=1e-3)
    np.testing.assert_allclose(measured["eigenvalues"], exact[:5].numpy(), rtol=1e-2)
    assert measured["lambda_min"] == pytest.approx(exact[-1].item(), rel=1e-2)
    assert abs(measured["trace"] - exact.sum().item()) <= 4 * measured["trace_stderr"]
    preconditioned = preconditioned_lambda_max(hessian, p)
    assert measured["preconditioned_lambda_max"] == pytest.approx(preconditioned, rel=1e-3)
    assert measured["stability_threshold"] == pytest.approx(38.0)
    assert measured["sharpness_x_lr"] == pytest.approx(preconditioned * 0.01, rel=1e-3)


def test_analyze_prints_lambda_min_with_its_convergence_and_the_learning_rate(
    tiny_analysis, tiny_truth
):
    summary, printed, _ = tiny_analysis
    rows = {line.split()[0]: line for line in printed.splitlines() if line.startswith("  ")}
    measured = summary["measurement"]
    assert f"{measured['lambda_min']:.6g}" in rows["λmin"]
    assert measured["lambda_min"] == pytest.approx(tiny_truth[1][-1].item(), rel=1e-2)
    flag = measured.get("lambda_min_converged")  # a field of newer Measurement records
    expected = {True: "converged", False: "NOT converged", None: "convergence not reported"}
    assert rows["λmin"].split(maxsplit=2)[2].startswith(expected[flag])
    # The saved Adam's learning rate, read from the rebuilt optimizer.
    assert rows["η"].split()[1] == "0.01" and measured["learning_rate"] == pytest.approx(0.01)


def test_analyze_within_a_memory_budget_gives_the_same_lambda_max(
    tiny_adam_checkpoint, tiny_truth, tmp_path
):
    code, printed, _ = run_main(
        [
            *("analyze", tiny_adam_checkpoint, "--model", MODEL),
            *("--data", "lightning_curvature.demo.DigitsDataModule"),
            *("--num-batches", TINY_BATCHES, "--num-probes", 4, "--out", tmp_path / "bounded"),
            *("--k", 1, "--memory-budget-mb", 2),
            "--no-progress",
        ]
    )
    assert code == 0, printed
    measured = json.loads((tmp_path / "bounded" / "summary.json").read_text())["measurement"]
    assert measured["lambda_max"] == pytest.approx(tiny_truth[1][0].item(), rel=1e-3)


def test_analyze_unpickles_the_checkpoint_once(tiny_analysis, tiny_adam_checkpoint):
    assert tiny_analysis[2] == [tiny_adam_checkpoint]


DAMPING = 1.0  # H + εI has eigenvalues in [0.77, 3.5] here: a well-posed system to compare


@pytest.fixture(scope="module")
def tiny_layers_and_newton(tiny_adam_checkpoint, tmp_path_factory):
    """`analyze --per-layer --solve` on the tiny checkpoint: its summary, the saved Newton
    step and what it printed."""
    out = tmp_path_factory.mktemp("layers") / "analysis"
    code, printed, errors = run_main(
        [
            *("analyze", tiny_adam_checkpoint, "--model", MODEL, "--k", 1, "--num-probes", 60),
            *("--data", "lightning_curvature.demo.DigitsDataModule", "--out", out),
            *("--num-batches", TINY_BATCHES, "--per-layer", "--solve", "--damping", DAMPING),
            "--no-progress",
        ]
    )
    assert code == 0, errors
    summary = json.loads((out / "summary.json").read_text())
    return summary, torch.load(out / "newton_step.pt").double(), printed, out


def test_per_layer_traces_sum_to_the_whole_and_lambda_max_matches_each_dense_block(
    tiny_layers_and_newton, tiny_truth
):
    summary, _, printed, out = tiny_layers_and_newton
    hessian = tiny_truth[0]
    layers = summary["per_layer"]["layers"]
    assert list(layers) == ["net.0", "net.2"]
    pieces = {"net.0": slice(0, 64 * 8 + 8), "net.2": slice(520, 610)}
    assert sum(layer["trace"] for layer in layers.values()) == pytest.approx(
        summary["per_layer"]["trace"],
        rel=1e-6,  # float32 terms, summed in another order
    )
    for name, piece in pieces.items():
        block = hessian[piece, piece]
        layer = layers[name]
        assert layer["num_parameters"] == block.shape[0]
        assert layer["lambda_max"] == pytest.approx(torch.linalg.eigvalsh(block)[-1].item(), 1e-3)
        assert abs(layer["trace"] - block.trace().item()) <= 4 * layer["trace_stderr"]
        assert f"{layer['lambda_max']:.6g}" in printed
    # The blocks are not the whole: the top layer's λmax is far below the whole λmax.
    assert layers["net.2"]["lambda_max"] < 0.9 * tiny_truth[1][0].item()
    events = read_events(out)
    assert scalars(events, "curvature/layer/net.2/lambda_max") == [
        (20, pytest.approx(layers["net.2"]["lambda_max"], rel=1e-6))
    ]
    assert {"curvature/layer/net.0/trace", "curvature/layer/net.0/trace_stderr"} <= set(
        events.Tags()["scalars"]
    )
    assert summary["measurement"]["curvature"] == "hessian"


def test_newton_step_matches_a_dense_solve_and_reports_the_true_residual(
    tiny_layers_and_newton, tiny_truth, tiny_adam_checkpoint
):
    summary, x, printed, _ = tiny_layers_and_newton
    hessian = tiny_truth[0]
    model = DigitsClassifier.load_from_checkpoint(tiny_adam_checkpoint).net.double()
    batches = first_batches(DigitsDataModule(batch_size=32), TINY_BATCHES)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def mean_loss(values):
        losses = [
            F.cross_entropy(torch.func.functional_call(model, values, (x.double(),)), y)
            for x, y in batches
        ]
        return sum(losses) / len(losses)

    g = torch.cat([v.reshape(-1) for v in torch.func.grad(mean_loss)(params).values()])
    damped = hessian + DAMPING * torch.eye(hessian.shape[0], dtype=torch.float64)
    assert torch.linalg.eigvalsh(damped)[0] > 0.5  # well conditioned: the check is fair
    exact = torch.linalg.solve(damped, g)
    step = summary["newton_step"]
    assert torch.linalg.vector_norm(x - exact) <= 1e-4 * torch.linalg.vector_norm(exact)
    assert step["norm_x"] == pytest.approx(torch.linalg.vector_norm(exact).item(), rel=1e-4)
    assert step["norm_gradient"] == pytest.approx(torch.linalg.vector_norm(g).item(), rel=1e-4)
    true_residual = (torch.linalg.vector_norm(damped @ x - g) / torch.linalg.vector_norm(g)).item()
    # Converged means the true residual met the tolerance asked (--solve-tol, default 1e-5).
    assert step["tol"] == 1e-5
    assert step["relative_residual"] <= step["tol"] and step["converged"] is True
    assert step["relative_residual"] == pytest.approx(true_residual, rel=0.3, abs=2e-6)
    predicted = (g @ exact - 0.5 * exact @ hessian @ exact).item()
    assert step["predicted_decrease"] == pytest.approx(predicted, rel=1e-4)
    assert step["iterations"] >= 1 and step["damping"] == DAMPING
    assert "quadratic model" in printed and f"{step['norm_x']:.6g}" in printed


def test_the_console_script_imports_the_model_class_from_the_working_directory(
    tiny_adam_checkpoint, tmp_path
):
    """pip's console script runs with its bin/ directory, not the working directory, first
    on sys.path; `python -m` puts the working directory there. Both must find mymodels."""
    work, bin_dir = tmp_path / "work", tmp_path / "bin"
    work.mkdir()
    bin_dir.mkdir()
    (work / "mymodels.py").write_text(
        "from lightning_curvature.demo import DigitsClassifier\n\n\n"
        "class MyModule(DigitsClassifier):\n    pass\n"
    )
    script = bin_dir / "lightning-curvature"  # what pip writes for [project.scripts]
    script.write_text("import sys\nfrom lightning_curvature.cli import main\n\nsys.exit(main())\n")
    result = subprocess.run(
        [
            *(sys.executable, str(script), "analyze", str(tiny_adam_checkpoint)),
            *("--model", "mymodels.MyModule", "--demo-data", "--k", "1", "--num-probes", "2"),
            *("--threads", "1"),
            *("--out", str(tmp_path / "out"), "--no-progress"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=work,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model"] == "mymodels.MyModule"


# ---------------------------------------------------------------------------- bad input


class EmptyData(pl.LightningDataModule):
    """A data module whose training loader yields nothing."""

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)))


not_a_class = 3


class TwoInputClassifier(DigitsClassifier):
    """A module whose forward needs more than a batch's first element."""

    def forward(self, inputs, mask):
        return self.net(inputs * mask)


@pytest.fixture(scope="module")
def mismatched_checkpoint(tiny_adam_checkpoint, tmp_path_factory):
    """The tiny checkpoint without its hyper-parameters: DigitsClassifier's defaults build
    a 64-64 network, which its 8-unit weights do not fit."""
    checkpoint = torch.load(tiny_adam_checkpoint, weights_only=False)
    del checkpoint["hyper_parameters"]
    path = tmp_path_factory.mktemp("mismatch") / "mismatch.ckpt"
    torch.save(checkpoint, path)
    return path


def bad_input_cases(tmp_path, good, mismatched):
    """Each case: (argv, a phrase the one-line error must contain)."""
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    not_lightning = tmp_path / "plain.ckpt"
    torch.save({"weights": torch.zeros(3)}, not_lightning)

    def analyze(checkpoint=good, model=MODEL, data=("--demo-data",), extra=()):
        return ["analyze", checkpoint, "--model", model, *data, *extra]

    return {
        "missing file": (analyze(tmp_path / "nope.ckpt"), "does not exist"),
        "directory": (analyze(tmp_path), "is not a file"),
        "corrupt file": (analyze(corrupt), "not a readable PyTorch checkpoint"),
        "not lightning": (analyze(not_lightning), "has no 'state_dict'"),
        "module missing": (analyze(model="no_such_pkg.Model"), "cannot import 'no_such_pkg'"),
        "class missing": (analyze(model="lightning_curvature.demo.Nope"), "has no 'Nope'"),
        "not a path": (analyze(model="DigitsClassifier"), "not a class path"),
        "not a class": (analyze(model="tests.test_cli.not_a_class"), "is a int, not a class"),
        "not a module class": (analyze(model="torch.nn.Linear"), "not a LightningModule"),
        "state_dict mismatch": (analyze(mismatched), "does not match"),
        "no batches": (
            analyze(data=("--data", "tests.test_cli.EmptyData")),
            "yielded no batches",
        ),
        "no data flag": (analyze(data=()), "one of the arguments --data --demo-data is required"),
        "both data flags": (analyze(extra=("--data", "x.Y")), "not allowed with"),
        "k zero": (analyze(extra=("--k", "0")), "--k: must be at least 1"),
        "k not int": (analyze(extra=("--k", "five")), "expected an integer"),
        "tol too big": (analyze(extra=("--tol", "2")), "must be in (0, 1)"),
        "memory budget zero": (analyze(extra=("--memory-budget-mb", "0")), "must be a number > 0"),
        "memory budget too small": (
            analyze(extra=("--memory-budget-mb", "0.001")),
            "--memory-budget-mb=0.001 holds",
        ),
        "batches negative": (analyze(extra=("--num-batches", "-1")), "at least 1"),
        "bad device": (analyze(extra=("--device", "tpu")), "invalid choice"),
        "batch size zero": (analyze(extra=("--batch-size", "0")), "at least 1"),
        "no command": ([], "required: COMMAND"),
        "unknown command": (["train"], "invalid choice"),
        "demo steps": (["demo", "--max-steps", "0"], "--max-steps: must be at least 1"),
        "ggn without loss": (analyze(extra=("--curvature", "ggn")), "needs --loss mse|cross"),
        "loss for hessian": (analyze(extra=("--loss", "mse")), "applies to --curvature ggn"),
        "fisher kind for ggn": (
            analyze(extra=("--curvature", "ggn", "--loss", "mse", "--fisher-kind", "true")),
            "applies to --curvature fisher only",
        ),
        "bad curvature": (analyze(extra=("--curvature", "kfac")), "invalid choice: 'kfac'"),
        "damping negative": (analyze(extra=("--damping", "-1")), "--damping: must be a finite"),
        "loss does not fit": (
            analyze(extra=("--curvature", "fisher", "--loss", "mse")),
            "--loss mse does not fit DigitsClassifier's outputs of shape (32, 10)",
        ),
        "forward takes no batch[0]": (
            analyze(
                model="tests.test_cli.TwoInputClassifier",
                extra=("--curvature", "ggn", "--loss", "cross_entropy"),
            ),
            "TwoInputClassifier.forward(batch[0]) failed (TypeError",
        ),
    }


CASES = [
    "missing file", "directory", "corrupt file", "not lightning", "module missing",
    "class missing", "not a path", "not a class", "not a module class", "state_dict mismatch",
    "no batches", "no data flag", "both data flags", "k zero", "k not int", "tol too big",
    "batches negative", "memory budget zero", "memory budget too small",
    "bad device", "batch size zero", "no command", "unknown command",
    "demo steps", "ggn without loss", "loss for hessian", "fisher kind for ggn", "bad curvature",
    "damping negative", "loss does not fit", "forward takes no batch[0]",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_on_stderr_and_exit_status_2(
    case, tmp_path, tiny_adam_checkpoint, mismatched_checkpoint
):
    argv, message = bad_input_cases(tmp_path, tiny_adam_checkpoint, mismatched_checkpoint)[case]
    code, printed, errors = run_main(argv)
    assert code == 2
    assert message in errors
    assert errors.count("\n") == 1 and errors.startswith("lightning-curvature")
    assert "Traceback" not in errors + printed


def test_cuda_without_a_gpu_is_bad_input(tiny_adam_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, _, errors = run_main(
        ["analyze", tiny_adam_checkpoint, "--model", MODEL, "--demo-data", "--device", "cuda"]
    )
    assert code == 2 and "no CUDA device" in errors


def test_help_exits_0():
    code, printed, _ = run_main(["analyze", "--help"])
    assert code == 0 and "--num-batches" in printed
    for flag in ("--curvature", "--loss", "--fisher-kind", "--per-layer", "--solve", "--damping"):
        assert flag in printed
    assert "batched Lanczos" in " ".join(printed.split())


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_python_dash_m_reports_bad_checkpoints_without_a_traceback(kind, tmp_path):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "corrupt":
        path.write_bytes(b"PK\x03\x04 this is not a zip archive" * 20)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "lightning_curvature", "analyze", str(path)),
            *("--model", MODEL, "--demo-data"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("lightning-curvature: error: ")
    assert result.stderr.count("\n") == 1
