"""Early warning: does CurvatureMonitor, at its defaults, warn before the loss blows up?

Run from the repository root::

    python benchmarks/bench_early_warning.py            # the runs in PHENOMENA.md
    python benchmarks/bench_early_warning.py --quick    # one seed, shorter runs

Each scenario has runs that spike and stable control runs, over several seeds, watched by
``CurvatureMonitor()`` at its defaults (calibrated cadence, default alert rules and
triggers) in a real ``pl.Trainer``:

* **η raised mid-run (SGD)**: full-batch gradient descent, MSE, the demo's 64→64→64→10
  tanh MLP on 1,000 digits, η = 0.1 until step ``RAISE_AT``; then a scheduler's jump
  multiplies η by 4 (a warm-up that ends too high, a resume with another learning rate).
  The control keeps η. η = 0.3, so the stability ratio is about 0.5 at the raise.
* **η raised mid-run (Adam)**: the same with full-batch Adam at η = 2·10⁻⁴, whose
  stability-relevant sharpness is λmax(P⁻¹H) against 38/η.
* **warm-up to a too-high peak (SGD)**: η rises linearly from 0 to its peak over
  ``WARMUP`` steps; the peak puts λmax·η far past 2 while sharpness grows. The control's
  peak is 0.3.

A *loss spike* is a training loss above 2× its lowest so far, or non-finite. For each run
the table gives the first alert (its kind and step), the first spike, and the lead time
(steps from the first alert to the spike; negative: the alert came late). A *miss* is a
spike with no alert at or before it; a *false alarm* is any alert on a control run. The
overhead is the wall time of the control run with the monitor over the same run without
it (fastest of two each, alternated).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from _phenomena import LossRecorder, configure_torch, markdown_table, run_header, train

from lightning_curvature._lightning import Callback, pl
from lightning_curvature.callback import CurvatureMonitor
from lightning_curvature.demo import DigitsClassifier, DigitsDataModule

RAISE_AT = 1200
FACTOR = 4.0
# η for SGD: the stability ratio λmax·η/2 reaches about 0.5 by step 1,200, so ×4 is past 2.
SGD_LR = 0.3
# η for Adam: λmax(P⁻¹H)·η stays below 38 (at 1e-3 the run sits at the adaptive edge,
# where the edge alert is right to fire), and ×4 is past it.
ADAM_LR = 2e-4
WARMUP = 400
WARMUP_PEAK = 2.0
NUM_SAMPLES = 1000
HIDDEN = [64, 64]


class LearningRate(Callback):
    """Sets every param group's η to ``schedule(step)`` before each step (a scheduler)."""

    def __init__(self, schedule: Callable[[int], float]) -> None:
        self.schedule = schedule

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.schedule(trainer.global_step)


@dataclass(frozen=True)
class Scenario:
    name: str
    optimizer: str
    spiking: Callable[[int], float]  # η by step, for the runs meant to spike
    control: Callable[[int], float]
    max_steps: int


def scenarios(quick: bool) -> list[Scenario]:
    raise_at = RAISE_AT // 2 if quick else RAISE_AT
    steps = raise_at + 200
    warmup = WARMUP // 2 if quick else WARMUP
    return [
        Scenario(
            f"η 0.3 ×4 at step {raise_at} (SGD)",
            "sgd",
            lambda s: SGD_LR * (FACTOR if s >= raise_at else 1.0),
            lambda s: SGD_LR,
            steps,
        ),
        Scenario(
            f"η 2e-4 ×4 at step {raise_at} (Adam)",
            "adam",
            lambda s: ADAM_LR * (FACTOR if s >= raise_at else 1.0),
            lambda s: ADAM_LR,
            steps,
        ),
        Scenario(
            f"warm-up to {WARMUP_PEAK:g} over {warmup} steps (SGD)",
            "sgd",
            lambda s: WARMUP_PEAK * min(1.0, (s + 1) / warmup),
            lambda s: SGD_LR * min(1.0, (s + 1) / warmup),
            warmup + 300,
        ),
    ]


