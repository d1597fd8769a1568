"""The training-time side of the monitor, free of Lightning hooks: when to measure
(:mod:`.schedule`), on what objective and batches (:mod:`.objective`, :mod:`.probes`), and
where the numbers go (:mod:`.publish`). :class:`~lightning_curvature.CurvatureMonitor` is a
thin adapter from Lightning's hooks onto these."""
