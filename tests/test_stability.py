"""Stability thresholds, checked by running the real torch optimizers on quadratics.

For every rule the optimizer is run on f(x) = ½ xᵀHx with sharpness·η at 0.95× and 1.05× the
threshold that :func:`stability_rule` reports: just below, |x| must shrink by a large
factor; just above, it must grow by one. The thresholds are also compared with values worked
out by hand, and the adaptive optimizers' sharpness λmax(P⁻¹H) is computed from
:func:`preconditioner_diagonal`, so a wrong formula for P fails these tests too.
"""

import math

import pytest
import torch

from lightning_curvature.optim.preconditioners import preconditioner_diagonal
from lightning_curvature.optim.stability import (
    StabilityRule,
    adaptive_threshold,
    sgd_threshold,
    stability_ratio,
    stability_rule,
)
from tests.truth import adam_preconditioner, matrix_with_spectrum, preconditioned_lambda_max

STEPS = 400
LARGE = 1e4  # "a large factor": |x| shrinks below 1/LARGE or grows above LARGE
X0 = 1e-9  # tiny start: even diverged, g² stays negligible against the frozen P (see below)


def growth(optimizer, x, hessian, steps=STEPS):
    """Run the optimizer on ½ xᵀHx and return |x_end| / |x_0| (stopping once past 10·LARGE)."""
    start = x.detach().norm().item()
    ratio = 1.0
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * x @ hessian @ x).backward()
        optimizer.step()
        ratio = x.detach().norm().item() / start
        if ratio > 10 * LARGE:
            break
    return ratio


def new_param(n):
    return torch.nn.Parameter(torch.full((n,), X0, dtype=torch.float64))


# --------------------------------------------------------------------------- SGD family
SGD_CASES = {
    # name: (SGD kwargs, the threshold worked out by hand)
    "plain": ({}, 2.0),
    "heavy ball 0.5": ({"momentum": 0.5}, 3.0),
    "heavy ball 0.9": ({"momentum": 0.9}, 3.8),
    "nesterov 0.5": ({"momentum": 0.5, "nesterov": True}, 1.5),
    "nesterov 0.9": ({"momentum": 0.9, "nesterov": True}, 3.8 / 2.8),
    "dampening 0.5": ({"momentum": 0.9, "dampening": 0.5}, 7.6),
    "dampening 0.3": ({"momentum": 0.6, "dampening": 0.3}, 3.2 / 0.7),
}


@pytest.mark.parametrize("case", SGD_CASES)
def test_sgd_converges_just_below_its_threshold_and_diverges_just_above(case):
    kwargs, expected = SGD_CASES[case]
    hessian = matrix_with_spectrum(torch.tensor([10.0, 6.0, 3.0, 1.0]))
    sharpness = torch.linalg.eigvalsh(hessian)[-1].item()
    factors = {}
    for fraction in (0.95, 1.05):
        x = new_param(4)
        optimizer = torch.optim.SGD([x], lr=1.0, **kwargs)
        rule = stability_rule(optimizer)
        assert rule.threshold == pytest.approx(expected, rel=1e-12)
        assert rule.known and not rule.preconditioned
        optimizer.param_groups[0]["lr"] = fraction * rule.threshold / sharpness
        assert stability_ratio(sharpness, stability_rule(optimizer)) == pytest.approx(fraction)
        factors[fraction] = growth(optimizer, x, hessian)
    assert factors[0.95] < 1 / LARGE, factors
    assert factors[1.05] > LARGE, factors


def test_the_heavy_ball_threshold_is_wrong_for_nesterov():
    """The test above can fail: at 0.95·2(1+β), Nesterov with β = 0.9 already diverges."""
    hessian = matrix_with_spectrum(torch.tensor([10.0, 6.0, 3.0, 1.0]))
    x = new_param(4)
    lr = 0.95 * 2 * 1.9 / 10.0
    optimizer = torch.optim.SGD([x], lr=lr, momentum=0.9, nesterov=True)
    assert growth(optimizer, x, hessian) > LARGE


