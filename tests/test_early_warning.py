"""The early warning with scripted measurements and losses: the predicted ratio, each
trigger, the budget, the alerts with lead time, loss spikes, ranks and resume."""

from __future__ import annotations

import itertools
import math

import pytest

from lightning_curvature import AlertRules, Triggers
from lightning_curvature.monitor.alerts import AlertTracker
from lightning_curvature.monitor.early_warning import (
    LOSS_NOT_FINITE,
    PREDICTED,
    TREND,
    EarlyWarning,
)
from lightning_curvature.monitor.schedule import MeasurementSchedule

QUIET = Triggers(lr_change=None, loss_jump=None, trend=False, risk=False)


def warning(triggers: Triggers = QUIET, rules: AlertRules | None = None) -> EarlyWarning:
    return EarlyWarning(triggers, AlertTracker(rules or AlertRules()))


def run(early: EarlyWarning, steps, lr=0.1, loss=1.0, cadence=64, measured=None):
    """Observe ``steps``; ``lr`` and ``loss`` may be functions of the step; ``measured``
    maps steps to the ratio measured there. Returns {step: Signals}."""
    out = {}
    for step in steps:
        eta = lr(step) if callable(lr) else lr
        value = loss(step) if callable(loss) else loss
        out[step] = early.observe(step, eta, value, cadence)
        if measured and step in measured:
            early.measured(step, measured[step], eta)
    return out


def test_the_predicted_ratio_rescales_the_last_trusted_ratio_to_the_learning_rate_now():
    early = warning()
    assert early.predicted_ratio(0.1) is None  # nothing measured yet
    early.measured(100, 0.75, 0.1)
    assert early.predicted_ratio(0.1) == pytest.approx(0.75)
    assert early.predicted_ratio(0.4) == pytest.approx(3.0)
    early.measured(120, None, 0.4)  # an untrusted ratio (Adam before bias correction)
    assert early.predicted_ratio(0.4) == pytest.approx(3.0)  # the trusted one stands


def test_a_learning_rate_raise_alerts_at_the_step_it_happens_once_with_its_evidence():
    early = warning()
    early.measured(1200, 0.75, 0.1)
    signals = run(early, range(1201, 1260), lr=lambda s: 0.4 if s >= 1210 else 0.1)
    fired = [(a.kind, a.step) for s in signals.values() for a in s.alerts]
    assert fired == [(PREDICTED, 1210)]
    message = signals[1210].alerts[0].message
    for evidence in ("step 1210", "0.4", "step 1200", "0.75", "about 3"):
        assert evidence in message, message
    assert signals[1210].trigger == "edge"  # and a measurement follows at once


def test_a_measured_ratio_already_at_the_edge_is_the_edge_rules_business():
    early = warning()
    early.measured(100, 1.2, 0.1)  # measured at the edge, η unchanged
    signals = run(early, range(101, 200))
    assert not [a for s in signals.values() for a in s.alerts]


def test_the_edge_trigger_fires_once_per_crossing_and_keeps_the_gap():
    early = warning(Triggers(lr_change=None, loss_jump=None, trend=False, risk=False, min_gap=8))
    early.measured(100, 0.5, 0.1)
    # η doubles at 103: the predicted ratio crosses edge_ratio 0.9 at once, but the last
    # measurement was 3 steps ago: the trigger waits for the gap.
    signals = run(early, range(101, 140), lr=lambda s: 0.2 if s >= 103 else 0.1)
    triggers = {s: v.trigger for s, v in signals.items() if v.trigger}
    assert triggers == {108: "edge"}


