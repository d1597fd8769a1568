"""MeasurementSchedule without a Trainer: a fake clock stands in for training and measuring.

The expected steps are built from their definition (multiples, powers of two, the first
step at or after each) rather than from the schedule, and the calibrated cadence from the
overhead formula worked by hand.
"""

import contextlib
import math

import numpy as np
import pytest

from lightning_curvature.monitor.schedule import (
    DEFAULT_EVERY_N_STEPS,
    FULL,
    TRACK,
    MeasurementSchedule,
)

STEP_SECONDS = 0.010
TRACK_SECONDS = 0.004
FULL_SECONDS = 0.040


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def train(
    schedule,
    clock,
    steps,
    *,
    stride=1,
    start=0,
    costs=None,
    agree=None,
    step_time=None,
    total_steps=None,
):
    """Run training from ``start`` to ``steps`` with global_step advancing by ``stride``
    per batch (a run planned to end at ``total_steps``); every measurement costs
    ``costs[tier]`` seconds. Returns the measured
    (step, tier) pairs and every info/warning text."""
    costs = costs or {TRACK: TRACK_SECONDS, FULL: FULL_SECONDS}
    measured, infos, warnings = [], [], []
    schedule.start(start, total_steps)
    for step in range(start + stride, steps + 1, stride):
        clock.advance(step_time(step) if step_time else STEP_SECONDS * stride)
        decision = schedule.decide(step, agree=agree)
        infos += [decision.info] if decision.info else []
        warnings += [decision.warning] if decision.warning else []
        if decision.measure:
            with schedule.timed(decision):
                clock.advance(costs[decision.tier])
            measured.append((step, decision.tier))
    return measured, infos, warnings


def powers_of_two_below(n):
    return [2**j for j in range(64) if 2**j < n]


def test_an_explicit_cadence_measures_exactly_the_scheduled_steps_even_over_budget():
    clock = FakeClock()
    schedule = MeasurementSchedule(every_n_steps=5, log_spaced=False, clock=clock)
    measured, _, warnings = train(schedule, clock, 200)
    # Each measurement costs 40-400% of a step: far over 5%, and still none is skipped.
    assert [s for s, _ in measured] == list(range(5, 201, 5))
    # The first measurement and every 8th after it are full.
    assert [s for s, tier in measured if tier == FULL] == list(range(5, 201, 5))[::8]
    assert len(warnings) == 1


def test_log_spaced_steps_come_before_the_cadence_and_are_never_repeated():
    clock = FakeClock()
    schedule = MeasurementSchedule(every_n_steps=20, clock=clock, max_overhead=None)
    measured, _, _ = train(schedule, clock, 100)
    expected = sorted({*powers_of_two_below(20), *range(20, 101, 20)})
    assert [s for s, _ in measured] == expected
    assert schedule.decide(100).tier is None  # the same step again: never measured twice


@pytest.mark.parametrize("stride", [2, 3])
def test_a_global_step_that_jumps_measures_at_every_crossed_multiple(stride):
    clock = FakeClock()
    schedule = MeasurementSchedule(every_n_steps=5, clock=clock, max_overhead=None)
    measured, _, _ = train(schedule, clock, 200, stride=stride)
    visited = range(stride, 201, stride)
    targets = [*powers_of_two_below(5), *range(5, 201, 5)]
    # The first visited step at or after each target, each once.
    expected = sorted({min(s for s in visited if s >= t) for t in targets if t <= visited[-1]})
    assert [s for s, _ in measured] == expected


@pytest.mark.parametrize("every_n_steps", [None, 6])
def test_upcoming_announces_every_measurement_before_the_step(every_n_steps):
    clock = FakeClock()
    schedule = MeasurementSchedule(every_n_steps=every_n_steps, clock=clock)
    schedule.start(0)
    announced, measured = [], []
    for step in range(2, 301, 2):  # two optimizer steps per batch
        upcoming = schedule.upcoming(step)
        clock.advance(2 * STEP_SECONDS)
        decision = schedule.decide(step)
        announced += [step] if upcoming else []
        if decision.measure:
            assert decision.tier == upcoming
            measured.append(step)
            with schedule.timed(decision):
                clock.advance(TRACK_SECONDS if decision.tier == TRACK else FULL_SECONDS)
    assert measured and set(measured) <= set(announced)
    # Only the call that calibrates (its cadence not known yet) may announce in vain.
    assert set(announced) - set(measured) == ({34} if every_n_steps is None else set())