def first_spike(losses: list[float], steps: list[int]) -> int | None:
    lowest = math.inf
    for step, loss in zip(steps, losses, strict=True):
        if not math.isfinite(loss) or loss > 2 * lowest:
            return step
        lowest = min(lowest, loss)
    return None


def one_run(scenario: Scenario, schedule: Callable[[int], float], seed: int, watched: bool):
    data = DigitsDataModule(num_samples=NUM_SAMPLES, full_batch=True, targets="onehot")
    monitor = CurvatureMonitor() if watched else None
    run = train(
        scenario.name,
        lambda: DigitsClassifier(
            hidden_sizes=HIDDEN, activation="tanh", loss="mse", optimizer=scenario.optimizer
        ),
        data,
        scenario.max_steps,
        monitor,
        seed=seed,
        extra_callbacks=[LearningRate(schedule)],
    )
    return run, monitor


@dataclass(frozen=True)
class Outcome:
    seed: int
    kind: str  # "spiking" or "control"
    spike: int | None
    first_alert: tuple[str, int] | None
    triggered: int
    measurements: int

    @property
    def lead(self) -> int | None:
        if self.spike is None or self.first_alert is None:
            return None
        return self.spike - self.first_alert[1]

    @property
    def missed(self) -> bool:
        return self.spike is not None and (self.lead is None or self.lead < 0)

    @property
    def false_alarm(self) -> bool:
        return self.kind == "control" and self.first_alert is not None


def observe(scenario: Scenario, kind: str, seed: int) -> Outcome:
    schedule = scenario.spiking if kind == "spiking" else scenario.control
    run, monitor = one_run(scenario, schedule, seed, watched=True)
    assert monitor is not None
    fired = monitor.alerts.fired
    return Outcome(
        seed=seed,
        kind=kind,
        spike=first_spike(run.losses, run.loss_steps),
        first_alert=(fired[0].kind, fired[0].step) if fired else None,
        triggered=monitor.schedule.num_triggered,
        measurements=len(monitor.history),
    )


def overhead(scenario: Scenario, repeats: int = 2) -> float:
    """Wall time of the control run with the monitor over without it, fastest of
    ``repeats`` each, alternated."""
    with_monitor, without = [], []
    for _ in range(repeats):
        without.append(one_run(scenario, scenario.control, 0, watched=False)[0].seconds)
        with_monitor.append(one_run(scenario, scenario.control, 0, watched=True)[0].seconds)
    return min(with_monitor) / min(without)


def table(results: list[tuple[Scenario, list[Outcome], float]]) -> str:
    rows = []
    for scenario, outcomes, ratio in results:
        for o in outcomes:
            alert = "—" if o.first_alert is None else f"{o.first_alert[0]} @ {o.first_alert[1]}"
            lead = "—" if o.lead is None else str(o.lead)
            spike = "—" if o.spike is None else str(o.spike)
            rows.append(
                [scenario.name, o.kind, o.seed, alert, spike, lead, o.triggered, o.measurements]
            )
        spiking = [o for o in outcomes if o.kind == "spiking"]
        leads = [o.lead for o in spiking if o.lead is not None]
        misses = sum(o.missed for o in outcomes)
        alarms = sum(o.false_alarm for o in outcomes)
        rows.append(
            [
                f"**{scenario.name}**",
                "summary",
                "",
                f"misses {misses}/{sum(o.spike is not None for o in spiking)}",
                f"false alarms {alarms}/{len(outcomes) - len(spiking)}",
                "median " + (f"{statistics.median(leads):.0f}" if leads else "—"),
                "",
                f"overhead {ratio:.2f}×",
            ]
        )
    headers = [
        "scenario",
        "run",
        "seed",
        "first alert",
        "first loss spike",
        "lead (steps)",
        "triggered",
        "measurements",
    ]
    return markdown_table(headers, rows)


