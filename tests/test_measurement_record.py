"""The measurement record serialises to strict JSON, whatever its numbers are."""

import json

from lightning_curvature.measure.record import Measurement


def test_to_json_turns_non_finite_numbers_into_null_even_inside_tuples():
    record = Measurement(
        step=3,
        tier="full",
        probe_loss=float("nan"),
        lambda_max=2.5,
        lambda_max_error_bound=float("inf"),
        lambda_max_converged=False,
        eigenvalues=(2.5, 1.0),
        error_bounds=(1e-6, float("inf")),
        converged=False,
        ritz_values=(-1.0, 1.0, 2.5),
        num_matvecs=12,
        seconds=0.25,
    )
    values = json.loads(json.dumps(record.to_json(), allow_nan=False))
    assert values["probe_loss"] is None
    assert values["lambda_max_error_bound"] is None
    assert values["error_bounds"] == [1e-6, None]
    assert values["eigenvalues"] == [2.5, 1.0]
    assert values["step"] == 3 and values["converged"] is False