@pytest.mark.parametrize(
    ("momentum", "nesterov", "dampening"),
    [(0.0, False, 0.0), (0.3, False, 0.0), (0.9, False, 0.7), (0.5, True, 0.0), (0.8, True, 0.4)],
)
def test_sgd_threshold_is_where_the_iteration_matrix_reaches_spectral_radius_one(
    momentum, nesterov, dampening
):
    """Independent truth for the formulas, including Nesterov with dampening (torch refuses
    to run that, so only the linear algebra checks it): x ← x − η(g + βb) or x ← x − ηb,
    b ← βb + (1−d)g, on a quadratic of curvature λ with a = λη."""

    def radius(a):
        c = 1.0 - dampening
        if momentum == 0.0:
            matrix = torch.tensor([[1.0 - a]], dtype=torch.float64)
        elif nesterov:  # state (x, ηb)
            matrix = torch.tensor(
                [[1 - a * (1 + momentum * c), -(momentum**2)], [c * a, momentum]],
                dtype=torch.float64,
            )
        else:
            matrix = torch.tensor([[1 - c * a, -momentum], [c * a, momentum]], dtype=torch.float64)
        return torch.linalg.eigvals(matrix).abs().max().item()

    threshold = sgd_threshold(momentum, nesterov, dampening)
    assert radius(0.999 * threshold) < 1.0 < radius(1.001 * threshold)


# --------------------------------------------------------------------------- adaptive
# To test the threshold on λmax(P⁻¹H)·η the preconditioner P must stay fixed while the
# iteration runs. The state is pre-populated with the second moment we choose and
# β2 (or RMSprop's α) = 1 − 1e-7, with a step count of 1e9 so that both bias corrections are 1
# (β1^1e9 = 0, β2^1e9 = e^-100). Over the 400 steps the second moment then decays by
# β2^400 = 1 − 4e-5 (P by 2e-5), and the g² it takes in is ≤ 1e-7·(10·1e-4)² ≈ 1e-13 since
# |x| ≤ X0·10·LARGE = 1e-4 (RMSprop's grad_avg likewise): P drifts by less than 1e-4
# relative. Adagrad's Σg² has no decay, but it gains at most 400·(1e-3)² = 4e-4 against a sum
# ≥ 0.25, so its P drifts by < 1e-3. Both are far inside the ±5% margin, and each run checks
# its drift. The float32 step 1e9 + 1 rounds back to 1e9, so torch's t stays where we put it.
FROZEN = 1 - 1e-7
BIG_STEP = 1e9
N = 4
HESSIAN = matrix_with_spectrum(torch.tensor([10.0, 6.0, 3.0, 1.0]), seed=1)
V = torch.tensor([4.0, 0.25, 1.0, 9.0], dtype=torch.float64)  # the frozen second moment


def make_adam(x, cls=torch.optim.Adam, beta1=0.9, eps=0.1, amsgrad=False, weight_decay=0.0):
    optimizer = cls(
        [x], lr=1.0, betas=(beta1, FROZEN), eps=eps, amsgrad=amsgrad, weight_decay=weight_decay
    )
    state = {
        "step": torch.tensor(BIG_STEP),
        "exp_avg": torch.zeros_like(x),
        "exp_avg_sq": V.clone() / 4 if amsgrad else V.clone(),
    }
    if amsgrad:
        state["max_exp_avg_sq"] = V.clone()
    optimizer.state[x] = state
    return optimizer


def make_rmsprop(x, momentum=0.0, centered=False, eps=0.1):
    optimizer = torch.optim.RMSprop(
        [x], lr=1.0, alpha=FROZEN, eps=eps, momentum=momentum, centered=centered
    )
    state = {"step": torch.tensor(BIG_STEP), "square_avg": V.clone()}
    if momentum:
        state["momentum_buffer"] = torch.zeros_like(x)
    if centered:
        state["grad_avg"] = 0.5 * V.sqrt()  # square_avg − grad_avg² = 0.75·V
    optimizer.state[x] = state
    return optimizer