def test_gradient_accumulation_repeats_steps_without_measuring_twice():
    clock = FakeClock()
    schedule = MeasurementSchedule(clock=clock)
    schedule.start(0)
    measured = []
    for batch in range(1, 2 * 600):  # two batches per optimizer step
        step = batch // 2
        clock.advance(STEP_SECONDS / 2)
        decision = schedule.decide(step)
        if decision.measure:
            with schedule.timed(decision):
                clock.advance(TRACK_SECONDS if decision.tier == TRACK else FULL_SECONDS)
            measured.append(step)
    assert measured == sorted({1, 2, 4, 8, 16, *range(32, 600, 32)})
    # The time of both batches counts for their step: the cadence is the one worked out
    # below for 10 ms steps, not for 5 ms batches (which would be 64).
    assert schedule.cadence == 32


def test_the_calibrated_cadence_is_the_hand_computed_power_of_two_and_stays_fixed():
    clock = FakeClock()
    schedule = MeasurementSchedule(every_n_steps=None, clock=clock)
    measured, infos, warnings = train(schedule, clock, 600)
    # Per cadence point: (7 track + 1 full) / 8 = (7·4 + 40) / 8 = 8.5 ms. Every 16 steps
    # of 10 ms that is 8.5/160 = 5.3% > 5%; every 32 steps 8.5/320 = 2.7%: so 32.
    assert schedule.cadence == 32
    steps = sorted({1, 2, 4, 8, 16, *range(32, 601, 32)})
    assert [s for s, _ in measured] == steps
    # Every 8th measurement is full, the log-spaced ones counted: 1, 128 and 384.
    assert [s for s, tier in measured if tier == FULL] == steps[::8] == [1, 128, 384]
    assert warnings == []
    (info,) = infos
    assert "every 32 steps" in info and "2.7%" in info and "5.3%" in info
    assert "4 ms" in info and "40 ms" in info and "10 ms" in info
    # Reproducible: a second run under the same clock chooses and measures the same.
    again = MeasurementSchedule(every_n_steps=None, clock=(clock2 := FakeClock()))
    assert train(again, clock2, 600)[0] == measured


SHORT_RUN_COSTS = {TRACK: 0.060, FULL: 0.300}  # (7·60 + 300)/8 = 90 ms a point: every 256


def test_a_short_run_of_known_length_gets_full_points_spread_over_it():
    # 1,000 steps of 10 ms, a cadence of 256 (90 ms a point: 3.5% every 256 steps, 7% every
    # 128). It used to get one full measurement, at step 1, and no point after step 768.
    clock = FakeClock()
    schedule = MeasurementSchedule(clock=clock)
    measured, _, _ = train(schedule, clock, 1000, costs=SHORT_RUN_COSTS, total_steps=1000)
    assert schedule.cadence == 256
    steps = [*powers_of_two_below(256), 256, 512, 768, 1000]
    assert [s for s, _ in measured] == steps
    # The first, every 8th after it (the log-spaced points counted) and the last are full.
    assert [s for s, tier in measured if tier == FULL] == [*steps[::8], 1000] == [1, 256, 1000]
    assert "and at the last step" in schedule.summary()


def test_an_explicit_cadence_adds_no_last_step():
    clock = FakeClock()
    schedule = MeasurementSchedule(every_n_steps=300, clock=clock, max_overhead=None)
    measured, _, _ = train(schedule, clock, 1000, total_steps=1000)
    assert [s for s, _ in measured] == [*powers_of_two_below(300), 300, 600, 900]