def test_an_lr_change_triggers_within_the_budget():
    early = warning(Triggers(loss_jump=None, trend=False, risk=False, burst=2, min_gap=1))
    early.measured(0, 0.1, 1.0)
    # η halves at every step after 10: a relative change of 0.5 is not "more than" 0.5, so
    # each new η is compared with the last measured one, and measuring resets it.
    triggered = []
    lr = 1.0
    for step in range(1, 40):
        lr = lr * 0.4 if step >= 10 and step % 2 == 0 else lr
        signals = early.observe(step, lr, 1.0, cadence=16)
        if signals.trigger:
            triggered.append(step)
            early.measured(step, 0.1 * lr, lr)
    # Two from the full bucket at once, then one per cadence (16 steps) as it refills.
    assert triggered[:2] == [10, 12]
    assert all(b - a >= 8 for a, b in itertools.pairwise(triggered[1:]))
    assert len(triggered) <= 2 + (39 - 10) // 16 + 1


def test_a_loss_jump_triggers_once_per_spike_and_a_non_finite_loss_alerts_instead():
    early = warning(Triggers(trend=False, risk=False))
    early.measured(0, 0.5, 0.1)
    # A noisy loss, one unlucky batch at 20 (no jump: one step is noise), then a blow-up.
    losses = {s: 1.0 + 0.05 * (s % 3) for s in range(1, 60)} | {20: 5.0, 40: 5.0, 41: 6.0, 42: 7.0}
    signals = run(early, range(1, 60), loss=lambda s: losses[s])
    assert [s for s, v in signals.items() if v.trigger] == [41]  # the second step above
    assert [s for s, v in signals.items() if v.spike] == [41]
    spike = signals[41].spike
    assert spike.first_alert is None and "No alert came before it" in spike.explanation()
    # Non-finite: an alert, no measurement.
    nan = early.observe(60, 0.1, math.nan, 64)
    assert [a.kind for a in nan.alerts] == [LOSS_NOT_FINITE] and nan.trigger is None
    assert "not finite" in nan.alerts[0].message
    assert not early.observe(61, 0.1, math.nan, 64).alerts  # once


def test_a_spike_after_an_alert_reports_its_lead_time():
    early = warning(Triggers(trend=False, risk=False))
    early.measured(1200, 0.75, 0.1)
    lr = lambda s: 0.4 if s >= 1210 else 0.1  # noqa: E731
    loss = lambda s: 1.0 if s < 1230 else 10.0  # noqa: E731
    signals = run(early, range(1201, 1240), lr=lr, loss=loss)
    spike = signals[1231].spike  # the second step far above the recent losses
    assert spike.first_alert == PREDICTED and spike.lead_steps == 21
    assert "21 steps before" in spike.explanation()
    assert "predicted_edge 21 steps before" in early.summary()


def test_the_trend_alert_gives_the_steps_to_the_edge_and_stays_quiet_when_slow():
    # Slow: 0.5 -> 0.7 over 400 steps, 750 steps from the edge: beyond trend_horizon 200.
    slow = warning()
    run(slow, range(1, 402), measured={1: 0.5, 201: 0.6, 401: 0.7})
    assert not slow.alerts.fired
    # Fast: 0.6 -> 0.8 over 100 steps: the edge in about 100 steps.
    fast = warning()
    signals = run(fast, range(1, 102), measured={1: 0.6, 51: 0.7, 101: 0.8})
    assert not fast.alerts.fired  # the third point arrives at the last step ...
    alerts = fast.observe(102, 0.1, 1.0, 64).alerts  # ... and the next step says so
    assert [a.kind for a in alerts] == [TREND]
    assert "in about 100 steps" in alerts[0].message and "by step 201" in alerts[0].message
    assert signals  # the run itself raised nothing


def test_near_the_edge_the_risk_trigger_looks_more_often_within_the_budget():
    early = warning(Triggers(lr_change=None, loss_jump=None, trend=False, min_gap=4, burst=4))
    early.measured(0, 0.95, 0.1)  # at the edge: every n/8 = 8 steps while the bucket lasts
    looks = []
    for step in range(1, 257):
        if early.observe(step, 0.1, 1.0, cadence=64).trigger:
            looks.append(step)
            early.measured(step, 0.95, 0.1)
    assert looks[:4] == [8, 16, 24, 32]
    # Then the bucket refills at one per cadence: at most 4 + 256/64 in all.
    assert len(looks) <= 4 + 256 // 64
    # Far from the edge: nothing added.
    calm = warning(Triggers(lr_change=None, loss_jump=None, trend=False))
    calm.measured(0, 0.3, 0.1)
    assert not any(calm.observe(s, 0.1, 1.0, cadence=64).trigger for s in range(1, 257))


