"""When to measure, and which tier: a schedule that keeps its promises.

- An explicit ``every_n_steps`` is honoured exactly: a measurement at every step where a
  multiple of it is reached or crossed (``global_step`` can advance by more than one per
  batch, e.g. two optimizers under manual optimization), never skipped. If it costs more
  than ``max_overhead``, one warning says so, with the measured overhead.
- ``every_n_steps=None`` calibrates once: the log-spaced early steps (1, 2, 4, 8) are
  measured and timed against the training steps, and at step :data:`CALIBRATION_STEP` the
  densest power-of-two cadence whose overhead fits ``max_overhead`` is fixed for the rest of
  the run, so curves are comparable and runs reproducible. It is the only decision that
  reads a clock; under data parallelism the callback agrees it across ranks (rank 0's
  proposal, broadcast) before it is used, so every rank decides the same steps.
- ``log_spaced`` adds steps 1, 2, 4, 8, … below the cadence, where curvature moves fastest.
- The first measurement of a run and every ``full_every``-th after it are *full*; the rest
  are *track* measurements.

The clock is injected (``clock``), so the calibration is tested with a fake one.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from lightning_curvature.measurement import Tier
from lightning_curvature.monitor.validation import check_int, check_number

# The calibration is fixed at the first decision at or after this step: by then the
# log-spaced steps 1, 2, 4 and 8 have timed a full and three track measurements, and
# fifteen training steps after the first (which pays for warm-up) have been timed.
CALIBRATION_STEP = 16
# The cadence without calibration (max_overhead=None) and the calibration's upper limit.
DEFAULT_CADENCE = 64
MAX_CADENCE = 2**14


class Schedule:
    """Decides, step by step, whether to measure and which tier (see the module docstring).

    The callback's protocol: ``start()`` when training starts; ``batch_started()`` and
    ``batch_ended()`` around every training batch (they time the steps); at each batch end,
    if ``needs_agreement(step)``, ``agree(value)`` with rank 0's ``proposal``, then
    ``decide(step, ready)`` gives ``"track"``, ``"full"`` or None; after a measurement,
    ``measured(tier, seconds)``, then ``message()`` (a calibration note or the one overhead
    warning, once). ``peek(step)`` answers "would ``step`` be measured?" without deciding.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        full_every: int = 8,
        log_spaced: bool = True,
        max_overhead: float | None = 0.05,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if every_n_steps is not None:
            every_n_steps = check_int("every_n_steps", every_n_steps, 1)
        if max_overhead is not None:
            max_overhead = check_number("max_overhead", max_overhead, 0, 1, open_low=True)
        self.full_every = check_int("full_every", full_every, 1)
        self.requested = every_n_steps
        self.log_spaced = log_spaced
        self.max_overhead = max_overhead
        self.clock = clock
        self.cadence: int | None = every_n_steps
        if every_n_steps is None and max_overhead is None:
            self.cadence = DEFAULT_CADENCE
        self.last_step = 0
        self.counts = {"track": 0, "full": 0}
        self.measure_seconds = 0.0
        self.train_seconds = 0.0
        self.step_times: list[float] = []
        self.tier_times: dict[str, list[float]] = {"track": [], "full": []}
        self.proposal: int | None = None
        self.is_warning = False
        self._pending: str | None = None
        self._warned_overhead = False
        self._batch_started: float | None = None

    # ------------------------------------------------------------------ timing
    def start(self) -> None:
        self._batch_started = None

    def batch_started(self) -> None:
        self._batch_started = self.clock()

    def batch_ended(self) -> None:
        if self._batch_started is None:
            return
        seconds = self.clock() - self._batch_started
        self._batch_started = None
        self.train_seconds += seconds
        if self.cadence is None:
            self.step_times.append(seconds)

    def measured(self, tier: Tier, seconds: float) -> None:
        self.measure_seconds += seconds
        self.tier_times[tier].append(seconds)
        if (
            self.requested is not None
            and self.max_overhead is not None
            and not self._warned_overhead
            and sum(self.counts.values()) >= 3
            and self.overhead() > self.max_overhead
        ):
            self._warned_overhead = True
            self._say(
                f"every_n_steps={self.requested} costs {self.overhead():.1%} of the training "
                f"time, over max_overhead={self.max_overhead:g}. Every scheduled step is still "
                "measured; to lower the cost, raise every_n_steps or full_every, or measure "
                "less in full measurements (k, trace=False, num_probes).",
                warning=True,
            )

    def overhead(self) -> float:
        """Measurement time over training time without it (0.05: 5% slower)."""
        return self.measure_seconds / self.train_seconds if self.train_seconds > 0 else math.nan

    # ------------------------------------------------------------------ decisions
    def needs_agreement(self, step: int) -> bool:
        """True once, at the calibration step: the callback must ``agree`` on the cadence."""
        if self.cadence is not None or step < CALIBRATION_STEP:
            return False
        self.proposal = self._calibrated_cadence()
        return True

    def agree(self, cadence: int) -> None:
        """Fix the cadence (rank 0's proposal under data parallelism)."""
        self.cadence = int(cadence)
        track, full = _median(self.tier_times["track"]), _median(self.tier_times["full"])
        self._say(
            f"measuring every {self.cadence} steps (calibrated once and kept: a track "
            f"measurement takes {track:.3g} s, a full one {full:.3g} s, every "
            f"{self.full_every}th measurement is full, a training step takes "
            f"{_median(self.step_times[1:] or self.step_times):.3g} s, max_overhead="
            f"{self.max_overhead:g}). Pass every_n_steps to choose it yourself."
        )

    def peek(self, step: int) -> Tier | None:
        """The tier ``decide(step)`` would give, without deciding."""
        if step <= self.last_step:
            return None
        if self._log_spaced_due(step) or self._crossed(step):
            return "full" if self._next_is_full() else "track"
        return None

    def decide(self, step: int, ready: bool = True) -> Tier | None:
        """Whether ``step`` is measured, and which tier; records the decision."""
        if self.cadence is None and step >= CALIBRATION_STEP:
            self.agree(self._calibrated_cadence())  # single process: no one to agree with
        tier = self.peek(step) if ready else None
        if step > self.last_step:
            self.last_step = step
        if tier is not None:
            self.counts[tier] += 1
        return tier

    def message(self) -> str | None:
        """The calibration note or the overhead warning, once each (then None)."""
        message, self._pending = self._pending, None
        return message

    def summary(self) -> str:
        how = "given" if self.requested is not None else "calibrated"
        cadence = f"every {self.cadence} steps ({how})" if self.cadence else "not calibrated"
        return (
            f"{self.counts['track'] + self.counts['full']} measurements "
            f"({self.counts['track']} track, {self.counts['full']} full), {cadence}, "
            f"overhead {self.overhead():.1%}"
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "cadence": self.cadence,
            "last_step": self.last_step,
            "counts": dict(self.counts),
            "measure_seconds": self.measure_seconds,
            "train_seconds": self.train_seconds,
            "warned_overhead": self._warned_overhead,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("cadence") is not None and self.requested is None:
            self.cadence = int(state["cadence"])
        self.last_step = int(state.get("last_step", 0))
        self.counts.update(state.get("counts", {}))
        self.measure_seconds = float(state.get("measure_seconds", 0.0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self._warned_overhead = bool(state.get("warned_overhead", False))

    # ------------------------------------------------------------------ internals
    def _log_spaced_due(self, step: int) -> bool:
        below = self.cadence is None or step < self.cadence
        return self.log_spaced and below and (step & (step - 1)) == 0

    def _crossed(self, step: int) -> bool:
        if self.cadence is None:
            return False
        return step // self.cadence > self.last_step // self.cadence

    def _next_is_full(self) -> bool:
        return sum(self.counts.values()) % self.full_every == 0

    def _calibrated_cadence(self) -> int:
        """The densest power of two whose overhead fits ``max_overhead``."""
        assert self.max_overhead is not None
        step = _median(self.step_times[1:] or self.step_times)
        track = _median(self.tier_times["track"] or self.tier_times["full"])
        full = _median(self.tier_times["full"] or self.tier_times["track"])
        per_measurement = track + (full - track) / self.full_every
        if not (step > 0 and math.isfinite(per_measurement)):
            return DEFAULT_CADENCE
        cadence = 1
        while cadence < MAX_CADENCE and per_measurement > self.max_overhead * cadence * step:
            cadence *= 2
        return cadence

    def _say(self, text: str, warning: bool = False) -> None:
        self._pending = text
        self.is_warning = warning


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan
