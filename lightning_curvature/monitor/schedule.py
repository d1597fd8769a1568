r"""When to measure: a fixed cadence, two tiers, and the same decision on every rank.

:class:`MeasurementSchedule` says after each optimizer step whether to measure, and how:
**track** (λmax and what hangs on it; cheap) at every multiple of the cadence :math:`n`
and, with ``log_spaced``, at steps 1, 2, 4, 8, ... below :math:`n`, where curvature
changes fastest; **full** (top-k, trace, density, ...) at the first measurement of the
run and at every ``full_every``-th measurement after it, log-spaced ones included. The
default schedule (``every_n_steps=None``) also measures the last step of a run whose length
is known, full. A scheduled step is measured when ``global_step`` *crosses* it, so a step
that advances by two per batch (two optimizers, manual optimization) misses none.

The cadence is the user's ``every_n_steps``, honoured exactly (never skipped; one warning
if it costs more than ``max_overhead``), or, with ``every_n_steps=None``, calibrated once
and then fixed, so curves are comparable and reruns reproducible. Calibration measures at
steps :math:`s_0 + 1, 2, 4, \dots, 32` (:math:`s_0` the step training started from: on a
fresh run, the log-spaced steps), times a full measurement :math:`t_f` (the first: cold,
so the estimate errs towards sparse), a track one :math:`t_t` (the median), the monitor's
per-step work and a training step :math:`t_s` (the means: the run pays for its slow steps
too), and picks the densest power of two :math:`n` within ``max_overhead``, over the whole
run when its length is known (:mod:`~lightning_curvature.monitor.cadence` has the formula).
With ``max_overhead=None`` the cadence is :data:`DEFAULT_EVERY_N_STEPS`. The early warning
adds triggered measurements and, far from the edge, skips odd multiples' track points.

**Ranks.** Decisions depend on steps and counters, never on a clock, except the one
calibrated number: it goes through ``agree`` (e.g. a broadcast of rank 0's value) in the
one :meth:`~MeasurementSchedule.decide` call that calibrates, which comes at the same step
on every rank, so a collective there is safe.

**Calling protocol** (:class:`~lightning_curvature.CurvatureMonitor`'s): ``start`` at train
start; at every batch end on every rank (also while waiting for probe batches: the calls
time the training steps) ``decision = decide(step, agree, trigger, sparse)``, showing
``decision.info`` (the calibration line) and ``decision.warning`` (over budget, once), and,
when ``decision.tier`` is set, measuring inside ``with timed(decision):`` (counted unless
it raises); ``summary()`` at the end; ``state_dict``/``load_state_dict`` for checkpoints.
A decision that is not timed (skipped, say for want of probe batches) is not counted;
the first full measurement is retried at each scheduled step until one completes.

Example::

    >>> schedule = MeasurementSchedule(every_n_steps=5, full_every=2, max_overhead=None)
    >>> for step in range(1, 21):
    ...     decision = schedule.decide(step)
    ...     if decision.measure:
    ...         with schedule.timed(decision):
    ...             print(step, decision.tier)  # measure here
    1 full
    2 track
    4 full
    5 track
    10 full
    15 track
    20 full
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lightning_curvature._checks import check_bool, check_int, check_number
from lightning_curvature.measure.tiers import Tier
from lightning_curvature.monitor.cadence import (
    RunClock,
    RunSoFar,
    calibration_line,
    crosses_power_of_two,
    ordinal,
    overhead_warning,
)

TRACK: Tier = "track"
FULL: Tier = "full"

# The cadence when every_n_steps=None and max_overhead=None: nothing to calibrate against.
DEFAULT_EVERY_N_STEPS = 100
# Calibration ends at s0 + 32 (after s0 + 1, 2, 4, ...): step times have heavy tails.
CALIBRATION_SPAN = 32
# Timed training steps before the overhead of an explicit cadence is judged.
_WARNING_SPAN = 8
# The state that survives resume, besides the calibrated cadence and the clock's.
_COUNTS = "calibration_start last_step num_track num_full num_failed num_triggered num_skipped"


@dataclass(frozen=True)
class Decision:
    """What :meth:`MeasurementSchedule.decide` says for one step.

    ``tier`` is ``"track"``, ``"full"`` or ``None`` (no measurement). ``info`` is the
    one-time calibration line, ``warning`` the one-time overhead warning; both are ready
    to show to the user, and ``None`` at every other step.
    """

    step: int
    tier: Tier | None
    info: str | None = None
    warning: str | None = None
    trigger: str | None = None  # why a step off the schedule is measured
    skipped: bool = False  # a scheduled track point left out far from the edge

    @property
    def measure(self) -> bool:
        return self.tier is not None

    @property
    def full(self) -> bool:
        return self.tier == FULL


class MeasurementSchedule:
    """Decides at which steps to measure, track or full (see the module docstring).

    Args:
        every_n_steps: the cadence in optimizer steps, honoured exactly; ``None``
            calibrates it once to ``max_overhead`` and then keeps it.
        log_spaced: also measure at steps 1, 2, 4, 8, ... below the cadence.
        full_every: the first measurement, and every this-many-th one after it (log-spaced
            ones included), is full.
        max_overhead: the measurement time the cadence may cost, as a fraction of the
            training time, in (0, 1]. With ``every_n_steps=None`` it sets the calibrated
            cadence; with an integer it only warns (once) when exceeded. ``None``: no
            warning, and :data:`DEFAULT_EVERY_N_STEPS` when ``every_n_steps=None``.
        clock: seconds as a float; injected so tests can use a fake clock.

    Raises:
        ValueError: naming the argument: ``every_n_steps`` (or ``None``) or ``full_every``
            not an integer >= 1, ``max_overhead`` (or ``None``) outside (0, 1],
            ``log_spaced`` not a bool, ``clock`` not callable.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        log_spaced: bool = True,
        full_every: int = 8,
        max_overhead: float | None = 0.05,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if every_n_steps is not None:
            every_n_steps = _check_cadence(every_n_steps)
        log_spaced = check_bool("log_spaced", log_spaced)
        if max_overhead is not None:
            allowed = "a number in (0, 1] or None"
            max_overhead = check_number(
                "max_overhead", max_overhead, above=0.0, at_most=1.0, allowed=allowed
            )
        self.every_n_steps = every_n_steps
        self.log_spaced = log_spaced
        self.full_every = check_int("full_every", full_every, 1)
        self.max_overhead = max_overhead
        self.clock = RunClock(clock)

        # The cadence in force: fixed now, or by calibration.
        self.cadence: int | None = every_n_steps
        if every_n_steps is None and max_overhead is None:
            self.cadence = DEFAULT_EVERY_N_STEPS
        self.calibration_start = self.last_step = 0
        self.num_track = self.num_full = self.num_failed = self.num_triggered = 0
        self.num_skipped = 0  # track points left out far from the edge
        # The projected overhead of the cadence, from the calibration samples.
        self.estimated_overhead: float | None = None
        self._final_step: int | None = None  # the run's last step, measured full by default

    # ------------------------------------------------------------------ protocol
    def start(self, step: int, total_steps: int | None = None) -> None:
        """Start (or resume) training at ``step`` (``trainer.global_step``); call it at
        train start, after any checkpoint was loaded. ``total_steps``: the step the run will
        end at, when known (``trainer.estimated_stepping_batches``); the default schedule
        then measures it, full."""
        step = check_int("step", step, 0)
        if total_steps is not None:
            total_steps = check_int("total_steps", total_steps, 1)
        self._final_step = total_steps if self.every_n_steps is None else None
        if self.cadence is None and not self.clock.measured_any():
            self.calibration_start = step  # after a resume, calibrate from here
        self.last_step = step
        self.clock.start()

    def decide(
        self,
        step: int,
        agree: Callable[[int], int] | None = None,
        trigger: str | None = None,
        sparse: bool = False,
    ) -> Decision:
        """Call after every optimizer step (every batch) with the global step; returns
        whether and how to measure at it.

        Args:
            step: ``trainer.global_step``, non-decreasing between calls.
            agree: called once, at the call that calibrates, with this rank's proposed
                cadence; it must return the cadence every rank uses (rank 0's, e.g. a
                broadcast). ``None``: the proposal is used as is (one process).
            trigger: why to measure this step even if it is not scheduled (the early
                warning's reason, the same on every rank); a triggered measurement is a
                track one, and does not shift the schedule's full ones.
            sparse: far from the edge (the early warning says so, the same on every rank):
                a calibrated cadence skips its odd multiples' track points, so the budget
                they would have spent pays for triggered ones near the edge.
        """
        step = check_int("step", step, 0)
        if step > self.last_step:
            self.clock.steps_passed(step - self.last_step, collect=self._collecting())
        else:
            self.clock.steps_passed(0, collect=False)
        info = warning = None
        if self.cadence is None and self._calibration_due():
            info = self._calibrate(agree)
        elif self._overhead_check_due():
            warning = self._overhead_warning()
        tier = self._tier(self.last_step, step)
        skipped = tier == TRACK and sparse and self._skippable(self.last_step, step)
        if skipped:
            tier = None
            self.num_skipped += 1
        if tier is not None or step <= self.last_step:
            trigger = None
        self.last_step = max(self.last_step, step)
        tier = TRACK if trigger is not None else tier
        return Decision(step, tier, info, warning, trigger, skipped)

    def _skippable(self, last: int, step: int) -> bool:
        """Whether the track point in (last, step] is an odd multiple of a calibrated
        cadence: not log-spaced, not the last step, not an explicit cadence's promise."""
        n = self.cadence
        if self.every_n_steps is not None or n is None or step < n:
            return False
        final = self._final_step is not None and last < self._final_step <= step
        return not final and step // n > last // n and (step // n) % 2 == 1

    def upcoming(self, step: int) -> Tier | None:
        """The tier :meth:`decide` would give at ``step`` now, without deciding or timing
        (the monitor keeps θ_{s−1} only before a step that will be measured)."""
        return self._tier(self.last_step, step)

    @contextmanager
    def timed(self, decision: Decision) -> Iterator[None]:
        """Time the measurement ``decision`` asked for; it counts (and, while calibrating,
        serves as a timing sample) unless an exception escapes, which counts as failed."""
        if decision.tier is None:
            raise ValueError(f"timed() needs a decision that measures, got {decision!r}")
        started = self.clock.now()
        completed = False
        try:
            yield
            completed = True
        finally:
            self.clock.measured(decision.tier, started, completed, collect=self._collecting())
            if not completed:
                self.num_failed += 1
            elif decision.trigger is not None:
                self.num_triggered += 1
            elif decision.tier == FULL:
                self.num_full += 1
            else:
                self.num_track += 1

    def fix_cadence(self, every_n_steps: int) -> None:
        """Fix the calibrated cadence (as :meth:`decide` does with the agreed value)."""
        if self.every_n_steps is not None:
            raise ValueError(
                f"fix_cadence is for a calibrated cadence; every_n_steps={self.every_n_steps} "
                "was given explicitly and is honoured as it is"
            )
        self.cadence = _check_cadence(every_n_steps)
        self.clock.forget_samples()

    # ------------------------------------------------------------------ reporting
    @property
    def overhead(self) -> float:
        """Measurement time over training time so far (NaN before any training time)."""
        return self.clock.overhead

    def summary(self) -> str:
        """A few sentences for the end of a run: points logged, cadence, overhead."""
        failed = f", {self.num_failed} failed" if self.num_failed else ""
        triggered = f", {self.num_triggered} triggered" if self.num_triggered else ""
        triggered += f", {self.num_skipped} skipped far from the edge" if self.num_skipped else ""
        total = self.num_track + self.num_full + self.num_triggered
        text = (
            f"Curvature measurements: {total} ({self.num_track} track, {self.num_full} "
            f"full{triggered}{failed})"
        )
        if self.cadence is None:
            text += " while calibrating the cadence"
        else:
            how = "as asked" if self.every_n_steps is not None else "calibrated"
            how = "the default" if self.max_overhead is None and self.every_n_steps is None else how
            log_spaced = " and at steps 1, 2, 4, … below it" if self.log_spaced else ""
            final = " and at the last step" if self._final_step is not None else ""
            text += (
                f", every {self.cadence} steps ({how}){log_spaced}{final}; the first "
                f"measurement and every {ordinal(self.full_every)} after it full"
            )
        if math.isfinite(self.overhead):
            budget = "" if self.max_overhead is None else f" (max_overhead {self.max_overhead:g})"
            text += f". Measuring took {self.overhead:.1%} of the training time{budget}"
        return text + "."

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        calibrated = self.every_n_steps is None and self.max_overhead is not None
        return {
            "calibrated_every_n_steps": self.cadence if calibrated else None,
            **{name: getattr(self, name) for name in _COUNTS.split()},
            **self.clock.state_dict(),
            "estimated_overhead": self.estimated_overhead,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # .get() defaults: checkpoints written before a key existed still load.
        calibrated = state.get("calibrated_every_n_steps")
        if calibrated is not None and self.every_n_steps is None and self.max_overhead is not None:
            self.cadence = int(calibrated)
        for name in _COUNTS.split():
            setattr(self, name, int(state.get(name, 0)))
        self.clock.load_state_dict(state)
        estimated = state.get("estimated_overhead")
        self.estimated_overhead = None if estimated is None else float(estimated)

    # ------------------------------------------------------------------ internals
    def _collecting(self) -> bool:
        """Whether timings are still wanted: to calibrate, or for the one overhead check."""
        return self.max_overhead is not None and self.estimated_overhead is None

    def _tier(self, last: int, step: int) -> Tier | None:
        """The tier for the steps in (last, step], or None if none of them is scheduled."""
        if step <= last:
            return None
        n = self.cadence
        final = self._final_step is not None and last < self._final_step <= step
        if n is None and self._calibration_due():
            # Only upcoming() gets here: the call at this step will calibrate, and the
            # cadence it fixes is not known yet, so say it may measure.
            scheduled = True
        elif n is None:  # calibrating: s0 + 1, 2, 4, ..., 32
            start = self.calibration_start
            scheduled = crosses_power_of_two(last - start, step - start, below=math.inf)
        else:
            scheduled = step // n > last // n or (
                self.log_spaced and crosses_power_of_two(last, step, below=n)
            )
        if not (scheduled or final):
            return None
        # Counted over completed measurements, so a failed full one is retried at the next.
        completed = self.num_track + self.num_full
        if final or self.num_full == 0 or completed % self.full_every == 0:
            return FULL
        return TRACK

    def _calibration_due(self) -> bool:
        # Due at the first call after the s0 + CALIBRATION_SPAN measurement was decided,
        # once anything was timed: a point that depends on steps (and on measurements
        # completing), the same on every rank.
        past_span = self.last_step >= self.calibration_start + CALIBRATION_SPAN
        samples = self.clock.samples
        return past_span and self.clock.measured_any() and bool(samples["step"])

    def _overhead_check_due(self) -> bool:
        samples = self.clock.samples
        return (
            self.every_n_steps is not None
            and self._collecting()
            and bool(samples[FULL])
            and len(samples[TRACK]) + len(samples[FULL]) >= 2
            # A warning, not a decision: 8 steps give its order of magnitude early.
            and len(samples["step"]) >= _WARNING_SPAN
        )

    def _calibrate(self, agree: Callable[[int], int] | None) -> str:
        assert self.max_overhead is not None  # a cadence is fixed at once otherwise
        costs = self.clock.costs(self.full_every)
        run = None
        if self._final_step is not None:  # a known length: the start's cost counts too
            run = RunSoFar(
                monitor_seconds=self.clock.measure_seconds,
                train_seconds=self.clock.train_seconds,
                step=self.last_step,
                final_step=self._final_step,
                log_spaced=self.log_spaced,
            )
        proposed = costs.densest_cadence(self.max_overhead, run)
        chosen = proposed if agree is None else _check_cadence(agree(proposed))
        self.fix_cadence(chosen)
        self.estimated_overhead = costs.overhead(chosen, run)
        return calibration_line(costs, chosen, proposed, self.max_overhead, run)

    def _overhead_warning(self) -> str | None:
        assert self.every_n_steps is not None and self.max_overhead is not None
        costs, n = self.clock.costs(self.full_every), self.every_n_steps
        self.estimated_overhead = costs.overhead(n)
        self.clock.forget_samples()
        return overhead_warning(costs, n, self.max_overhead)


def _check_cadence(value: object) -> int:
    return check_int("every_n_steps", value, 1)
