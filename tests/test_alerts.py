"""Alert rules on hand-made histories whose right answer is known."""

import pytest

from lightning_curvature.alerts import SPIKE, THRESHOLD, AlertRules, AlertTracker


def feed(tracker, values, ratio=None, converged=True, start=0):
    fired = []
    for offset, value in enumerate(values):
        fired += tracker.update(start + offset, value, ratio, converged)
    return fired


def test_a_spike_far_above_a_noisy_history_fires_once():
    tracker = AlertTracker()
    noisy = [10.0, 10.4, 9.8, 10.1, 9.9, 10.3, 10.0, 9.7]
    assert feed(tracker, noisy) == []
    fired = tracker.update(8, 25.0, None, True)
    assert [a.kind for a in fired] == [SPIKE]
    assert fired[0].step == 8 and fired[0].value == 25.0
    assert fired[0].reference == pytest.approx(10.0, abs=0.1)
    assert "2.50×" in fired[0].message


def test_ordinary_noise_and_slow_progressive_sharpening_do_not_fire():
    tracker = AlertTracker()
    rising = [10.0 * 1.02**i for i in range(60)]  # +2% per measurement
    assert feed(tracker, rising) == []
    wiggle = [10.0, 10.5, 9.5, 10.2, 9.8, 10.6, 9.4, 10.0, 10.7, 9.3]
    assert feed(AlertTracker(), wiggle) == []


def test_no_spike_during_warmup():
    tracker = AlertTracker(AlertRules(warmup=5))
    assert feed(tracker, [1.0, 1.0, 1.0, 1.0, 100.0]) == []
    assert [a.kind for a in tracker.update(5, 100.0, None, True)] != []  # after warm-up


def test_an_unconverged_estimate_never_fires_and_never_enters_history():
    tracker = AlertTracker()
    feed(tracker, [10.0] * 6)
    assert tracker.update(6, 1000.0, 5.0, converged=False) == []
    assert tracker.history == [10.0] * 6
    assert tracker.above_threshold_streak == 0


def test_threshold_crossing_fires_after_patience_then_rearms():
    tracker = AlertTracker(AlertRules(threshold_fraction=0.9, patience=3))
    ratios = [0.5, 0.95, 0.97, 0.99, 1.0, 1.01]
    fired = [tracker.update(i, 1.0, r, True) for i, r in enumerate(ratios)]
    kinds = [[a.kind for a in f] for f in fired]
    assert kinds == [[], [], [], [THRESHOLD], [], []]
    assert fired[3][0].value == 0.99
    # Dropping below re-arms; three more in a row fire again.
    assert tracker.update(6, 1.0, 0.5, True) == []
    again = [tracker.update(7 + i, 1.0, 0.92, True) for i in range(3)]
    assert [len(f) for f in again] == [0, 0, 1]


def test_a_single_excursion_above_the_threshold_does_not_fire():
    tracker = AlertTracker(AlertRules(patience=3))
    ratios = [0.95, 0.5, 0.95, 0.95, 0.2]
    assert [a for i, r in enumerate(ratios) for a in tracker.update(i, 1.0, r, True)] == []


def test_state_survives_a_round_trip_and_continues_the_streak():
    tracker = AlertTracker(AlertRules(patience=3))
    feed(tracker, [10.0, 10.2, 9.9, 10.1, 10.0, 9.8], ratio=0.95)
    tracker.update(6, 40.0, 0.95, True)
    state = tracker.state_dict()
    resumed = AlertTracker(AlertRules(patience=3))
    resumed.load_state_dict(state)
    assert resumed.history == tracker.history
    assert resumed.fired == tracker.fired
    assert resumed.above_threshold_streak == tracker.above_threshold_streak
    assert resumed.threshold_alert_active
    assert AlertTracker().load_state_dict({}) is None  # old checkpoints without the keys


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"window": 0}, "window"),
        ({"warmup": 30, "window": 20}, "warmup"),
        ({"num_mads": -1.0}, "num_mads"),
        ({"rtol": 0}, "rtol"),
        ({"threshold_fraction": "high"}, "threshold_fraction"),
        ({"patience": 1.5}, "patience"),
    ],
)
def test_bad_rules_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AlertRules(**kwargs)
