"""The monitor on the Gauss-Newton matrix and per layer, against dense float64 truth."""

import copy
import warnings

import pytest
import torch

from lightning_curvature import CurvatureMonitor
from tests.lightning_models import Classifier, classification_data, loader, mlp, trainer
from tests.truth import cross_entropy_loss, dense_hessian


def dense_ggn_cross_entropy(net, batch):
    """G = (1/N) Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n in float64, J from torch.func.jacrev."""
    net64 = copy.deepcopy(net).double()
    names = [n for n, _ in net64.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net64.parameters()])
    shapes = [p.shape for p in net64.parameters()]
    inputs = batch[0].double()

    def logits(flat):
        values, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            values[name] = flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return torch.func.functional_call(net64, values, (inputs,))

    jacobian = torch.func.jacrev(logits)(theta)  # (N, K, d)
    p = torch.softmax(logits(theta), dim=1)
    h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, K, K)
    return torch.einsum("nkd,nkl,nle->de", jacobian, h_out, jacobian) / inputs.shape[0]


def test_a_hessian_and_a_ggn_monitor_side_by_side_match_their_dense_matrices(tmp_path):
    torch.manual_seed(0)
    module = Classifier(mlp(), "sgd", lr=0.1)
    hessian = CurvatureMonitor(every_n_steps=4, log_spaced=False, k=2, trace=False)
    ggn = CurvatureMonitor(
        every_n_steps=4,
        log_spaced=False,
        k=2,
        curvature="ggn",
        loss_from_output="cross_entropy",
        tag_prefix="ggn",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [hessian, ggn], max_steps=8).fit(module, loader(classification_data()))
    batch = next(iter(loader(classification_data())))
    g = dense_ggn_cross_entropy(module.net, batch)
    h = dense_hessian(module.net, cross_entropy_loss, [batch])
    ggn_truth = torch.linalg.eigvalsh(g)[-1].item()
    hessian_truth = torch.linalg.eigvalsh(h)[-1].item()
    assert ggn.history[-1]["ggn/lambda_max"] == pytest.approx(ggn_truth, rel=1e-3)
    assert hessian.history[-1]["curvature/lambda_max"] == pytest.approx(hessian_truth, rel=1e-3)
    assert abs(ggn_truth - hessian_truth) > 1e-3 * hessian_truth  # two different matrices
    assert "ggn/batch_sharpness" not in ggn.history[-1]  # a Hessian quantity
    assert "ggn/directional_sharpness" in ggn.history[-1]


def test_ggn_needs_the_loss_on_the_outputs():
    with pytest.raises(ValueError, match="loss_from_output"):
        CurvatureMonitor(curvature="ggn")
    with pytest.raises(ValueError, match="curvature"):
        CurvatureMonitor(curvature="gauss-newton")
    with pytest.raises(ValueError, match="per_layer"):
        CurvatureMonitor(per_layer="net")


def test_per_layer_traces_and_lambda_max_match_the_dense_blocks(tmp_path):
    torch.manual_seed(0)
    module = Classifier(mlp(), "sgd", lr=0.1)
    monitor = CurvatureMonitor(
        every_n_steps=4, log_spaced=False, full_every=1, per_layer=True, num_probes=40
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [monitor], max_steps=4).fit(module, loader(classification_data()))
    last = monitor.history[-1]
    batch = next(iter(loader(classification_data())))
    hessian = dense_hessian(module.net, cross_entropy_loss, [batch])
    sizes = {"net.0": 10 * 16 + 16, "net.2": 16 * 4 + 4}
    start, total = 0, 0.0
    for name, size in sizes.items():
        block = hessian[start : start + size, start : start + size]
        start += size
        truth = torch.linalg.eigvalsh(block)[-1].item()
        assert last[f"curvature/layer/{name}/lambda_max"] == pytest.approx(truth, rel=1e-3)
        trace, stderr = (
            last[f"curvature/layer/{name}/trace"],
            last[f"curvature/layer/{name}/trace_stderr"],
        )
        assert abs(trace - torch.trace(block).item()) <= 3 * stderr + 1e-9
        total += trace
    assert total == pytest.approx(last["curvature/trace"], rel=1e-6)
