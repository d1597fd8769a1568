"""The byte-level transformer demo: its corpus, its model at initialisation, curvature
products through its attention (checked against finite differences of gradients), the
`demo --transformer` flag and its LightningCLI config."""

from __future__ import annotations

import math

import pytest
import torch

import lightning_curvature as lc
from lightning_curvature.cli import build_parser
from lightning_curvature.demo import CharTransformer, StdlibTextDataModule
from lightning_curvature.demo.text import VOCAB_SIZE, stdlib_text
from tests.test_configs import monitor_of, run_config
from tests.truth import finite_difference_hvp


def test_the_corpus_is_the_standard_librarys_source_and_always_the_same():
    text = stdlib_text(50_000)
    assert text == stdlib_text(50_000) and len(text) == 50_000
    assert b"def " in text and b"import " in text
    assert len(set(text)) > 50  # a real character vocabulary, not a handful of symbols


def test_batches_are_windows_and_their_next_bytes():
    data = StdlibTextDataModule(context=16, batch_size=4, max_chars=20_000)
    data.setup("fit")
    inputs, targets = next(iter(data.train_dataloader()))
    assert inputs.shape == targets.shape == (4, 16)
    window = data.train_set[3]
    assert torch.equal(window[0][1:], window[1][:-1])


def test_at_initialisation_the_loss_is_that_of_a_uniform_guess():
    torch.manual_seed(0)
    model = CharTransformer()
    data = StdlibTextDataModule(max_chars=20_000)
    data.setup("fit")
    loss = float(model._loss(next(iter(data.train_dataloader()))))
    assert loss == pytest.approx(math.log(VOCAB_SIZE), rel=0.1)


def test_curvature_products_through_attention_match_finite_differences():
    # Float64, a tiny model: the operator's own check (symmetry, central differences of
    # gradients) passes, and a product agrees with an independent central difference.
    torch.manual_seed(0)
    model = CharTransformer(context=8, width=16, heads=2, num_layers=1).double()
    ids = torch.randint(0, VOCAB_SIZE, (2, 9))
    batch = (ids[:, :-1], ids[:, 1:])
    op = lc.HessianOperator(model, lambda m, b: m._loss(b), [batch])
    v = torch.randn(op.dim, dtype=torch.float64)
    product = op.matvec(v)
    assert op.method_used == "reuse_graph" and op.last_check is not None
    assert op.last_check.passed
    step = torch.finfo(torch.float64).eps ** (1 / 3) / float(v.norm())
    difference = finite_difference_hvp(model, lambda m, b: m._loss(b), [batch], v, eps=step)
    # Central differences err by O(h²)·‖∇³L‖ and O(eps/h)·‖∇L‖: about eps^(2/3) relative.
    tolerance = 1e3 * torch.finfo(torch.float64).eps ** (2 / 3)
    assert float((product - difference).norm() / product.norm()) < tolerance


def test_the_demo_flag_is_parsed_and_refused_with_the_other_demo():
    parser = build_parser()
    assert parser.parse_args(["demo", "--transformer"]).transformer is True
    with pytest.raises(ValueError, match="choose one"):
        lc.demo.demo_recipe(edge_of_stability=True, transformer=True)


@pytest.mark.filterwarnings("ignore")
def test_the_transformer_config_trains_with_the_monitor(tmp_path):
    cli = run_config(tmp_path, "transformer.yaml", max_steps=3)
    monitor = monitor_of(cli.trainer)
    assert cli.trainer.global_step == 3
    assert [int(h["step"]) for h in monitor.history] == [1, 2, 3]
    assert monitor.history[0]["curvature/stability_threshold"] == pytest.approx(38.0)