def test_calibration_charges_the_slow_steps_a_run_pays_for():
    # Every 8th step takes 45 ms (a preempted or data-loading step), the others 5 ms: the
    # run takes 10 ms a step on average, so the cadence is the 32 worked out above, not
    # the 64 that the typical 5 ms step would give.
    clock = FakeClock()
    schedule = MeasurementSchedule(clock=clock)
    train(schedule, clock, 100, step_time=lambda step: 0.045 if step % 8 == 0 else 0.005)
    assert schedule.cadence == 32


def test_cheap_measurements_calibrate_to_every_step():
    clock = FakeClock()
    schedule = MeasurementSchedule(clock=clock)
    cheap = {TRACK: 0.0001, FULL: 0.0004}  # (7·0.1 + 0.4)/8 ms over 10 ms: 1.4%
    measured, _, _ = train(schedule, clock, 50, costs=cheap)
    assert schedule.cadence == 1
    # Calibration at 1, 2, 4, ..., 32; from the next step on, every step.
    assert [s for s, _ in measured] == [1, 2, 4, 8, 16, 32, *range(33, 51)]


def test_without_a_budget_the_default_cadence_is_fixed_from_the_start():
    clock = FakeClock()
    schedule = MeasurementSchedule(every_n_steps=None, max_overhead=None, clock=clock)
    measured, infos, warnings = train(schedule, clock, 300)
    expected = [*powers_of_two_below(DEFAULT_EVERY_N_STEPS), 100, 200, 300]
    assert [s for s, _ in measured] == expected
    assert infos == warnings == []


def test_ranks_with_different_clocks_agree_on_rank_zeros_cadence():
    clocks = [FakeClock(), FakeClock()]
    ranks = [MeasurementSchedule(clock=clock) for clock in clocks]
    # Rank 1 measures 4x slower (a busier device): alone it would choose a sparser cadence.
    costs = [{TRACK: 0.004, FULL: 0.040}, {TRACK: 0.016, FULL: 0.160}]
    proposals = []

    def broadcast_from_rank_zero(proposed):
        proposals.append(proposed)
        return proposals[0]

    decisions = [[], []]
    for step in range(1, 401):
        for rank in (0, 1):
            clocks[rank].advance(STEP_SECONDS)
            decision = ranks[rank].decide(step, agree=broadcast_from_rank_zero)
            decisions[rank].append(decision.tier)
            if decision.measure:
                with ranks[rank].timed(decision):
                    clocks[rank].advance(costs[rank][decision.tier])
    assert proposals == [32, 128]  # (7·16 + 160)/8 = 34 ms: 34/1280 = 2.7% at 128
    assert decisions[0] == decisions[1]
    assert ranks[0].cadence == ranks[1].cadence == 32


def test_the_overhead_warning_names_the_cost_and_a_cadence_that_fits_once():
    clock = FakeClock()
    schedule = MeasurementSchedule(every_n_steps=5, clock=clock)
    _, infos, warnings = train(schedule, clock, 400)
    assert infos == []
    (warning,) = warnings
    # 8.5 ms per point every 5 steps of 10 ms: 17%; 8.5 / (0.05 · 10) = 17 steps fit 5%.
    assert "17.0%" in warning and "max_overhead=0.05" in warning
    assert "every_n_steps=17" in warning and "trace=False" in warning
    quiet = MeasurementSchedule(every_n_steps=5, max_overhead=None, clock=(clock2 := FakeClock()))
    assert train(quiet, clock2, 400)[2] == []
    within = MeasurementSchedule(every_n_steps=32, clock=(clock3 := FakeClock()))
    assert train(within, clock3, 400)[2] == []
    # A short run hears it too: judged once 8 steps are timed.
    every_step = MeasurementSchedule(every_n_steps=1, clock=(clock4 := FakeClock()))
    assert len(train(every_step, clock4, 30)[2]) == 1