def make_adagrad(x, lr_decay=0.0, eps=0.1):
    optimizer = torch.optim.Adagrad([x], lr=1.0, lr_decay=lr_decay, eps=eps)
    optimizer.state[x]["step"] = torch.tensor(BIG_STEP)
    optimizer.state[x]["sum"] = V.clone()
    return optimizer


ADAPTIVE_CASES = {
    # name: (factory, threshold by hand, P by hand)
    "Adam β1=0.9": (make_adam, 38.0, V.sqrt() + 0.1),
    "Adam β1=0.5": (lambda x: make_adam(x, beta1=0.5), 6.0, V.sqrt() + 0.1),
    "Adam β1=0 eps=1e-8": (lambda x: make_adam(x, beta1=0.0, eps=1e-8), 2.0, V.sqrt()),
    "Adam amsgrad": (lambda x: make_adam(x, amsgrad=True), 38.0, V.sqrt() + 0.1),
    # AdamW's decoupled decay x ← (1 − η·wd)·x is a contraction that moves the edge; it is
    # 0 here (the update test below checks AdamW with decay).
    "AdamW": (lambda x: make_adam(x, cls=torch.optim.AdamW), 38.0, V.sqrt() + 0.1),
    "RMSprop": (make_rmsprop, 2.0, V.sqrt() + 0.1),
    "RMSprop momentum 0.9": (lambda x: make_rmsprop(x, momentum=0.9), 3.8, V.sqrt() + 0.1),
    "RMSprop centered": (lambda x: make_rmsprop(x, centered=True), 2.0, (0.75 * V).sqrt() + 0.1),
    "Adagrad": (make_adagrad, 2.0, V.sqrt() + 0.1),
    # t = 1e9 and lr_decay = 1e-8: torch's step is lr/(1 + (t−1)·1e-8) ≈ lr/11.
    "Adagrad lr_decay": (
        lambda x: make_adagrad(x, lr_decay=1e-8),
        2.0,
        (1 + (BIG_STEP - 1) * 1e-8) * (V.sqrt() + 0.1),
    ),
}


@pytest.mark.parametrize("case", ADAPTIVE_CASES)
def test_adaptive_optimizer_converges_just_below_its_preconditioned_threshold_and_diverges_above(
    case,
):
    factory, expected_threshold, expected_p = ADAPTIVE_CASES[case]
    factors = {}
    for fraction in (0.95, 1.05):
        x = new_param(N)
        optimizer = factory(x)
        rule = stability_rule(optimizer)
        assert rule.known and rule.preconditioned
        assert rule.threshold == pytest.approx(expected_threshold, rel=1e-12)
        p = preconditioner_diagonal(optimizer, [x])
        assert p.dtype == torch.float32 and p.shape == (N,)
        torch.testing.assert_close(p.double(), expected_p, rtol=1e-6, atol=0)
        sharpness = preconditioned_lambda_max(HESSIAN, p)
        optimizer.param_groups[0]["lr"] = fraction * rule.threshold / sharpness
        factors[fraction] = growth(optimizer, x, HESSIAN)
        drift = (preconditioner_diagonal(optimizer, [x]).double() / p.double() - 1).abs().max()
        assert drift < 1e-3  # P was (nearly) frozen, as the comment above says
    assert factors[0.95] < 1 / LARGE, factors
    assert factors[1.05] > LARGE, factors


def test_adam_converges_where_raw_lambda_max_times_lr_is_far_past_38():
    """The sharpness Adam feels is λmax(P⁻¹H), not λmax(H)."""
    x = new_param(N)
    optimizer = make_adam(x)
    scaled = preconditioned_lambda_max(HESSIAN, preconditioner_diagonal(optimizer, [x]))
    lr = optimizer.param_groups[0]["lr"] = 0.95 * 38.0 / scaled
    assert 10.0 * lr > 1.3 * 38.0  # λmax(H) = 10
    assert growth(optimizer, x, HESSIAN) < 1 / LARGE


