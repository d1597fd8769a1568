"""One curvature measurement, shared by the monitor and ``analyze``: the two tiers
(:mod:`.tiers`), the :class:`~lightning_curvature.measure.record.Measurement` record and its
tags (:mod:`.record`, :mod:`.tags`), the objective
the optimizer descends (:mod:`.objective`), and a training module measured without being
disturbed (:mod:`.module`). Knows neither Lightning's hooks nor TensorBoard."""
