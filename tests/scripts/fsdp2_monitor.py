"""Run by tests/test_fsdp2_monitor.py: CurvatureMonitor under Lightning's
ModelParallelStrategy with fully_shard (FSDP2), two CPU ranks over gloo.

Scenarios, one launch (starting ranks costs more than training them):

- ``monitored``: a tanh MLP trained with SGD and momentum (or Adam: ``adam``), measured every
  4 steps (track and full tiers); each rank probes its own batch. At the last measured step
  a callback gathers the whole parameters, so the test can rebuild the unsharded model and
  compare λmax with the dense Hessian of the mean loss over both ranks' probe batches.
- ``plain``: the same run without the monitor: its gathered parameters and optimizer state
  must equal the monitored run's bit for bit.
- ``fail`` (SGD): the measured loss raises on rank 1 alone at step 8: both ranks must skip
  that measurement with rank 1's cause, and train on untouched.
- ``budget`` (SGD): the defaults (a cadence calibrated to ``max_overhead``) with rank 1
  slowed down, so the ranks' clocks disagree: no hang, the same measured steps.
- ``transformer`` (SGD): as ``monitored``, on a small transformer block (attention, layer
  norms, a GELU MLP), every Linear sharded.
- ``resume`` (SGD): 8 steps with a distributed checkpoint, then a new trainer resumes from
  it to step 12; the monitor goes on where it stopped. ``resume_plain``: the same without
  the monitor, whose training the resumed monitored run must equal bit for bit (a resumed
  FSDP2 run does not equal an uninterrupted one, monitor or not).

Every rank writes what it saw in scenario S to ``OUT.S.rank<r>`` as JSON.
"""

import json
import sys
import time
import warnings

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

from lightning_curvature import CurvatureMonitor
from lightning_curvature._lightning import pl
from tests.lightning_models import classification_data, loader

MAX_STEPS = 12
EVERY = 4


class AttentionBlock(nn.Module):
    """A pre-norm transformer block (written-out softmax attention, a GELU MLP) over
    sequences of 4 tokens, 8 wide, then a mean over tokens and a linear head."""

    def __init__(self, width: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(10 // 2, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.embed(inputs.reshape(inputs.shape[0], 2, 5).repeat(1, 2, 1))  # 4 tokens
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.mT / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.proj(weights @ v)
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


def network(kind: str) -> nn.Module:
    if kind == "transformer":
        return AttentionBlock()
    return nn.Sequential(
        nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )


class ShardedClassifier(pl.LightningModule):
    def __init__(self, optimizer: str, kind: str = "mlp") -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.net = network(kind)

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net.modules():
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return nn.functional.cross_entropy(self.net(inputs), targets)

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.01)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class SlowRankOne(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_rank == 1:
            time.sleep(0.004 * (1 + trainer.global_step % 3))


def fails_on_rank_one(module, batch):
    """The module's loss, raising on rank 1 at step 8 after the forward pass (a failure
    before the forward's own collectives leaves the other rank waiting in them)."""
    loss = module.training_step(batch, 0)
    if module.trainer.global_rank == 1 and module.trainer.global_step == 8:
        raise RuntimeError("rank one's loss broke")
    return loss


def gathered(module: nn.Module) -> dict:
    """The whole parameters (a collective: every rank calls it)."""
    return {name: p.full_tensor().tolist() for name, p in module.named_parameters()}


class GatherAtLastMeasurement(pl.Callback):
    def __init__(self, monitor: CurvatureMonitor) -> None:
        self.monitor, self.at = monitor, None

    def on_train_batch_end(self, trainer, module, *args) -> None:
        if trainer.global_step == MAX_STEPS:
            self.at = {"step": trainer.global_step, "params": gathered(module.net)}


def optimizer_state(trainer) -> dict:
    state = trainer.optimizers[0].state
    return {
        f"{i}.{key}": (value.full_tensor() if hasattr(value, "full_tensor") else value).tolist()
        for i, p in enumerate(trainer.optimizers[0].param_groups[0]["params"])
        for key, value in sorted(state[p].items())
        if isinstance(value, torch.Tensor)
    }


def monitor_for(scenario: str) -> CurvatureMonitor:
    common = dict(k=2, num_probes=4)
    if scenario == "budget":
        return CurvatureMonitor(**common)
    every = dict(every_n_steps=EVERY, log_spaced=False, full_every=2, max_overhead=None)
    if scenario == "fail":
        return CurvatureMonitor(**common, **every, loss_fn=fails_on_rank_one)
    return CurvatureMonitor(**common, **every, on_error="raise")


def trainer_for(max_steps: int, callbacks: list, root: str) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=2,
        strategy=pl.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
    )


def run(out_path: str, scenario: str, optimizer: str) -> None:
    pl.seed_everything(0, verbose=False)
    module = ShardedClassifier(optimizer, "transformer" if scenario == "transformer" else "mlp")
    monitor = None if scenario.endswith("plain") else monitor_for(scenario)
    callbacks: list = [] if monitor is None else [monitor, GatherAtLastMeasurement(monitor)]
    if scenario == "budget":
        callbacks.append(SlowRankOne())
    max_steps = 24 if scenario == "budget" else MAX_STEPS
    data = loader(classification_data(), batch_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if scenario.startswith("resume"):
            first = trainer_for(8, callbacks, f"{out_path}.{scenario}")
            first.fit(module, data)
            checkpoint = f"{out_path}.{scenario}.ckpt"
            first.save_checkpoint(checkpoint)
            pl.seed_everything(0, verbose=False)
            monitor = None if monitor is None else monitor_for(scenario)
            callbacks = [] if monitor is None else [monitor, GatherAtLastMeasurement(monitor)]
            module = ShardedClassifier(optimizer)
            trainer = trainer_for(max_steps, callbacks, f"{out_path}.{scenario}")
            trainer.fit(module, data, ckpt_path=checkpoint)
        else:
            trainer = trainer_for(max_steps, callbacks, out_path)
            trainer.fit(module, data)
    rank = trainer.global_rank
    result = {
        "rank": rank,
        "params": gathered(module.net),
        "optimizer_state": optimizer_state(trainer),
        "warnings": [str(w.message) for w in caught if "CurvatureMonitor" in str(w.message)],
    }
    if monitor is not None:
        result.update(
            disabled=monitor.disabled_reason,
            history=monitor.history,
            probe=[t.tolist() for t in monitor.probes.stored[0]],
            at_last=callbacks[1].at,
        )
    with open(f"{out_path}.{scenario}-{optimizer}.rank{rank}", "w") as handle:
        json.dump(result, handle)
    torch.distributed.barrier()


if __name__ == "__main__":
    for optimizer in ("sgd", "adam"):
        for name in ("monitored", "plain"):
            run(sys.argv[1], name, optimizer)
    for name in ("fail", "budget", "resume", "resume_plain", "transformer"):
        run(sys.argv[1], name, "sgd")
