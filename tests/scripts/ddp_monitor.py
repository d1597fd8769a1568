"""Run by tests/test_ddp.py: two CPU ranks over gloo through Lightning's strategy="ddp".

Scenarios (the third argument):

- ``union``: each rank trains on its own shard and measures the Hessian of its own probe
  batch; the monitor averages the products across ranks (per-layer blocks too).
- ``budget``: the defaults (cadence calibrated to ``max_overhead``) with rank 1 slowed down,
  so the ranks' clocks disagree; the run must finish with identical measured steps.
- ``nan``: rank 1's loss turns NaN at one measurement; every rank must skip it and report
  rank 1's own cause.
- ``warn``: the defaults, the learning rate raised ×40 at step 30 (a stability ratio of
  about 0.03 to 1.3) and a loss jump on rank 1 alone at steps 41-42: both ranks must take the
  same triggered measurements, raise the same alerts at the same steps, and record the
  spike, with no hang.

One launch runs every scenario in turn (starting ranks costs more than training them); every
rank writes what it saw in scenario S to ``OUT.S.rank<r>`` as JSON.
"""

import json
import sys
import time
import warnings

import torch

from lightning_curvature import CurvatureMonitor
from lightning_curvature._lightning import TensorBoardLogger, pl
from tests.lightning_models import Classifier, classification_data, loader, mlp
from tests.truth import cross_entropy_loss


class SlowRankOne(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_rank == 1:
            time.sleep(0.004 * (1 + trainer.global_step % 3))


def nan_on_rank_one(module, batch):
    loss = cross_entropy_loss(module, batch)
    trainer = module.trainer
    if trainer.global_rank == 1 and trainer.global_step == 4:
        return loss * float("nan")
    return loss


class RaiseLearningRate(pl.Callback):
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == 30:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] *= 40


class JumpOnRankOne(Classifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_rank == 1 and self.trainer.global_step in (41, 42):
            return loss * 50
        return loss


def run(out_path: str, log_dir: str, scenario: str) -> None:
    pl.seed_everything(0, verbose=False)
    module = (JumpOnRankOne if scenario == "warn" else Classifier)(mlp(), "sgd", lr=0.1)
    callbacks: list = []
    if scenario == "union":
        monitor = CurvatureMonitor(
            every_n_steps=4,
            log_spaced=False,
            max_overhead=None,
            on_error="raise",
            critical_sharpness=True,
            per_layer=True,
        )
        max_steps = 4
    elif scenario == "budget":
        monitor = CurvatureMonitor(k=2, num_probes=4)
        callbacks.append(SlowRankOne())
        max_steps = 60
    elif scenario == "warn":
        monitor = CurvatureMonitor(k=2, trace=False)
        callbacks += [SlowRankOne(), RaiseLearningRate()]
        max_steps = 60
    else:
        monitor = CurvatureMonitor(
            every_n_steps=2, log_spaced=False, loss_fn=nan_on_rank_one, k=1, trace=False
        )
        max_steps = 6
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=TensorBoardLogger(log_dir, name="ddp"),
        callbacks=[*callbacks, monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader(classification_data(), batch_size=16))
    rank = trainer.global_rank
    result = {
        "rank": rank,
        "steps": [int(h["step"]) for h in monitor.history],
        "lambda_max": monitor.history[-1]["curvature/lambda_max"],
        "critical": [h.get("curvature/critical_sharpness") for h in monitor.history],
        "probe": [t.tolist() for t in monitor.probes.stored[0]],
        "state": {k: v.tolist() for k, v in module.net.state_dict().items()},
        "log_dir": trainer.logger.log_dir if rank == 0 else None,
        "warnings": [str(w.message) for w in caught],
        "global_step": trainer.global_step,
        "alerts": [[a.kind, a.step] for a in monitor.alerts.fired],
        "spikes": [s.step for s in monitor.logbook.early_warning.spikes],
        "triggered": monitor.schedule.num_triggered,
        "ratios": [h.get("curvature/stability_ratio") for h in monitor.history],
        "layers": {
            k: v
            for k, v in monitor.history[-1].items()
            if k.startswith("curvature/layer/") and k.endswith("/lambda_max")
        },
    }
    with open(f"{out_path}.{scenario}.rank{rank}", "w") as handle:
        json.dump(result, handle)
    torch.distributed.barrier()


if __name__ == "__main__":
    for name in ("union", "budget", "nan", "warn"):
        run(sys.argv[1], f"{sys.argv[2]}/{name}", name)
