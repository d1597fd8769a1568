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
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The sparsest cadence calibration may choose (a measurement costlier than ~50k steps).
MAX_CALIBRATED_EVERY_N_STEPS = 2**16
# Samples kept for an estimate: bounded, so the state stays small.
_MAX_SAMPLES = 64
# What the timing samples are of: a training step, the monitor's time at a step with a
# track or a full measurement (its hooks, the measurement, publishing), and at a step
# without one ("hook": the per-step bookkeeping every step pays).
_KINDS = ("step", "track", "full", "hook")
# A measurement leaves the caches full of its own data: the next steps run slower (on a
# 1 ms step, 0.5 ms over the next three). Those steps' time over a quiet step's counts as
# the monitor's; a quiet step is one further away, its time the median of the last ones.
AFTER_EFFECT_STEPS = 3
_QUIET_STEPS = 32
_QUIET_ENOUGH = 8  # quiet steps needed before an after-effect is measured


@dataclass(frozen=True)
class RunSoFar:
    """What a run of known length has spent when its cadence is calibrated: the monitor's
    seconds and the training seconds so far, the step, the run's last step, and whether
    log-spaced points below the cadence are still to come."""

    monitor_seconds: float
    train_seconds: float
    step: int
    final_step: int
    log_spaced: bool

    def points_ahead(self, every_n_steps: int) -> int:
        """Measurements still to come at cadence n: its multiples, the log-spaced points
        below it, and the final step."""
        multiples = self.final_step // every_n_steps - self.step // every_n_steps
        log = 0
        if self.log_spaced:
            power = 1 << max(self.step, 1).bit_length()
            while power < every_n_steps and power <= self.final_step:
                log, power = log + 1, power * 2
        final = int(self.final_step % every_n_steps != 0)
        return multiples + log + final


@dataclass(frozen=True)
class Costs:
    """Seconds the monitor spends at a step with a track measurement, with a full one and
    with none (``hook``), and a training step's; and the overhead they give a cadence n:
    the monitor's time over the ``full_every`` cadence points (one of them full) and the
    n − 1 steps between each, over the training time of those steps."""

    track: float
    full: float
    step: float
    full_every: int
    hook: float = 0.0

    def overhead(self, every_n_steps: int, run: RunSoFar | None = None) -> float:
        """The overhead of cadence n in the long run; with ``run``, of the whole run of
        known length: what its start already spent (the log-spaced and calibration
        points, the first full measurement) plus what the rest will cost."""
        per_point = ((self.full_every - 1) * self.track + self.full) / self.full_every
        if self.step <= 0:
            return math.inf
        if run is None or run.final_step <= run.step:
            monitor = per_point + (every_n_steps - 1) * self.hook
            return monitor / (every_n_steps * self.step)
        remaining = run.final_step - run.step
        points = min(run.points_ahead(every_n_steps), remaining)
        monitor = (
            run.monitor_seconds
            + points * per_point
            + (self.full - per_point)  # the final step is a full one
            + (remaining - points) * self.hook
        )
        return monitor / (run.train_seconds + remaining * self.step)

    def densest_cadence(self, max_overhead: float, run: RunSoFar | None = None) -> int:
        """The smallest power of two whose overhead is within ``max_overhead``, at most
        :data:`MAX_CALIBRATED_EVERY_N_STEPS`. With ``run``, over the whole run, start
        included; when the start alone already spent the budget (a short run with an
        expensive first measurement), over the rest of the run only: the start is spent,
        and the rest should keep to the budget, not stop measuring."""
        if run is not None and self.overhead(MAX_CALIBRATED_EVERY_N_STEPS, run) > max_overhead:
            run = None
        cadence = 1
        while cadence < MAX_CALIBRATED_EVERY_N_STEPS and self.overhead(cadence, run) > max_overhead:
            cadence *= 2
        return cadence

    def __str__(self) -> str:
        return (
            f"a track measurement takes {_ms(self.track)}, a full one {_ms(self.full)} (one "
            f"point in {self.full_every}), the monitor's work at other steps {_ms(self.hook)}, "
            f"a training step {_ms(self.step)}"
        )