# --------------------------------------------------------------------------- P is the
# preconditioner of the optimizer's last update: after real steps from a natural state (small
# t, where the bias corrections and lr_decay matter), that update must be −η·P⁻¹·u.
GRADS = [
    torch.tensor(g, dtype=torch.float64)
    for g in ([1.0, -2.0, 0.5], [0.3, 1.0, -4.0], [-0.2, 0.1, 3.0])
]
LR = 0.05


def stepped(cls, kwargs, grads=GRADS):
    """An optimizer after len(grads) real steps; returns it, x and x before the last step."""
    x = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    optimizer = cls([x], lr=LR, **kwargs)
    before = None
    for g in grads:
        before = x.detach().clone()
        x.grad = g.clone()
        optimizer.step()
    return optimizer, x, before


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (torch.optim.Adam, {"betas": (0.8, 0.9), "eps": 0.01}),
        (torch.optim.Adam, {"amsgrad": True, "eps": 0.01}),
        (torch.optim.AdamW, {"weight_decay": 0.1, "eps": 0.01}),
        (torch.optim.RMSprop, {"eps": 0.01}),
        (torch.optim.RMSprop, {"centered": True, "eps": 0.01}),
        (torch.optim.Adagrad, {"lr_decay": 0.3, "eps": 0.01, "initial_accumulator_value": 0.5}),
    ],
)
def test_the_preconditioner_is_what_the_optimizers_last_update_divided_by(cls, kwargs):
    optimizer, x, before = stepped(cls, kwargs)
    p = preconditioner_diagonal(optimizer, [x]).double()
    update = x.detach() - before
    if cls is torch.optim.AdamW:  # decoupled decay first: x ← (1 − η·wd)·x
        update = update + LR * kwargs["weight_decay"] * before
    if cls in (torch.optim.Adam, torch.optim.AdamW):
        direction = optimizer.state[x]["exp_avg"]
    else:
        direction = GRADS[-1]
    torch.testing.assert_close(update, -LR * direction / p, rtol=1e-5, atol=0)


def test_rmsprop_momentum_buffer_accumulates_gradients_divided_by_the_preconditioner():
    kwargs = {"momentum": 0.7, "centered": True, "eps": 0.01}
    optimizer, x, before = stepped(torch.optim.RMSprop, kwargs)
    previous, _, _ = stepped(torch.optim.RMSprop, kwargs, GRADS[:-1])
    buffer = optimizer.state[x]["momentum_buffer"]
    (y,) = previous.param_groups[0]["params"]
    p = preconditioner_diagonal(optimizer, [x]).double()
    torch.testing.assert_close(x.detach() - before, -LR * buffer, rtol=1e-12, atol=0)
    # buf_t = μ·buf_{t−1} + g_t/P_t: heavy ball with momentum μ on P⁻¹H, hence 2(1+μ)
    torch.testing.assert_close(
        buffer - 0.7 * previous.state[y]["momentum_buffer"], GRADS[-1] / p, rtol=1e-5, atol=0
    )


# --------------------------------------------------------------------------- P by hand
def adam_by_hand(grads, beta1, beta2, eps, amsgrad):
    v = [0.0] * 3
    v_max = [0.0] * 3
    for g in grads:
        v = [beta2 * vi + (1 - beta2) * gi**2 for vi, gi in zip(v, g.tolist(), strict=True)]
        v_max = [max(a, b) for a, b in zip(v_max, v, strict=True)]
    second = torch.tensor(v_max if amsgrad else v, dtype=torch.float64)
    return adam_preconditioner(second, len(grads), beta1, beta2, eps).tolist()


def rmsprop_by_hand(grads, alpha, eps):  # centered
    square, mean = [0.0] * 3, [0.0] * 3
    for g in grads:
        square = [alpha * s + (1 - alpha) * gi**2 for s, gi in zip(square, g.tolist(), strict=True)]
        mean = [alpha * m + (1 - alpha) * gi for m, gi in zip(mean, g.tolist(), strict=True)]
    return [math.sqrt(s - m**2) + eps for s, m in zip(square, mean, strict=True)]