def test_the_measured_overhead_and_summary_count_what_happened():
    clock = FakeClock()
    schedule = MeasurementSchedule(every_n_steps=10, log_spaced=False, clock=clock)
    train(schedule, clock, 200)
    num_full = 1 + len(range(80, 201, 80))  # the first, then every 8·10 steps
    assert (schedule.num_track, schedule.num_full) == (20 - num_full, num_full)
    measuring = (20 - num_full) * TRACK_SECONDS + num_full * FULL_SECONDS
    training = 200 * STEP_SECONDS  # the clock starts at start(): step 1 counts too
    assert schedule.overhead == pytest.approx(measuring / training)
    text = schedule.summary()
    assert f"20 ({20 - num_full} track, {num_full} full)" in text
    assert "every 10 steps (as asked)" in text and f"{measuring / training:.1%}" in text


def test_the_steps_slowed_by_a_measurement_count_their_extra_time_as_overhead():
    # Every 16 steps a measurement; the 3 steps after each take 3 ms more than the quiet
    # 10 ms ones (caches refilled). Those 9 ms per measurement are the monitor's cost, once
    # 8 quiet steps are known (after the first measurement at 16, steps 4-15 of each gap).
    clock = FakeClock()
    schedule = MeasurementSchedule(every_n_steps=16, log_spaced=False, clock=clock)
    after = {m + i for m in range(16, 321, 16) for i in (1, 2, 3)}
    slower = 0.003
    measured, _, _ = train(
        schedule,
        clock,
        320,
        step_time=lambda step: STEP_SECONDS + (slower if step in after else 0.0),
    )
    num_full = len(range(16, 321, 16 * 8))
    measuring = (len(measured) - num_full) * TRACK_SECONDS + num_full * FULL_SECONDS
    counted = 3 * slower * (len(measured) - 1)  # the last one's steps are not trained
    assert schedule.clock.measure_seconds == pytest.approx(measuring + counted)
    assert schedule.clock.train_seconds == pytest.approx(320 * STEP_SECONDS)
    assert schedule.overhead == pytest.approx((measuring + counted) / (320 * STEP_SECONDS))


def test_an_after_effect_is_charged_at_most_one_quiet_step():
    # A step after a measurement that is slow for another reason (an epoch's end: 1 s) is
    # charged one quiet step (10 ms), not its whole second; quiet steps are charged nothing.
    clock = FakeClock()
    schedule = MeasurementSchedule(every_n_steps=16, log_spaced=False, clock=clock)
    train(schedule, clock, 40, step_time=lambda step: 1.0 if step == 33 else STEP_SECONDS)
    measuring = FULL_SECONDS + TRACK_SECONDS  # at 16 and 32
    assert schedule.clock.measure_seconds == pytest.approx(measuring + STEP_SECONDS)
    assert schedule.clock.train_seconds == pytest.approx(1.0 + 39 * STEP_SECONDS - STEP_SECONDS)


def test_the_overhead_is_defined_from_the_first_measurement_on():
    clock = FakeClock()
    schedule = MeasurementSchedule(every_n_steps=4, clock=clock)
    measured, _, _ = train(schedule, clock, 1)
    assert measured == [(1, FULL)]
    # One step trained, one full measurement: FULL_SECONDS / STEP_SECONDS, not NaN.
    assert schedule.overhead == pytest.approx(FULL_SECONDS / STEP_SECONDS)


def test_the_first_steps_one_time_costs_count_in_the_overhead_but_not_the_calibration():
    # Step 1 takes 1 s (loader workers starting, lazy initialisation), the others 10 ms:
    # the overhead so far charges the run for it, the cadence is the 32 of 10 ms steps.
    clock = FakeClock()
    schedule = MeasurementSchedule(clock=clock)
    train(schedule, clock, 100, step_time=lambda step: 1.0 if step == 1 else STEP_SECONDS)
    assert schedule.cadence == 32
    assert schedule.clock.train_seconds == pytest.approx(1.0 + 99 * STEP_SECONDS)


