"""The TensorBoard dashboard: each custom-scalars chart draws exactly the tags it names, one
section per tag prefix, and figures that leave the user's matplotlib state alone."""

from __future__ import annotations

import re

import matplotlib
import pytest
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.tensorboard import SummaryWriter

from lightning_curvature.measure.record import Measurement
from lightning_curvature.monitor.alerts import Alert
from lightning_curvature.monitor.tensorboard import (
    dashboard_layout,
    density_figure,
    write_alert,
    write_layout,
    write_measurement,
)
from tests.lightning_models import read_events

RECORD = Measurement(
    step=1,
    tier="full",
    probe_loss=1.0,
    lambda_max=3.0,
    lambda_max_error_bound=0.0,
    lambda_max_converged=True,
    eigenvalues=(3.0, 2.0),
    error_bounds=(0.0, 0.0),
    eigenvalues_converged=True,
    lambda_min_converged=True,
    converged=True,
    ritz_values=(1.0, 2.0, 3.0),
    num_matvecs=10,
    seconds=0.1,
    lambda_min=-0.5,
    trace=7.0,
    trace_stderr=0.5,
    learning_rate=0.1,
    stability_threshold=2.0,
    lambda_max_x_lr=0.3,
    sharpness_x_lr=0.3,
    stability_ratio=0.15,
    density_grid=(-1.0, 0.0, 1.0, 2.0, 3.0),
    density=(0.1, 0.5, 0.2, 0.1, 0.1),
)


def logged_tags(prefix: str) -> list[str]:
    """What a monitor with ``tag_prefix=prefix`` logs: the record's scalars, the batch and
    directional sharpness tags, and per-layer tags (with a layer name that holds dots)."""
    names = [tag.split("/", 1)[1] for tag in RECORD.scalars()]
    names += ["batch_sharpness", "batch_sharpness_x_lr", "directional_sharpness"]
    names += ["directional_sharpness_x_lr", "preconditioned_lambda_max", "overhead"]
    for layer in ("net.0", "net.2.lora"):
        names += [f"layer/{layer}/lambda_max", f"layer/{layer}/trace"]
    return [f"{prefix}/{name}" for name in names]


def drawn(prefix: str, tags: list[str]) -> dict[str, list[str]]:
    """Chart title -> the tags among ``tags`` that its regular expressions match."""
    (section,) = dashboard_layout(prefix).values()
    return {
        title: sorted(t for t in tags if any(re.search(p, t) for p in patterns))
        for title, (_, patterns) in section.items()
    }


def expected_charts(p: str) -> list[list[str]]:
    return sorted(
        [
            [f"{p}/sharpness_x_lr", f"{p}/stability_threshold"],
            sorted(
                [
                    f"{p}/lambda_max_x_lr",
                    f"{p}/batch_sharpness_x_lr",
                    f"{p}/directional_sharpness_x_lr",
                    f"{p}/stability_threshold",
                ]
            ),
            [f"{p}/stability_ratio"],
            [f"{p}/eigenvalue_1", f"{p}/eigenvalue_2", f"{p}/lambda_min"],
            [f"{p}/trace"],  # not trace_stderr, nor the layers' traces
            [f"{p}/layer/net.0/lambda_max", f"{p}/layer/net.2.lora/lambda_max"],
            [f"{p}/layer/net.0/trace", f"{p}/layer/net.2.lora/trace"],
        ]
    )


@pytest.mark.parametrize("prefix", ["curvature", "curv.adam", "probe/b"])
def test_each_chart_matches_exactly_its_tags_and_none_of_another_monitors(prefix):
    # Another monitor's tags, with a prefix that a regex "." or a missing anchor would match.
    others = logged_tags("curvXadam") + logged_tags("x" + prefix) + logged_tags(prefix + "2")
    charts = drawn(prefix, logged_tags(prefix) + others)
    assert sorted(charts.values()) == expected_charts(prefix)
    assert list(dashboard_layout(prefix)) == [prefix]  # the section is titled by the prefix


def layouts_written(log_dir) -> list[list[str]]:
    """The section titles of each custom-scalars layout in the event file, in order."""
    events = read_events(log_dir)
    titles = []
    for event in events.Tensors("custom_scalars__config__"):
        layout = layout_pb2.Layout()
        layout.ParseFromString(event.tensor_proto.string_val[0])
        titles.append([category.title for category in layout.category])
    return titles


def test_two_monitors_on_one_writer_get_two_sections_and_each_its_own_tags(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    write_layout(writer)
    write_layout(writer, prefix="adam")
    write_layout(writer, prefix="adam")  # a monitor writing again adds no section
    write_measurement(writer, RECORD, 1, prefix="adam")
    write_alert(writer, Alert("sharpness_spike", 1, 3.0, 1.0, "λmax jumped"), prefix="adam")
    writer.close()
    # TensorBoard shows the last layout of a run: it must hold both sections.
    assert layouts_written(tmp_path)[-1] == ["curvature", "adam"]
    events = read_events(tmp_path)
    assert events.Tags()["histograms"] == ["adam/ritz_values"]
    assert events.Tags()["images"] == ["adam/spectral_density"]
    assert "adam/alerts/text_summary" in events.Tags()["tensors"]


def test_the_density_figure_leaves_pyplot_and_the_backend_alone(tmp_path):
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    try:
        matplotlib.use("svg")  # the user's choice, which the figure must not change
        figures_before = plt.get_fignums()
        figure = density_figure(RECORD)
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == figures_before  # not registered with pyplot
        figure.savefig(tmp_path / "spectrum.png")
        assert (tmp_path / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
        (axis,) = figure.axes
        assert [line.get_xdata()[0] for line in axis.lines[1:]] == list(RECORD.eigenvalues)
    finally:
        matplotlib.use(backend)
