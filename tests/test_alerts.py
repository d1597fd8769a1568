"""Alert rules against independent truth: a real sharpening run whose λmax comes from the
dense float64 Hessian, a jump injected at a known step, and hand-made series whose right
answer follows from the rule's definition."""

import math

import numpy as np
import pytest
import torch

from lightning_curvature.monitor.alerts import EDGE, SPIKE, Alert, AlertRules, AlertTracker

# The default schedule's points over 1,500 steps: log-spaced below the cadence, then every 100.
SCHEDULED_STEPS = [1, 2, 4, 8, 16, 32, 64, *range(100, 1501, 100)]
JUMP_STEP = 750  # between the measurements at 700 and 800


def digits_regression():
    """100 digits projected to 6 inputs, MSE on 3 one-hot targets; a 6-10-10-3 tanh MLP as
    one flat float64 parameter vector, so its exact Hessian is one torch.func.hessian."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    generator = torch.Generator().manual_seed(0)
    projection = torch.randn(64, 6, generator=generator, dtype=torch.float64) / 8
    inputs = torch.tensor(images[:100] / 16.0) @ projection
    targets = torch.nn.functional.one_hot(torch.tensor(labels[:100]), 10)[:, :3].double()
    shapes = [(10, 6), (10,), (10, 10), (10,), (3, 10), (3,)]
    sizes = [math.prod(shape) for shape in shapes]

    def loss(theta):
        w1, b1, w2, b2, w3, b3 = (
            piece.view(shape) for piece, shape in zip(theta.split(sizes), shapes, strict=True)
        )
        hidden = torch.tanh(torch.tanh(inputs @ w1.T + b1) @ w2.T + b2)
        return ((hidden @ w3.T + b3 - targets) ** 2).sum(dim=1).mean()

    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 10), torch.nn.Linear(10, 10), torch.nn.Linear(10, 3)]
    theta = torch.cat([p.detach().double().reshape(-1) for m in layers for p in m.parameters()])
    last_layer_weight = slice(sum(sizes[:4]), sum(sizes[:5]))
    return loss, theta, last_layer_weight


def exact_lambda_max(loss, theta):
    hessian = torch.func.jacrev(torch.func.jacrev(loss))(theta)  # reverse over reverse
    return torch.linalg.eigvalsh(hessian)[-1].item()


LEARNING_RATE = 0.06


@pytest.fixture(scope="module")
def sharpening_runs():
    """λmax at the scheduled steps of full-batch GD (η = 0.06, 1,500 steps); of the same
    run with the last layer's weights doubled at step 750; and of it with η raised 5× at
    step 750 (both followed to step 1,100: four measurements after the change)."""
    loss, theta, last_layer_weight = digits_regression()

    def run(theta, first, last, change=None):
        series, branch = {}, None
        theta = theta.clone().requires_grad_()
        for step in range(first, last + 1):
            learning_rate = LEARNING_RATE * (5 if change == "lr" and step > JUMP_STEP else 1)
            (gradient,) = torch.autograd.grad(loss(theta), theta)
            with torch.no_grad():
                theta -= learning_rate * gradient
                if change == "scale" and step == JUMP_STEP:
                    theta[last_layer_weight] *= 2.0
            if step in SCHEDULED_STEPS:
                series[step] = exact_lambda_max(loss, theta.detach())
            if step == JUMP_STEP - 1:
                branch = theta.detach().clone()
        return series, branch

    smooth, at_branch = run(theta, 1, 1500)
    before = {s: v for s, v in smooth.items() if s < JUMP_STEP}
    jumped = before | run(at_branch, JUMP_STEP, 1100, "scale")[0]
    catapult = before | run(at_branch, JUMP_STEP, 1100, "lr")[0]
    return smooth, jumped, catapult


def feed(tracker, series, ratio=None):
    """Feed {step: λmax} in step order; return the alerts fired."""
    return [
        a
        for step, value in sorted(series.items())
        for a in tracker.update(step, value, ratio, True)
    ]


@pytest.mark.slow  # the shared fixture trains 1,850 steps and takes 26 Hessians
def test_progressive_sharpening_on_a_real_run_stays_quiet(sharpening_runs):
    smooth, _, _ = sharpening_runs
    values = list(smooth.values())
    # The run really sharpens (λmax triples), the early points are flat, and the rule that
    # compared with the median of the last 20 measurements fired six times on it.
    assert values[-1] > 3 * min(values)
    assert max(values[:7]) < 1.3 * min(values[:7])
    assert feed(AlertTracker(), smooth) == []


@pytest.mark.slow  # the shared fixture trains 1,850 steps and takes 26 Hessians
def test_a_layer_scaled_up_mid_run_fires_once_at_the_first_measurement_after(sharpening_runs):
    smooth, jumped, _ = sharpening_runs
    assert jumped[800] > 2 * smooth[800]  # the truth: a genuine jump between 700 and 800
    fired = feed(AlertTracker(), jumped)
    assert [(a.kind, a.step) for a in fired] == [(SPIKE, 800)]
    assert fired[0].value == jumped[800]
    assert fired[0].reference == max(jumped[s] for s in (500, 600, 700))


@pytest.mark.slow  # the shared fixture
def test_a_learning_rate_raised_into_a_catapult_trips_the_edge_rule_not_the_spike_rule(
    sharpening_runs,
):
    _, _, catapult = sharpening_runs
    # The truth: at 5η, λmax·η > 2, the loss catapults and λmax falls; no jump up to flag.
    assert catapult[700] * 5 * LEARNING_RATE > 2 and catapult[800] < 0.8 * catapult[700]
    # GD's stability ratio is λmax·η / 2, with the η in force at each step.
    ratios = {s: v * LEARNING_RATE * (5 if s > JUMP_STEP else 1) / 2 for s, v in catapult.items()}

    def fired(rules: AlertRules) -> list[tuple[str, int]]:
        tracker = AlertTracker(rules)
        alerts = [
            a for s in sorted(catapult) for a in tracker.update(s, catapult[s], ratios[s], True)
        ]
        return [(a.kind, a.step) for a in alerts]

    # At the edge from 800 on; never before, at η.
    assert all(r < 0.9 for s, r in ratios.items() if s < JUMP_STEP)
    assert all(ratios[s] >= 0.9 for s in (800, 900, 1000))
    # Patience in steps: two measurements 100 steps apart (>= 50) are enough ...
    assert fired(AlertRules()) == [(EDGE, 900)]
    # ... and with patience in measurements only (800, 900, 1000), the third.
    assert fired(AlertRules(edge_patience_steps=10**6)) == [(EDGE, 1000)]


def test_one_jump_and_its_slow_fall_fire_once():
    # The sequence that fired at every measurement while λmax fell, under the old rule.
    falling = [18.8, 18.3, 17.6, 16.9, 15.8, 14.1, 12.0, 10.2, 9.1, 8.0, 7.4, 7.1]
    series = [7.0, 7.1, 6.9, 7.0, 7.2, 7.0, 43.4, *falling]
    steps = range(100, 100 * (len(series) + 1), 100)
    fired = feed(AlertTracker(), dict(zip(steps, series, strict=True)))
    assert [(a.step, a.value) for a in fired] == [(700, 43.4)]
    assert fired[0].reference == 7.2  # the highest of the three before it
    assert "6.03×" in fired[0].message


def test_smooth_sharpening_on_the_default_schedule_stays_quiet():
    # λmax rising smoothly 2.2 -> 9.0 over 1,500 steps: the old rule fired at every
    # measurement from step 900 on, the flat log-spaced points pinning its reference.
    series = {s: 2.2 + 6.8 * (s / 1500) ** 2 for s in SCHEDULED_STEPS}
    assert feed(AlertTracker(), series) == []


def test_the_rule_rearms_only_after_sharpness_is_no_longer_far_above_its_level():
    rules = AlertRules(spike_warmup_steps=0)
    # Still climbing after the jump (40, then 100): one jump, one alert.
    climbing = [10.0] * 5 + [40.0, 100.0, 95.0]
    assert len(feed(AlertTracker(rules), dict(enumerate(climbing)))) == 1
    # Back down to its level, then a second jump: two alerts.
    twice = [10.0] * 5 + [40.0, 11.0, 10.0, 10.0, 10.0, 40.0]
    assert [a.step for a in feed(AlertTracker(rules), dict(enumerate(twice)))] == [5, 10]
    # A new level that holds re-arms too: a jump from it is a jump again.
    shifted = [10.0] * 5 + [40.0, 41.0, 40.0, 42.0, 100.0]
    assert [a.step for a in feed(AlertTracker(rules), dict(enumerate(shifted)))] == [5, 9]


def test_a_dip_and_its_recovery_or_a_fall_do_not_fire():
    rules = AlertRules(spike_warmup_steps=0)
    dip = [10.0] * 5 + [3.0, 10.0, 9.0, 2.0, 1.0, 1.5]
    assert feed(AlertTracker(rules), dict(enumerate(dip))) == []


def test_a_jump_far_below_the_edge_of_stability_does_not_alert():
    # The CNN near convergence: λmax 0.0037 -> 0.0149 (4.08×) at a stability ratio of
    # 4.9e-5. A jump from nothing to almost nothing is no risk to training.
    rules = AlertRules(spike_warmup_steps=0)
    series = dict(enumerate([0.00366] * 5 + [0.01493]))
    assert feed(AlertTracker(rules), series, ratio=4.9e-5) == []
    # The same jump where it matters alerts, once, and says how far the edge is.
    (alert,) = feed(AlertTracker(rules), series, ratio=0.45)
    assert alert.step == 5 and "stability ratio is now 0.45 (1 is the edge" in alert.message
    # Just above and just below spike_min_ratio.
    assert len(feed(AlertTracker(rules), series, ratio=rules.spike_min_ratio)) == 1
    assert feed(AlertTracker(rules), series, ratio=0.99 * rules.spike_min_ratio) == []
    # Without a trusted ratio the jump alone decides, and the message says so.
    (alert,) = feed(AlertTracker(rules), series, ratio=None)
    assert "relative jump only" in alert.message
    # spike_min_ratio=0: every jump alerts, as before.
    everywhere = AlertRules(spike_warmup_steps=0, spike_min_ratio=0.0)
    assert len(feed(AlertTracker(everywhere), series, ratio=4.9e-5)) == 1


def test_warmup_counts_measurements_and_steps():
    rules = AlertRules(spike_warmup_measurements=4, spike_warmup_steps=100)
    # Four measurements before the jump, but at step 80: too early.
    early = {10: 5.0, 20: 5.0, 40: 5.0, 60: 5.0, 80: 50.0}
    assert feed(AlertTracker(rules), early) == []
    # Step 200, but only three measurements before it: too few.
    few = {100: 5.0, 150: 5.0, 180: 5.0, 200: 50.0}
    assert feed(AlertTracker(rules), few) == []
    # Both met: it fires.
    both = {100: 5.0, 120: 5.0, 140: 5.0, 160: 5.0, 200: 50.0}
    assert [a.step for a in feed(AlertTracker(rules), both)] == [200]


def test_an_unconverged_estimate_never_fires_and_leaves_the_state_as_it_was():
    tracker = AlertTracker(AlertRules(spike_warmup_steps=0, edge_patience=2))
    feed(tracker, {s: 10.0 for s in range(6)}, ratio=0.95)
    before = tracker.state_dict()
    assert tracker.update(6, 1000.0, 5.0, converged=False) == []
    assert tracker.update(7, math.nan, 5.0, converged=True) == []
    assert tracker.state_dict() == before
    # A converged 1000 right after is judged against the converged history: a spike.
    assert [a.kind for a in tracker.update(8, 1000.0, 0.5, True)] == [SPIKE]


def test_edge_of_stability_fires_after_patience_then_rearms():
    tracker = AlertTracker(AlertRules(edge_ratio=0.9, edge_patience=3))
    ratios = [0.5, 0.95, 0.97, 0.99, 1.0, 1.01]
    fired = [tracker.update(i, 1.0, r, True) for i, r in enumerate(ratios)]
    assert [[a.kind for a in f] for f in fired] == [[], [], [], [EDGE], [], []]
    assert fired[3][0].value == 0.99 and fired[3][0].reference == 0.9
    # Dropping below re-arms; three more in a row fire again.
    assert tracker.update(6, 1.0, 0.5, True) == []
    again = [tracker.update(7 + i, 1.0, 0.92, True) for i in range(3)]
    assert [len(f) for f in again] == [0, 0, 1]


def test_a_single_excursion_above_the_edge_does_not_fire():
    tracker = AlertTracker(AlertRules(edge_patience=3))
    ratios = [0.95, 0.5, 0.95, 0.95, 0.2]
    assert [a for i, r in enumerate(ratios) for a in tracker.update(i, 1.0, r, True)] == []


@pytest.mark.slow  # the shared fixture trains 1,850 steps and takes 26 Hessians
def test_a_resumed_tracker_fires_exactly_as_an_uninterrupted_one(sharpening_runs):
    _, jumped, _ = sharpening_runs
    ratio = {s: min(1.0, s / 1000) for s in jumped}  # crosses edge_ratio=0.9 at 900
    steps = sorted(jumped)

    def run(tracker, part):
        return [a for s in part for a in tracker.update(s, jumped[s], ratio[s], True)]

    whole = run(AlertTracker(), steps)
    # The edge streak starts at 900; two measurements 100 >= edge_patience_steps apart.
    assert [(a.kind, a.step) for a in whole] == [(SPIKE, 800), (EDGE, 1000)]
    first = AlertTracker()
    cut = steps.index(1000)  # in the middle of the edge streak: its start must survive
    before = run(first, steps[:cut])
    resumed = AlertTracker()
    resumed.load_state_dict(first.state_dict())
    assert before + run(resumed, steps[cut:]) == whole
    assert resumed.fired == whole


def test_an_old_checkpoint_loads_and_continues_its_streak():
    old = {
        "history": [10.0] * 20,
        "above_threshold_streak": 2,
        "threshold_alert_active": False,
        "fired": [
            {
                "kind": "stability_threshold",
                "step": 3,
                "value": 0.95,
                "reference": 0.9,
                "message": "m",
            }
        ],
    }
    tracker = AlertTracker()
    tracker.load_state_dict(old)
    assert tracker.fired == [Alert(EDGE, 3, 0.95, 0.9, "m")]
    # The third ratio in a row at the edge fires (patience 3); the 20 old measurements
    # count for the warm-up, so a jump fires too.
    assert sorted(a.kind for a in tracker.update(200, 50.0, 0.95, True)) == [EDGE, SPIKE]
    empty = AlertTracker()
    empty.load_state_dict({})
    assert empty.state_dict() == AlertTracker().state_dict()


def test_the_summary_lists_alerts_by_kind():
    tracker = AlertTracker(AlertRules(spike_warmup_steps=0, edge_patience=1))
    assert tracker.summary() == "Alerts: none fired."
    feed(tracker, {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 9.0}, ratio=0.95)
    assert (
        tracker.summary() == "Alerts: 1 sharpness spike (steps 6); 1 edge of stability (steps 1)."
    )


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("spike_factor", 1.0, "a number > 1"),
        ("spike_factor", "2", "a number > 1"),
        ("spike_factor", math.nan, "a number > 1"),
        ("spike_window", 0, "an integer >= 1"),
        ("spike_window", True, "an integer >= 1"),
        ("spike_warmup_measurements", 0, "an integer >= 1"),
        ("spike_warmup_steps", -1, "an integer >= 0"),
        ("spike_warmup_steps", 2.5, "an integer >= 0"),
        ("spike_min_ratio", -0.1, "a number >= 0"),
        ("spike_min_ratio", math.inf, "a number >= 0"),
        ("edge_ratio", 0, "a number > 0"),
        ("edge_ratio", "high", "a number > 0"),
        ("edge_patience", 1.5, "an integer >= 1"),
    ],
)
def test_bad_rules_name_the_argument_its_value_and_what_is_allowed(name, value, allowed):
    with pytest.raises(ValueError, match=f"^{name} must be {allowed}, got {value!r}$"):
        AlertRules(**{name: value})


def test_numpy_numbers_are_accepted():
    rules = AlertRules(
        spike_factor=np.float32(3.0), spike_window=np.int64(4), edge_patience=np.int8(2)
    )
    assert (rules.spike_factor, rules.spike_window, rules.edge_patience) == (3.0, 4, 2)
    assert type(rules.spike_window) is int


def test_steady_sharpening_seen_sparsely_is_no_spike_but_a_jump_still_is():
    # Adam's λmax rose about 2.4× between sparse measurements on the benchmark's controls:
    # steady sharpening, seen sparsely. Over the 384 steps from 128 to 512 (1.5 ×
    # spike_gap_steps) the factor 2 compounds to 2^1.5 = 2.83: no alert. A 6× rise over
    # the same gap still fires.
    steps = [1, 2, 4, 8, 16, 32, 64, 128, 512]
    sharpening = dict(zip(steps, [10.0] * 8 + [24.0], strict=True))
    assert feed(AlertTracker(AlertRules(spike_warmup_steps=0)), sharpening) == []
    jump = dict(zip(steps, [10.0] * 8 + [60.0], strict=True))
    assert [a.step for a in feed(AlertTracker(AlertRules(spike_warmup_steps=0)), jump)] == [512]