def test_a_failed_measurement_counts_as_failed_and_the_first_full_is_retried():
    clock = FakeClock()
    schedule = MeasurementSchedule(every_n_steps=2, log_spaced=False, clock=clock)
    schedule.start(0)
    tiers = []
    for step in range(1, 7):
        decision = schedule.decide(step)
        if decision.measure:
            tiers.append(decision.tier)
            with pytest.raises(RuntimeError) if step == 2 else contextlib.nullcontext():
                with schedule.timed(decision):
                    if step == 2:
                        raise RuntimeError("out of memory")
    assert tiers == [FULL, FULL, TRACK]
    assert (schedule.num_failed, schedule.num_full, schedule.num_track) == (1, 1, 1)
    assert "1 failed" in schedule.summary()


@pytest.mark.parametrize("stop", [5, 100])  # mid-calibration, and after it
def test_state_round_trip_resumes_the_same_schedule(stop):
    clock = FakeClock()
    whole = MeasurementSchedule(clock=clock)
    uninterrupted, _, _ = train(whole, clock, 400)

    clock = FakeClock()
    first = MeasurementSchedule(clock=clock)
    before, _, _ = train(first, clock, stop)
    state = first.state_dict()
    resumed = MeasurementSchedule(clock=clock)
    resumed.load_state_dict(state)
    after, _, _ = train(resumed, clock, 400, start=stop)
    assert before + after == uninterrupted
    assert resumed.cadence == whole.cadence == 32
    assert (resumed.num_track, resumed.num_full) == (whole.num_track, whole.num_full)


def test_an_old_checkpoint_without_schedule_state_calibrates_from_the_resumed_step():
    clock = FakeClock()
    schedule = MeasurementSchedule(clock=clock)
    schedule.load_state_dict({})
    measured, infos, _ = train(schedule, clock, 700, start=500)
    # Calibration at 500 + 1, 2, 4, ..., 32, then the multiples of the calibrated 32.
    assert [s for s, _ in measured][:6] == [501, 502, 504, 508, 516, 532]
    assert [s for s, _ in measured][6:] == list(range(544, 701, 32))
    assert len(infos) == 1


@pytest.mark.parametrize("value", [0, -1, True, "5", 2.5, math.nan])
def test_bad_every_n_steps_is_named_with_what_is_allowed(value):
    with pytest.raises(ValueError, match=r"every_n_steps must be an integer >= 1"):
        MeasurementSchedule(every_n_steps=value)


@pytest.mark.parametrize("value", [0, -3, True, "8", 1.5])
def test_bad_full_every_is_named(value):
    with pytest.raises(ValueError, match=r"full_every must be an integer >= 1"):
        MeasurementSchedule(full_every=value)


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, True, "0.05", math.nan, math.inf])
def test_bad_max_overhead_is_named(value):
    with pytest.raises(ValueError, match=r"max_overhead must be a number in \(0, 1\] or None"):
        MeasurementSchedule(max_overhead=value)


def test_numpy_numbers_are_accepted_as_python_ones():
    schedule = MeasurementSchedule(
        every_n_steps=np.int64(5), full_every=np.int32(4), max_overhead=np.float64(0.1)
    )
    assert schedule.cadence == 5 and type(schedule.cadence) is int
    assert schedule.full_every == 4 and schedule.max_overhead == 0.1
    assert schedule.decide(np.int64(5)).tier == FULL


def test_other_bad_arguments_are_named():
    with pytest.raises(ValueError, match="log_spaced"):
        MeasurementSchedule(log_spaced="yes")
    with pytest.raises(ValueError, match="clock"):
        MeasurementSchedule(clock=1.0)
    with pytest.raises(ValueError, match="step"):
        MeasurementSchedule().decide(-1)
    with pytest.raises(ValueError, match="total_steps must be an integer >= 1, got 0"):
        MeasurementSchedule().start(0, total_steps=0)
    with pytest.raises(ValueError, match="every_n_steps=5 was given explicitly"):
        MeasurementSchedule(every_n_steps=5).fix_cadence(8)


