"""Run by tests/test_ddp.py: two CPU ranks over gloo through Lightning's strategy="ddp".

Each rank trains on its own shard of the data and measures the Hessian of its own probe
batch; the monitor averages the products across ranks. Rank 0 writes what it saw to the
JSON file named on the command line, and every rank writes its λmax, so the test can check
that the ranks agree and that the value is the Hessian of the union of the probe batches.
"""

import json
import sys

import torch

from lightning_curvature import CurvatureMonitor
from lightning_curvature._lightning import TensorBoardLogger, pl
from tests.lightning_models import Classifier, classification_data, loader, mlp


def main(out_path: str, log_dir: str) -> None:
    pl.seed_everything(0, verbose=False)
    module = Classifier(mlp(), "sgd", lr=0.1)
    monitor = CurvatureMonitor(
        every_n_steps=4, log_spaced=False, max_overhead=None, on_error="raise"
    )
    trainer = pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=TensorBoardLogger(log_dir, name="ddp"),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=True,
    )
    trainer.fit(module, loader(classification_data(), batch_size=16))
    rank = trainer.global_rank
    result = {
        "rank": rank,
        "lambda_max": monitor.history[-1]["curvature/lambda_max"],
        "probe": [t.tolist() for t in monitor.probes.stored[0]],
        "state": {k: v.tolist() for k, v in module.net.state_dict().items()},
        "log_dir": trainer.logger.log_dir if rank == 0 else None,
    }
    with open(f"{out_path}.rank{rank}", "w") as handle:
        json.dump(result, handle)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
