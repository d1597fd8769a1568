"""The operator inside a real Trainer: a LightningModule with a torch.compile'd network
(aot_eager: the backend whose compiled graph has no double backward) is measured exactly,
through the eager module it wraps, without a fallback."""

import warnings

import pytest
import torch

from lightning_curvature import CurvatureMonitor
from tests.lightning_models import Classifier, classification_data, loader, mlp, trainer
from tests.truth import cross_entropy_loss, dense_hessian


@pytest.mark.slow  # compiling with aot_eager takes a few seconds
def test_a_compiled_network_is_measured_exactly_in_a_trainer(tmp_path):
    torch.manual_seed(0)
    net = mlp()
    module = Classifier(torch.compile(net, backend="aot_eager"), "sgd", lr=0.1)
    data = loader(classification_data(n=64))
    monitor = CurvatureMonitor(
        every_n_steps=2, log_spaced=False, k=1, trace=False, max_overhead=None, on_error="raise"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [monitor], max_steps=2, logger=False).fit(module, data)
    assert not [w for w in caught if "HessianOperator" in str(w.message)]
    # λmax at the final parameters on the monitor's probe batch (the first training batch).
    batch = next(iter(data))
    exact = dense_hessian(net, cross_entropy_loss, [batch])
    logged = monitor.history[-1]["curvature/lambda_max"]
    assert logged == pytest.approx(float(torch.linalg.eigvalsh(exact)[-1]), rel=1e-3)


def test_precision_64_true_is_measured_in_float64(tmp_path):
    # Under precision="64-true" the parameters are float64: the operator must use them as
    # they are (not a float32 copy, whose λmax would be about 1e-7 off).
    torch.manual_seed(0)
    net = mlp()
    module = Classifier(net, "sgd", lr=0.1)
    data = loader(classification_data(n=64))
    monitor = CurvatureMonitor(
        every_n_steps=2,
        log_spaced=False,
        k=1,
        trace=False,
        tol=1e-12,
        max_overhead=None,
        on_error="raise",
    )
    trainer(tmp_path, [monitor], max_steps=2, logger=False, precision="64-true").fit(module, data)
    assert next(net.parameters()).dtype == torch.float64
    exact = dense_hessian(net, cross_entropy_loss, [next(iter(data))])
    logged = monitor.history[-1]["curvature/lambda_max"]
    assert logged == pytest.approx(float(torch.linalg.eigvalsh(exact)[-1]), rel=1e-10)