def test_ranks_agree_on_the_loss_only_at_multiples_of_the_gap():
    early = warning(Triggers(trend=False, risk=False, min_gap=8))
    calls = []

    def agree(code: int) -> int:  # another rank saw a jump at step 20
        calls.append(code)
        return max(code, 1 if len(calls) == 3 else 0)

    signals = {s: early.observe(s, 0.1, 1.0, 64, agree_loss=agree) for s in range(1, 41)}
    assert len(calls) == 5  # steps 8, 16, 24, 32, 40: one collective each, none elsewhere
    assert [s for s, v in signals.items() if v.spike] == [24]


def test_a_resumed_early_warning_acts_as_an_uninterrupted_one():
    def script(early, steps):
        return {
            s: (v.trigger, [a.kind for a in v.alerts], v.predicted_ratio)
            for s, v in run(
                early,
                steps,
                lr=lambda s: 0.3 if s >= 150 else 0.1,
                loss=lambda s: 1.0 + 0.01 * (s % 7) + (20.0 if s == 170 else 0.0),
                measured={1: 0.3, 50: 0.4, 100: 0.5, 160: 1.6},
            ).items()
        }

    whole = script(warning(Triggers()), range(1, 200))
    first = warning(Triggers())
    before = script(first, range(1, 120))
    resumed = warning(Triggers())
    resumed.load_state_dict(first.state_dict())
    assert before | script(resumed, range(120, 200)) == whole