def adagrad_by_hand(grads, lr_decay, eps, initial):
    total = [initial + sum(g[i].item() ** 2 for g in grads) for i in range(3)]
    return [(1 + (len(grads) - 1) * lr_decay) * (math.sqrt(s) + eps) for s in total]


@pytest.mark.parametrize(
    ("cls", "kwargs", "by_hand"),
    [
        (
            torch.optim.Adam,
            {"betas": (0.8, 0.9), "eps": 0.01},
            adam_by_hand(GRADS, 0.8, 0.9, 0.01, amsgrad=False),
        ),
        (
            torch.optim.AdamW,
            {"betas": (0.7, 0.95), "eps": 0.03, "amsgrad": True},
            adam_by_hand(GRADS, 0.7, 0.95, 0.03, amsgrad=True),
        ),
        (
            torch.optim.RMSprop,
            {"alpha": 0.9, "eps": 0.02, "centered": True},
            rmsprop_by_hand(GRADS, 0.9, 0.02),
        ),
        (
            torch.optim.Adagrad,
            {"lr_decay": 0.3, "eps": 0.01, "initial_accumulator_value": 0.5},
            adagrad_by_hand(GRADS, 0.3, 0.01, 0.5),
        ),
    ],
)
def test_preconditioner_diagonal_matches_a_hand_computation(cls, kwargs, by_hand):
    optimizer, x, _ = stepped(cls, kwargs)
    p = preconditioner_diagonal(optimizer, [x])
    expected = torch.tensor(by_hand, dtype=torch.float32)
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=0)
    optimizer.state[x]["step"] = float(optimizer.state[x]["step"])  # old checkpoints: a float
    torch.testing.assert_close(preconditioner_diagonal(optimizer, [x]), expected)


def test_each_parameter_uses_its_own_group_and_the_result_follows_the_order_of_params():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam(
        [{"params": [a]}, {"params": [b], "betas": (0.5, 0.99), "eps": 0.25}],
        lr=0.1,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    a.grad, b.grad = torch.full((2,), 2.0), torch.full((3,), 3.0)
    optimizer.step()  # t = 1: v̂ = g², P = (1 − β1)(|g| + ε)
    p = preconditioner_diagonal(optimizer, [b, a])
    expected = [0.5 * (3.0 + 0.25)] * 3 + [0.1 * (2.0 + 1e-8)] * 2
    torch.testing.assert_close(p, torch.tensor(expected), rtol=1e-6, atol=0)
    # A group with twice the lr moves as if its P were halved: λmax(P⁻¹H)·η_ref stays the
    # sharpness·lr that every update feels.
    optimizer.param_groups[1]["lr"] = 0.2
    torch.testing.assert_close(
        preconditioner_diagonal(optimizer, [b, a]),
        torch.tensor([0.5 * 3.25 / 2] * 3 + [0.1 * (2.0 + 1e-8)] * 2),
    )
    assert preconditioner_diagonal(optimizer, [b], param_group=1)[0].item() == pytest.approx(
        0.5 * 3.25
    )


def test_preconditioner_diagonal_is_none_before_the_first_step_and_for_sgd_like_optimizers():
    x = torch.nn.Parameter(torch.ones(3))
    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad):
        optimizer = cls([x], lr=0.1)
        states_before = len(optimizer.state)  # Adagrad creates its state at construction
        assert preconditioner_diagonal(optimizer, [x]) is None
        assert len(optimizer.state) == states_before  # no state was created by reading
    for cls in (torch.optim.SGD, torch.optim.Adadelta):
        optimizer = cls([x], lr=0.1)
        x.grad = torch.ones(3)
        optimizer.step()
        assert preconditioner_diagonal(optimizer, [x]) is None


