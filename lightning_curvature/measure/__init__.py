"""One curvature measurement, shared by the monitor and ``analyze``: the two tiers and the
:class:`~lightning_curvature.measure.tiers.Measurement` record (:mod:`.tiers`), the objective
the optimizer descends (:mod:`.objective`), and a training module measured without being
disturbed (:mod:`.module`). Knows neither Lightning's hooks nor TensorBoard."""
