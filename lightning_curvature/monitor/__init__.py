"""The training-time side of the monitor, free of Lightning hooks: when to measure
(:mod:`.schedule`), on what batches (:mod:`.probes`), what to say about it (:mod:`.alerts`),
where the numbers go (:mod:`.publish`, the TensorBoard layout in :mod:`.tensorboard`) and
what to do when a measurement fails (:mod:`.failures`).
:class:`~lightning_curvature.CurvatureMonitor` is a thin adapter from Lightning's hooks onto
these and :mod:`lightning_curvature.measure`."""