def language_model(steps: int) -> str:
    """The byte-level transformer demo (AdamW, no warm-up) at a high and at a moderate
    learning rate, one seed each: first alert, first loss spike, the peak stability ratio
    (λmax(P⁻¹H)·η / 38) and the wall time with the monitor."""
    from lightning_curvature.demo import CharTransformer, StdlibTextDataModule

    rows = []
    for lr, label in ((3e-2, "AdamW η 3e-2, no warm-up"), (3e-3, "AdamW η 3e-3, no warm-up")):
        monitor = CurvatureMonitor()
        recorder = LossRecorder()
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[monitor, recorder],
        )
        started = time.perf_counter()
        trainer.fit(CharTransformer(lr=lr), StdlibTextDataModule(batch_size=16))
        seconds = time.perf_counter() - started
        spike = first_spike(recorder.losses, recorder.steps)
        fired = monitor.alerts.fired
        ratios = [
            h["curvature/stability_ratio"]
            for h in monitor.history
            if "curvature/stability_ratio" in h
        ]
        rows.append(
            [
                label,
                "—" if not fired else f"{fired[0].kind} @ {fired[0].step}",
                ", ".join(f"{a.kind} @ {a.step}" for a in fired[1:4]) or "—",
                "—" if spike is None else str(spike),
                f"{max(ratios):.3g}" if ratios else "—",
                f"{min(recorder.losses):.3f} / {recorder.losses[-1]:.3f}",
                len(monitor.history),
                f"{seconds:.0f}",
            ]
        )
    headers = [
        "run",
        "first alert",
        "next alerts",
        "first loss spike",
        "peak ratio",
        "lowest / last loss",
        "measurements",
        "s",
    ]
    return markdown_table(headers, rows)


def _spread(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def critical_comparison(quick: bool) -> str:
    """Critical sharpness (forward passes only) beside λmax and the directional sharpness
    uᵀHu/uᵀu on the controls of the raise scenarios, at every measurement that has all
    three; their ratios, median and range."""
    rows = []
    for scenario in scenarios(quick)[:2]:
        monitor = CurvatureMonitor(critical_sharpness=True)
        data = DigitsDataModule(num_samples=NUM_SAMPLES, full_batch=True, targets="onehot")
        train(
            scenario.name,
            lambda scenario=scenario: DigitsClassifier(
                hidden_sizes=HIDDEN, activation="tanh", loss="mse", optimizer=scenario.optimizer
            ),
            data,
            scenario.max_steps,
            monitor,
            extra_callbacks=[LearningRate(scenario.control)],
        )
        keys = ("critical_sharpness", "directional_sharpness", "lambda_max")
        points = [
            [h[f"curvature/{k}"] for k in keys]
            for h in monitor.history
            if all(f"curvature/{k}" in h for k in keys)
        ]
        by_direction = [c / d for c, d, _ in points if d > 0]
        by_top = [c / t for c, _, t in points if t > 0]
        label = scenario.name.split(" ×4")[0] + f" ({scenario.optimizer}), control"
        rows.append([label, len(points), _spread(by_direction), _spread(by_top)])
    headers = [
        "run",
        "points",
        "critical / directional: median (range)",
        "critical / λmax: median (range)",
    ]
    return markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, shorter runs")
    parser.add_argument("--lm", action="store_true", help="the transformer scenario only")
    parser.add_argument(
        "--critical", action="store_true", help="critical sharpness beside λmax only"
    )
    args = parser.parse_args()
    if args.critical:
        configure_torch()
        print(critical_comparison(args.quick))
        return
    if args.lm:
        configure_torch()
        print(language_model(400 if args.quick else 800))
        return
    configure_torch()
    started = time.perf_counter()
    seeds = (0,) if args.quick else (0, 1, 2)
    results = []
    for scenario in scenarios(args.quick):
        outcomes = [
            observe(scenario, kind, seed) for seed in seeds for kind in ("spiking", "control")
        ]
        results.append((scenario, outcomes, overhead(scenario)))
        print(f"{scenario.name}: done", flush=True)
    print(run_header("Early warning", args.quick, time.perf_counter() - started))
    print(table(results))


if __name__ == "__main__":
    main()