def test_triggered_measurements_add_to_an_explicit_cadence_and_do_not_shift_its_full_ones():
    plain = MeasurementSchedule(every_n_steps=10, full_every=2, max_overhead=None)
    triggered = MeasurementSchedule(every_n_steps=10, full_every=2, max_overhead=None)

    def measured(schedule, triggers):
        out = {}
        for step in range(1, 61):
            decision = schedule.decide(step, trigger=triggers.get(step))
            if decision.measure:
                with schedule.timed(decision):
                    out[step] = (decision.tier, decision.trigger)
        return out

    base = measured(plain, {})
    extra = measured(triggered, {13: "edge", 20: "risk", 37: "lr_change"})
    assert {s: v for s, v in extra.items() if v[1] is None} == base  # every promise kept
    assert {s: v for s, v in extra.items() if v[1]} == {
        13: ("track", "edge"),
        37: ("track", "lr_change"),
    }
    assert triggered.num_triggered == 2 and "2 triggered" in triggered.summary()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("lr_change", 0.0),
        ("loss_jump", 1.0),
        ("loss_window", 2),
        ("min_gap", 0),
        ("burst", 0),
        ("edge", 1),
        ("risk", "yes"),
    ],
)
def test_bad_triggers_name_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        Triggers(**{name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [("edge_patience_steps", 0), ("predicted_ratio", 0.0), ("trend_horizon", 0)],
)
def test_bad_early_alert_rules_name_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        AlertRules(**{name: value})


def test_a_learning_rate_change_is_no_trend():
    # The same sharpness measured at η, η and 3η: the ratio triples, the sharpness does not.
    early = warning()
    run(
        early,
        range(1, 102),
        lr=lambda s: 0.3 if s > 60 else 0.1,
        measured={1: 0.2, 51: 0.2, 101: 0.6},
    )
    assert early.trend() == pytest.approx(0.0, abs=1e-12)
    assert TREND not in [a.kind for a in early.alerts.fired]


def test_an_oscillating_blow_up_is_one_spike_and_a_later_one_is_another():
    early = warning(Triggers(trend=False, risk=False, loss_window=32))
    early.measured(0, 0.5, 0.1)
    swinging = {40: 9.0, 41: 8.0, 43: 9.0, 44: 7.0}  # a calm step between the swings
    later = {100: 9.0, 101: 9.0}  # after more than a loss window of calm
    signals = run(early, range(1, 120), loss=lambda s: swinging.get(s, later.get(s, 1.0)))
    assert [s for s, v in signals.items() if v.spike] == [41, 101]


def test_during_a_warm_up_the_prediction_carries_the_rising_sharpness_too():
    # Sharpness over the threshold rises 0.002 per step (ratio per unit η: 2 → 2.2 → 2.4
    # at steps 100, 200, 300) while η ramps up: at step 350 with η = 0.35 the plain rescale
    # says 2.4·0.35 = 0.84, the sharpness carried along its trend 2.5·0.35 = 0.875.
    early = warning()
    for step, per_lr in ((100, 2.0), (200, 2.2), (300, 2.4)):
        early.measured(step, per_lr * step / 1000, step / 1000)
    assert early.predicted_ratio(0.35) == pytest.approx(2.4 * 0.35)
    assert early.predicted_ratio(0.35, step=350) == pytest.approx(2.5 * 0.35)
    # It is capped at trend_horizon (200) steps of the trend: 2.4 + 0.4 at most.
    assert early.predicted_ratio(0.35, step=10_000) == pytest.approx(2.8 * 0.35)
    # And it alerts when that crosses the edge, naming the trend.
    signals = run(early, range(301, 420), lr=lambda s: s / 1000)
    fired = [(a.kind, a.step) for v in signals.values() for a in v.alerts]
    first_plain = next(s for s in range(301, 1000) if 2.4 * s / 1000 >= 1.0)  # 417
    assert fired and fired[0][0] == PREDICTED and fired[0][1] < first_plain
    assert "rising trend" in signals[fired[0][1]].alerts[0].message


def test_far_from_the_edge_a_calibrated_cadence_skips_odd_multiples_and_banks_them():
    schedule = MeasurementSchedule(max_overhead=None, log_spaced=False)
    schedule.cadence = 10  # as calibration would fix it (every_n_steps stays None)
    measured, skipped = [], []
    for step in range(1, 61):
        decision = schedule.decide(step, sparse=True)
        skipped += [step] if decision.skipped else []
        if decision.measure:
            with schedule.timed(decision):
                measured.append((step, decision.tier))
    # The first (full) point is kept; track points at odd multiples are left out.
    assert measured == [(10, "full"), (20, "track"), (40, "track"), (60, "track")]
    assert skipped == [30, 50] and schedule.num_skipped == 2
    assert "2 skipped far from the edge" in schedule.summary()
    # An explicit cadence is a promise: nothing is skipped.
    promised = MeasurementSchedule(every_n_steps=10, max_overhead=None, log_spaced=False)
    assert not any(promised.decide(s, sparse=True).skipped for s in range(1, 61))
    # The early warning says "far" only well below the edge, and banks a skipped point.
    early = warning(Triggers())
    early.measured(0, 0.1, 0.1)
    assert early.far_from_edge(early.predicted_ratio(0.1), 10)
    assert not early.far_from_edge(early.predicted_ratio(0.3), 10)  # 0.3: not far
    early.budget.credit = 0.0
    early.saved_one()
    assert early.budget.affords_one()


def test_the_closest_look_starts_at_the_edge_rules_own_ratio():
    # n/8 from AlertRules.edge_ratio, whatever it is set to: at 0.85 with an edge at 0.8
    # the monitor looks every 64/8 = 8 steps; with the default edge (0.9), every 64/4 = 16.
    def first_look(rules: AlertRules) -> int:
        early = warning(Triggers(lr_change=None, loss_jump=None, trend=False, min_gap=4), rules)
        early.measured(0, 0.85, 0.1)
        return next(s for s in range(1, 100) if early.observe(s, 0.1, 1.0, cadence=64).trigger)

    assert first_look(AlertRules(edge_ratio=0.8)) == 8
    assert first_look(AlertRules()) == 16