def train_with_hooks(schedule, clock, steps, hook_seconds, costs):
    """Like ``train``, with the callback's two monitoring blocks around each step: a
    block before the optimizer step (``hook_seconds``) and one after it, holding the
    decision, any measurement and ``hook_seconds`` more of bookkeeping."""
    measured = []
    schedule.start(0)
    for step in range(1, steps + 1):
        with schedule.clock.monitoring():
            clock.advance(hook_seconds)
        clock.advance(STEP_SECONDS)
        with schedule.clock.monitoring(ends_step=True):
            clock.advance(hook_seconds)
            decision = schedule.decide(step)
            if decision.measure:
                with schedule.timed(decision):
                    clock.advance(costs[decision.tier])
                measured.append(step)
    return measured


def test_the_monitors_time_in_its_hooks_counts_as_overhead_not_training():
    clock = FakeClock()
    schedule = MeasurementSchedule(
        every_n_steps=10, log_spaced=False, max_overhead=None, clock=clock
    )
    hook = 0.001
    measured = train_with_hooks(schedule, clock, 100, hook, {TRACK: 0.004, FULL: 0.004})
    assert measured == list(range(10, 101, 10))
    # Training is exactly the optimizer steps; everything else is the monitor's.
    assert schedule.clock.train_seconds == pytest.approx(100 * STEP_SECONDS)
    monitor = 100 * 2 * hook + 10 * 0.004
    assert schedule.clock.measure_seconds == pytest.approx(monitor)
    assert schedule.overhead == pytest.approx(monitor / (100 * STEP_SECONDS))


def test_calibration_counts_the_per_step_work_so_the_chosen_cadence_keeps_the_budget():
    # Per step the monitor spends 2 × 0.1 ms (2% of a 10 ms step); a track step costs
    # 4 ms more. Without the per-step work, every 16 steps would cost 4/160 = 2.5% (plus
    # the full points); with it, every 16 costs 4.5+%: calibration must go sparser.
    hook = 0.0001
    clock = FakeClock()
    schedule = MeasurementSchedule(max_overhead=0.05, log_spaced=True, clock=clock)
    train_with_hooks(schedule, clock, 2000, hook, {TRACK: TRACK_SECONDS, FULL: FULL_SECONDS})
    n = schedule.cadence
    per_step = 2 * hook
    track, full = TRACK_SECONDS + per_step, FULL_SECONDS + per_step
    overhead = lambda n: ((7 * track + full) / 8 + (n - 1) * per_step) / (n * STEP_SECONDS)  # noqa: E731
    densest = next(m for m in (2**j for j in range(17)) if overhead(m) <= 0.05)
    assert n == densest
    # And the run's own overhead is all of the monitor's time over the training time.
    spent = 2000 * per_step + schedule.num_track * TRACK_SECONDS + schedule.num_full * FULL_SECONDS
    assert schedule.overhead == pytest.approx(spent / (2000 * STEP_SECONDS), rel=1e-9)


def test_a_known_run_length_charges_the_start_to_the_budget():
    # 20,000 steps of 10 ms; a full measurement takes 2 s, a track one 10 ms. In the long
    # run every 1,024 steps fits 5% ((7·0.01 + 2)/8 = 0.259 s a point: 2.5%; every 512:
    # 5.1%), but the start (full at step 1 and at the 8th point, 256; track points below
    # the cadence) and the full last step cost about 6 s of the run's 200: over the whole
    # run every 1,024 costs just over 5%, and only a sparser cadence fits.
    costs = {TRACK: 0.01, FULL: 2.0}
    clock = FakeClock()
    schedule = MeasurementSchedule(clock=clock)
    _, infos, _ = train(schedule, clock, 20_000, costs=costs, total_steps=20_000)
    assert schedule.cadence == 2048
    assert "start included" in infos[0]
    assert schedule.overhead <= 0.05
    # Without the run's length the start is not charged: the long-run cadence.
    clock = FakeClock()
    open_ended = MeasurementSchedule(clock=clock)
    train(open_ended, clock, 2_000, costs=costs)
    assert open_ended.cadence == 1024