def snapshot(optimizer):
    return {
        (id(p), key): (value, value.clone(), value._version, value.data_ptr())
        for p, state in optimizer.state.items()
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (torch.optim.Adam, {"amsgrad": True}),
        (torch.optim.AdamW, {}),
        (torch.optim.RMSprop, {"momentum": 0.5, "centered": True}),
        (torch.optim.Adagrad, {"lr_decay": 0.1}),
        (torch.optim.SGD, {"momentum": 0.9}),
    ],
)
def test_reading_leaves_the_optimizer_state_bit_identical(cls, kwargs):
    optimizer, x, _ = stepped(cls, kwargs)
    groups_before = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    before = snapshot(optimizer)
    stability_rule(optimizer)
    p = preconditioner_diagonal(optimizer, [x])
    if p is not None:
        p.mul_(0.0)  # the result is the caller's own: it shares no memory with the state
    after = snapshot(optimizer)
    assert before.keys() == after.keys()
    for key, (tensor, copy, version, pointer) in before.items():
        now = after[key][0]
        assert now is tensor and now._version == version and now.data_ptr() == pointer, key
        assert now.dtype == copy.dtype and torch.equal(now, copy), key
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == (
        groups_before
    )


# --------------------------------------------------------------------------- reading rules
RULE_CASES = [
    # (constructor, optimizer name, threshold, preconditioned, text in the note)
    (lambda p: torch.optim.SGD(p, lr=0.1), "SGD", 2.0, False, "SGD: λmax·η < 2"),
    (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "SGD(momentum=0.9)",
        3.8,
        False,
        "λmax·η < 2(1+β) = 3.8",
    ),
    (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        "SGD(nesterov, momentum=0.9)",
        3.8 / 2.8,
        False,
        "2(1+β)/(1+2β) = 1.357",
    ),
    (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5),
        "SGD(momentum=0.9, dampening=0.5)",
        7.6,
        False,
        "2(1+β)/(1−d) = 7.6",
    ),
    (
        lambda p: torch.optim.Adam(p, lr=0.1),
        "Adam",
        38.0,
        True,
        "Adam: λmax(P⁻¹H)·η < 2(1+β1)/(1−β1) = 38",
    ),
    (lambda p: torch.optim.Adam(p, lr=0.1, betas=(0.5, 0.99)), "Adam", 6.0, True, "= 6"),
    (lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True), "Adam(amsgrad)", 38.0, True, "38"),
    (lambda p: torch.optim.AdamW(p, lr=0.1, betas=(0.8, 0.9)), "AdamW", 18.0, True, "= 18"),
    (lambda p: torch.optim.RMSprop(p, lr=0.1), "RMSprop", 2.0, True, "λmax(P⁻¹H)·η < 2"),
    (
        lambda p: torch.optim.RMSprop(p, lr=0.1, momentum=0.5, centered=True),
        "RMSprop(centered, momentum=0.5)",
        3.0,
        True,
        "2(1+μ) = 3",
    ),
    (lambda p: torch.optim.Adagrad(p, lr=0.1), "Adagrad", 2.0, True, "Adagrad: λmax(P⁻¹H)·η < 2"),
]


@pytest.mark.parametrize(("make", "name", "threshold", "preconditioned", "note"), RULE_CASES)
def test_stability_rule_reads_each_optimizers_own_hyper_parameters(
    make, name, threshold, preconditioned, note
):
    rule = stability_rule(make([torch.nn.Parameter(torch.ones(2))]))
    assert rule == StabilityRule(
        optimizer=name,
        threshold=pytest.approx(threshold, rel=1e-12),
        learning_rate=pytest.approx(0.1),
        preconditioned=preconditioned,
        known=True,
        note=rule.note,
    )
    assert note in rule.note


def test_stability_rule_reads_the_param_group_it_is_asked_for_and_tensor_learning_rates():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD(
        [{"params": [a]}, {"params": [b], "lr": 0.5, "momentum": 0.5, "nesterov": True}], lr=0.1
    )
    first, second = stability_rule(optimizer), stability_rule(optimizer, param_group=1)
    assert (first.threshold, first.learning_rate) == (2.0, 0.1)
    assert second.threshold == pytest.approx(1.5) and second.learning_rate == 0.5
    rule = stability_rule(torch.optim.Adam([a], lr=torch.tensor(0.003)))
    assert isinstance(rule.learning_rate, float) and rule.learning_rate == pytest.approx(0.003)


