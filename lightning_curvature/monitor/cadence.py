r"""The calibrated cadence's arithmetic: what a cadence costs, given the measured seconds of a
track measurement :math:`t_t`, a full one :math:`t_f` and a training step :math:`t_s`, and the
densest power of two :math:`n` within ``max_overhead``:

.. math:: \frac{(F - 1)\,t_t + t_f}{F \cdot n \cdot t_s} \le \text{max\_overhead},
    \qquad F = \text{full\_every},

the measurement time of :math:`F` cadence points over the training time between them.
:class:`~lightning_curvature.monitor.schedule.MeasurementSchedule` times the samples and
decides when; this module only does the sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The sparsest cadence calibration may choose (a measurement costlier than ~50k steps).
MAX_CALIBRATED_EVERY_N_STEPS = 2**16


@dataclass(frozen=True)
class Costs:
    """Seconds of a track measurement, a full one and a training step, and the overhead
    they give a cadence: the measurement time of ``full_every`` cadence points (one of
    them full) over the training time of the steps between them."""

    track: float
    full: float
    step: float
    full_every: int

    def overhead(self, every_n_steps: int) -> float:
        per_point = ((self.full_every - 1) * self.track + self.full) / self.full_every
        return per_point / (every_n_steps * self.step) if self.step > 0 else math.inf

    def densest_cadence(self, max_overhead: float) -> int:
        """The smallest power of two whose overhead is within ``max_overhead``, at most
        :data:`MAX_CALIBRATED_EVERY_N_STEPS`."""
        cadence = 1
        while cadence < MAX_CALIBRATED_EVERY_N_STEPS and self.overhead(cadence) > max_overhead:
            cadence *= 2
        return cadence

    def __str__(self) -> str:
        return (
            f"a track measurement takes {_ms(self.track)}, a full one {_ms(self.full)} (one "
            f"point in {self.full_every}), a training step {_ms(self.step)}"
        )


def calibration_line(costs: Costs, chosen: int, proposed: int, max_overhead: float) -> str:
    """The one line that says which cadence calibration fixed, and why."""
    overhead = costs.overhead(chosen)
    text = (
        f"Curvature schedule: measuring every {chosen} steps for the rest of the run: "
        f"{costs}, so every {chosen} steps costs {overhead:.1%} of the training "
        f"time, {'within' if overhead <= max_overhead else 'above'} "
        f"max_overhead={max_overhead:g}"
    )
    if proposed > 1:
        text += f" (every {proposed // 2} would cost {costs.overhead(proposed // 2):.1%})"
    if chosen != proposed:
        text += f"; this rank's timing alone suggested every {proposed}, rank 0's is used"
    return text + ". Pass every_n_steps to choose the cadence yourself."


def overhead_warning(costs: Costs, every_n_steps: int, max_overhead: float) -> str | None:
    """The warning for an explicit cadence that costs more than ``max_overhead`` (None when
    it fits), with the smallest cadence that would fit: the overhead falls as 1/n."""
    overhead = costs.overhead(every_n_steps)
    if overhead <= max_overhead:
        return None
    fits = math.ceil(overhead * every_n_steps / max_overhead * (1 - 1e-12))
    return (
        f"Measuring curvature every {every_n_steps} steps costs about {overhead:.1%} of "
        f"the training time ({costs}), above max_overhead={max_overhead:g}. Every "
        "scheduled step is still measured, as asked. To lower the cost: a larger "
        f"every_n_steps (every_n_steps={fits} would fit), a smaller k, trace=False, fewer "
        "num_batches, a larger full_every; or max_overhead=None to silence this warning."
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"
