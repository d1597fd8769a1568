"""One home for the tags: the table in lightning_curvature/measure/tags.py against what the
record logs, what the dashboard layout draws and what the README's tag table documents."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from lightning_curvature.measure.record import Measurement
from lightning_curvature.measure.tags import LAYER_TAGS, SCALAR_TAGS, is_known
from lightning_curvature.monitor.tensorboard import dashboard_layout, stability_edge_tag

README = Path(__file__).resolve().parents[1] / "README.md"


def _every_field_set() -> Measurement:
    """A record with every optional field filled and every estimate converged."""
    values: dict[str, object] = {}
    for field in fields(Measurement):
        if field.name in ("step", "num_matvecs"):
            values[field.name] = 1
        elif field.name in ("tier", "curvature", "hvp_method"):
            values[field.name] = "full" if field.name == "tier" else "hessian"
        elif field.name.endswith("converged") or field.name == "converged":
            values[field.name] = True
        elif field.name in ("eigenvalues", "error_bounds", "ritz_values"):
            values[field.name] = (3.0, 2.0)
        elif field.name in ("density_grid", "density"):
            values[field.name] = (0.0, 1.0)
        elif field.name == "layer_traces":
            values[field.name] = {"net.0": (1.0, 0.1)}
        elif field.name == "layer_lambda_max":
            values[field.name] = {"net.0": (1.0, 1e-4, True)}
        else:
            values[field.name] = 0.5
    return Measurement(**values)  # type: ignore[arg-type]


def test_every_scalar_a_record_logs_is_in_the_table():
    logged = _every_field_set().scalars("curvature")
    names = [tag.removeprefix("curvature/") for tag in logged]
    assert names and all(is_known(name) for name in names), [n for n in names if not is_known(n)]
    # And the table has no entry a record or the monitor never writes.
    plain = [n for n in names if not n.startswith("layer/")]
    by_monitor = {name for name, (tier, _) in SCALAR_TAGS.items() if tier == "monitor"}
    assert by_monitor == {"overhead", "predicted_stability_ratio"}
    written = {re.sub(r"^eigenvalue_\d+$", "eigenvalue_{i}", n) for n in plain} | by_monitor
    assert set(SCALAR_TAGS) == written


def test_every_chart_of_the_dashboard_draws_tags_of_the_table():
    candidates = [f"curvature/{name.replace('{i}', '1')}" for name in SCALAR_TAGS]
    candidates += [f"curvature/layer/net.0/{name}" for name in LAYER_TAGS]
    candidates.append(stability_edge_tag("curvature"))
    for title, (_, patterns) in dashboard_layout("curvature")["curvature"].items():
        for pattern in patterns:
            assert any(re.search(pattern, tag) for tag in candidates), (title, pattern)


def _readme_tag_table() -> set[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Reading the dashboard") :]
    names: set[str] = set()
    for line in section.splitlines()[2:]:
        if not line.startswith("|"):
            break
        first_cell = line.split("|")[1]
        previous = ""
        for token in re.findall(r"`([^`]+)`", first_cell):
            name = token.removeprefix("curvature/")
            if name.startswith("_"):  # `directional_sharpness` (`_x_lr`)
                name = previous + name
            names.add(name)
            previous = name
    return {n for n in names if n != "---"}


def test_the_readme_documents_exactly_the_table():
    documented = _readme_tag_table()
    layer = {n for n in documented if n.startswith("layer/")}
    assert {n.rsplit("/", 1)[-1] for n in layer} | {"trace_stderr"} >= set(LAYER_TAGS)
    # `trace_stderr` beside a layer tag is the layer's; the whole model's is in its own row.
    plain = {n for n in documented - layer}
    assert plain == set(SCALAR_TAGS), plain ^ set(SCALAR_TAGS)