def calibration_line(
    costs: Costs, chosen: int, proposed: int, max_overhead: float, run: RunSoFar | None = None
) -> str:
    """The one line that says which cadence calibration fixed, and why."""
    overhead = costs.overhead(chosen, run)
    whole = "" if run is None else ", start included, over the whole run"
    text = (
        f"Curvature schedule: measuring every {chosen} steps for the rest of the run: "
        f"{costs}, so every {chosen} steps costs {overhead:.1%} of the training "
        f"time{whole}, {'within' if overhead <= max_overhead else 'above'} "
        f"max_overhead={max_overhead:g}"
    )
    if proposed > 1:
        denser = costs.overhead(proposed // 2, run)
        text += f" (every {proposed // 2} would cost {denser:.1%})"
    if chosen != proposed:
        text += f"; this rank's timing alone suggested every {proposed}, rank 0's is used"
    return text + ". Pass every_n_steps to choose the cadence yourself."


def overhead_warning(costs: Costs, every_n_steps: int, max_overhead: float) -> str | None:
    """The warning for an explicit cadence that costs more than ``max_overhead`` (None when
    it fits), with the smallest cadence that would fit: the overhead falls as 1/n."""
    overhead = costs.overhead(every_n_steps)
    if overhead <= max_overhead:
        return None
    floor = costs.hook / costs.step  # what every step pays, whatever the cadence
    if floor < max_overhead:
        # overhead(n) = floor + (per_point − hook) / (n · step): the smallest n that fits.
        above = (costs.overhead(1) - floor) / (max_overhead - floor)
        fits = f"every_n_steps={math.ceil(above * (1 - 1e-12))} would fit"
    else:
        fits = f"none fits: the monitor's work at every step alone costs {floor:.1%}"
    return (
        f"Measuring curvature every {every_n_steps} steps costs about {overhead:.1%} of "
        f"the training time ({costs}), above max_overhead={max_overhead:g}. Every "
        "scheduled step is still measured, as asked. To lower the cost: a larger "
        f"every_n_steps ({fits}), a smaller k, trace=False, fewer "
        "num_batches, a larger full_every; or max_overhead=None to silence this warning."
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


class RunClock:
    """The run's time, split into training and measuring, and the samples a cadence is
    calibrated from: the seconds of training steps, track and full measurements.

    Training time is the time between calls that is not the monitor's. The monitor's time
    is every :meth:`monitoring` block (the callback wraps each of its hooks in one, so the
    copy of θ, probe handling, publishing and the per-step bookkeeping count, not only the
    measurement itself), and, outside blocks, each :meth:`measured` interval. The first
    interval after :meth:`start` counts in the overhead but is no step sample (it holds
    one-time costs: loader workers, lazy initialisation); time that covers no step
    (gradient accumulation) waits for the step that ends it. The
    :data:`AFTER_EFFECT_STEPS` steps after a measurement count what they take over a quiet
    step's median as the monitor's too, bounded by one quiet step either way (a slow
    batch from elsewhere, an epoch's end, should not be charged whole).
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        if not callable(clock):
            raise ValueError(f"clock must be callable as clock() -> seconds, got {clock!r}")
        self.now = clock
        self.train_seconds = self.measure_seconds = 0.0
        self.train_steps = 0
        self.samples: dict[str, list[float]] = {kind: [] for kind in _KINDS}
        self._mark: float | None = None  # the clock at the last call; None: not started
        self._first_interval = False
        self._unassigned_seconds = 0.0
        self._inside = False  # in a monitoring block: the clock is the monitor's
        self._entered = 0.0  # when the present block began
        self._step_seconds = 0.0  # the monitor's time at this step so far
        self._step_kind: str | None = None  # the measurement completed at this step
        self._step_collect = False
        self._blocks = (_Block(self, ends_step=False), _Block(self, ends_step=True))
        self._after = 0  # steps still to be read for a measurement's after-effect
        self._after_kind: str | None = None  # and its kind (a sample may take it in)
        self._quiet: list[float] = []  # the last quiet steps' seconds

    def start(self) -> None:
        self._mark = self.now()
        self._first_interval = True
        self._unassigned_seconds = 0.0

    def steps_passed(self, steps: int, collect: bool) -> None:
        """Count the time since the last call as training, spread over ``steps`` (none:
        kept for the next call that has steps); ``collect``: keep step samples. Inside a
        monitoring block the training time ended where the block began."""
        now = self._mark if self._inside else self.now()
        self._step_collect = collect
        if self._mark is not None and now is not None:
            self._unassigned_seconds += now - self._mark
            if steps > 0:
                per_step = self._unassigned_seconds / steps
                after = self._after_effect(per_step, steps)
                self.train_seconds += self._unassigned_seconds - after
                self.measure_seconds += after
                self.train_steps += steps
                first, self._first_interval = self._first_interval, False
                if collect and not first:  # one sample per step: mean = time / steps
                    for _ in range(min(steps, _MAX_SAMPLES)):
                        _append(self.samples["step"], per_step - after)
                    kind = self._after_kind
                    if after and kind is not None and self.samples[kind]:
                        self.samples[kind][-1] += after  # a point's cost includes it
                self._unassigned_seconds = 0.0
        self._mark = now

    def measured(self, kind: str, started: float, completed: bool, collect: bool) -> None:
        """A measurement of ``kind`` ran from ``started`` until now: not training time;
        a sample when it completed and ``collect`` (inside a monitoring block, the block's
        whole time at this step is the sample, taken when the step's last block ends)."""
        ended = self.now()
        self._after, self._after_kind = AFTER_EFFECT_STEPS, kind
        if self._inside:
            self._step_kind = kind if completed else self._step_kind
            self._step_collect = collect
            return
        self.measure_seconds += ended - started
        self._mark = ended
        if completed and collect:
            _append(self.samples[kind], ended - started)

    def _after_effect(self, per_step: float, steps: int) -> float:
        """The seconds of this step that the measurement just before it cost (0.0 for a
        quiet step, which is kept; or for several steps at once, which end the watch)."""
        if steps > 1:
            self._after = 0
            return 0.0
        if not self._after:
            if not self._first_interval:  # (the first holds one-time costs)
                _append(self._quiet, per_step, _QUIET_STEPS)
            return 0.0
        self._after -= 1
        if len(self._quiet) < _QUIET_ENOUGH:
            return 0.0
        typical = statistics.median(self._quiet)
        return max(-typical, min(typical, per_step - typical))

    def monitoring(self, ends_step: bool = False) -> _Block:
        """A block whose time inside counts as the monitor's. ``ends_step``: the step's last
        block (after the optimizer step): the step's monitor time becomes a sample, of the
        kind of the measurement completed in it, or ``"hook"``. (The blocks are made once:
        the callback enters two at every step.)"""
        return self._blocks[ends_step]

    def enter(self) -> None:
        began = self.now()
        if self._mark is not None:
            self._unassigned_seconds += began - self._mark
        self._mark = self._entered = began
        self._inside = True

    def leave(self, ends_step: bool) -> None:
        ended = self.now()
        spent = ended - self._entered
        self._inside = False
        self.measure_seconds += spent
        self._step_seconds += spent
        self._mark = ended
        if ends_step:
            if self._step_collect:
                _append(self.samples[self._step_kind or "hook"], self._step_seconds)
            self._step_seconds, self._step_kind, self._step_collect = 0.0, None, False

    def measured_any(self) -> bool:
        return bool(self.samples["track"] or self.samples["full"])

    def forget_samples(self) -> None:
        self.samples = {kind: [] for kind in _KINDS}

    @property
    def overhead(self) -> float:
        """Measurement time over training time so far (NaN before any training time)."""
        return self.measure_seconds / self.train_seconds if self.train_seconds > 0 else math.nan

    def costs(self, full_every: int) -> Costs:
        samples = self.samples
        return Costs(
            track=statistics.median(samples["track"] or samples["full"]),
            full=statistics.median(samples["full"] or samples["track"]),
            # The mean: the run pays for the slow steps too (the median would not).
            step=statistics.fmean(samples["step"]),
            full_every=full_every,
            hook=statistics.fmean(samples["hook"]) if samples["hook"] else 0.0,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "train_steps": self.train_steps,
            "train_seconds": self.train_seconds,
            "measure_seconds": self.measure_seconds,
            "samples": {kind: list(values) for kind, values in self.samples.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_steps = int(state.get("train_steps", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.measure_seconds = float(state.get("measure_seconds", 0.0))
        samples = state.get("samples", {})
        self.samples = {kind: [float(v) for v in samples.get(kind, [])] for kind in _KINDS}


class _Block:
    """A :meth:`RunClock.monitoring` block: enter and leave the monitor's time."""

    def __init__(self, clock: RunClock, ends_step: bool) -> None:
        self.clock, self.ends_step = clock, ends_step

    def __enter__(self) -> None:
        self.clock.enter()

    def __exit__(self, *exc: object) -> None:
        self.clock.leave(self.ends_step)


def _append(samples: list[float], value: float, keep: int = _MAX_SAMPLES) -> None:
    samples.append(value)
    del samples[:-keep]


def crosses_power_of_two(last: int, step: int, below: float) -> bool:
    """Whether a power of two p with last < p <= step and p < below exists."""
    first = 1 if last < 1 else 1 << last.bit_length()  # the smallest power of two > last
    return first <= step and first < below


def ordinal(number: int) -> str:
    """The wording of "every ``full_every``-th measurement": one, 2nd, 3rd, 8th, 11th."""
    if number == 1:
        return "one"
    suffixes = {1: "st", 2: "nd", 3: "rd"}
    last = number % 10 if number % 100 not in (11, 12, 13) else 0
    return f"{number}{suffixes.get(last, 'th')}"