def test_an_unknown_optimizer_gets_the_plain_sgd_rule_marked_not_known():
    class Homemade(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.2})

    x = torch.nn.Parameter(torch.ones(2))
    for optimizer, name in [
        (torch.optim.Adadelta([x], lr=0.2), "Adadelta"),
        (torch.optim.NAdam([x], lr=0.2), "NAdam"),
        (Homemade([x]), "Homemade"),
    ]:
        rule = stability_rule(optimizer)
        assert (rule.optimizer, rule.threshold, rule.known, rule.preconditioned) == (
            name,
            2.0,
            False,
            False,
        )
        assert rule.learning_rate == pytest.approx(0.2)
        assert name in rule.note and "plain-SGD" in rule.note


def test_subclasses_and_lightning_style_wrappers_are_read_as_the_optimizer_inside():
    class MyAdam(torch.optim.Adam):
        pass

    class Wrapper:  # what Lightning's LightningOptimizer does to look like its optimizer
        def __init__(self, optimizer):
            self._optimizer = optimizer
            self.__class__ = type(
                "Lightning" + type(optimizer).__name__, (Wrapper, type(optimizer)), {}
            )

    x = torch.nn.Parameter(torch.ones(2))
    inner = MyAdam([x], lr=0.1, betas=(0.5, 0.9))
    x.grad = torch.ones(2)
    inner.step()
    wrapped = Wrapper(inner)
    assert stability_rule(inner).threshold == stability_rule(wrapped).threshold == 6.0
    assert stability_rule(wrapped).known
    torch.testing.assert_close(
        preconditioner_diagonal(wrapped, [x]), preconditioner_diagonal(inner, [x])
    )


def test_stability_ratio_is_sharpness_times_lr_over_the_threshold():
    rule = stability_rule(torch.optim.Adam([torch.nn.Parameter(torch.ones(1))], lr=2.0))
    assert stability_ratio(19.0, rule) == pytest.approx(1.0)
    rule = stability_rule(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.5))
    assert stability_ratio(3.0, rule) == pytest.approx(0.75)


# --------------------------------------------------------------------------- bad input
def test_bad_arguments_raise_value_errors_that_name_the_argument():
    x = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([x], lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer must be a torch.optim.Optimizer.*Linear"):
        stability_rule(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"optimizer must be .*str"):
        preconditioner_diagonal("adam", [x])
    for bad in (1, -1, True, 0.0):
        with pytest.raises(ValueError, match=r"param_group must be an int from 0 to 0 .*1 param"):
            stability_rule(optimizer, param_group=bad)
    with pytest.raises(ValueError, match=r"param_group must be"):
        preconditioner_diagonal(optimizer, [x], param_group=3)
    for bad in ([], x, None, [x, "w"]):
        with pytest.raises(ValueError, match=r"params"):
            preconditioner_diagonal(optimizer, bad)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\).*got 1.0"):
        sgd_threshold(momentum=1.0)
    with pytest.raises(ValueError, match=r"dampening must be in \[0, 1\].*got -0.1"):
        sgd_threshold(momentum=0.5, dampening=-0.1)
    with pytest.raises(ValueError, match=r"beta1 must be in \[0, 1\).*got 1.0"):
        adaptive_threshold(1.0)
    with pytest.raises(ValueError, match=r"rule must be a StabilityRule"):
        stability_ratio(1.0, 2.0)


def test_params_the_optimizer_has_no_state_for_raise_a_value_error_naming_params():
    used, unused = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    stranger = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.Adam([used, unused], lr=0.1)
    used.grad = torch.ones(2)  # `unused` gets no gradient, so Adam creates no state for it
    optimizer.step()
    assert preconditioner_diagonal(optimizer, [used]).shape == (2,)
    with pytest.raises(ValueError, match=r"params\[1\] \(shape \(3,\)\) has no Adam state"):
        preconditioner_diagonal(optimizer, [used, unused])
    with pytest.raises(ValueError, match=r"params\[0\] \(shape \(4,\)\) is not in any param group"):
        preconditioner_diagonal(optimizer, [stranger, used])
    assert unused not in optimizer.state  # and asking created none
