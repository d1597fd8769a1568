"""The custom-scalars layout draws exactly the intended tags in each chart."""

import re

from lightning_curvature.measurement import Measurement
from lightning_curvature.tensorboard import dashboard_layout


def test_each_chart_matches_exactly_its_tags():
    record = Measurement(
        step=1,
        loss=1.0,
        lambda_max=3.0,
        eigenvalues=(3.0, 2.0),
        error_bounds=(0.0, 0.0),
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
    )
    tags = list(record.scalars())
    drawn = {
        title: sorted(t for t in tags if any(re.search(p, t) for p in patterns))
        for title, (_, patterns) in dashboard_layout()["Curvature"].items()
    }
    assert sorted(drawn.values()) == sorted(
        [
            ["curvature/sharpness_x_lr", "curvature/stability_threshold"],
            ["curvature/stability_ratio"],
            ["curvature/eigenvalue_1", "curvature/eigenvalue_2", "curvature/lambda_min"],
            ["curvature/trace"],  # not trace_stderr
        ]
    )
