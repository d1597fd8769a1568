"""The inputs of ``analyze``: the checkpoint (read once), the classes named on the command
line, the model restored from the checkpoint, and the training batches. Each failure is a
:class:`~lightning_curvature.cli._shared.CliError` that says what to fix."""

from __future__ import annotations

import argparse
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_curvature.cli._shared import DEMO_DATA, CliError, one_line, quiet_lightning


def device(name: str) -> torch.device:
    """``--device`` as a torch device, once it is known to exist."""
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint as a dict, or a one-line reason why it is not one."""
    if not path.exists():
        raise CliError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CliError(f"checkpoint {path} is not a file")
    try:
        # Lightning checkpoints hold hyper-parameters as arbitrary Python objects.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CliError(
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: "
            f"{one_line(error)})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CliError(f"{path} is not a Lightning checkpoint: it has no 'state_dict'")
    return checkpoint


def import_class(path: str, flag: str) -> type:
    """``package.module.Class`` imported, or a one-line reason why not."""
    module_name, _, name = path.rpartition(".")
    if not module_name or not name:
        raise CliError(f"{flag} {path!r} is not a class path like package.module.Class")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise CliError(
            f"{flag} {path}: cannot import {module_name!r} ({type(error).__name__}: "
            f"{one_line(error)})"
        ) from None
    try:
        found = getattr(module, name)
    except Exception:
        raise CliError(f"{flag} {path}: module {module_name!r} has no {name!r}") from None
    if not inspect.isclass(found):
        raise CliError(f"{flag} {path} is a {type(found).__name__}, not a class")
    return found


def restore_model(
    model_class: type, name: str, checkpoint: dict[str, Any], path: Path, where: torch.device
) -> Any:
    """The LightningModule restored from the checkpoint dict already read, as
    ``load_from_checkpoint`` would (hyper-parameters, ``on_load_checkpoint``, strict
    ``state_dict``), without unpickling the file a second time."""
    from lightning_curvature._lightning import LIGHTNING_PACKAGE

    saving = importlib.import_module(f"{LIGHTNING_PACKAGE}.core.saving")
    migration = importlib.import_module(f"{LIGHTNING_PACKAGE}.utilities.migration.utils")
    try:
        # Lightning's own loader behind load_from_checkpoint, applied to our dict: old
        # checkpoints upgraded, then the class built from the saved hyper-parameters.
        upgraded = migration._pl_migrate_checkpoint(dict(checkpoint), checkpoint_path=path)
        model = saving._load_state(model_class, upgraded)
    except RuntimeError as error:
        if "state_dict" in str(error):  # missing/unexpected keys, size mismatches
            raise CliError(f"checkpoint {path} does not match {name}: {one_line(error)}") from None
        raise CliError(f"cannot load {path} into {name}: {one_line(error)}") from None
    except Exception as error:
        raise CliError(
            f"cannot load {path} into {name} ({type(error).__name__}: {one_line(error)})"
        ) from None
    return model.to(where)


def build_data(
    data_class: type, checkpoint: dict[str, Any], batch_size: int | None
) -> tuple[Any, str]:
    """The data module, built as it was for training when the checkpoint says how, and a
    description of the call that built it."""
    saved = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    accepts = inspect.signature(data_class).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepts.values())
    kwargs = {k: v for k, v in saved.items() if k in accepts or takes_any}
    if batch_size is not None:
        if "batch_size" not in accepts and not takes_any:
            raise CliError(f"--batch-size: {data_class.__name__} takes no batch_size argument")
        if kwargs.get("full_batch"):
            raise CliError("--batch-size: the checkpoint's data module is full-batch")
        kwargs["batch_size"] = batch_size
    arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    try:
        datamodule = data_class(**kwargs)
    except Exception as error:
        raise CliError(
            f"cannot build {data_class.__name__}({arguments}): "
            f"{type(error).__name__}: {one_line(error)}"
        ) from None
    return datamodule, f"{data_class.__module__}.{data_class.__name__}({arguments})"


def sample_batches(datamodule: Any, description: str, num_batches: int, seed: int) -> list[Any]:
    """The first ``num_batches`` training batches, drawn under ``seed`` (so a loader that
    shuffles with the global RNG gives the same batches every time)."""
    batches: list[Any] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if hasattr(datamodule, "prepare_data"):
                datamodule.prepare_data()
            if hasattr(datamodule, "setup"):
                datamodule.setup("fit")
            for batch in datamodule.train_dataloader():
                batches.append(batch)
                if len(batches) == num_batches:
                    break
    except Exception as error:
        raise CliError(
            f"{description}: the training data failed to load ({type(error).__name__}: "
            f"{one_line(error)})"
        ) from None
    if not batches:
        raise CliError(f"{description}: train_dataloader() yielded no batches")
    if len(batches) < num_batches:
        print(f"note: the training data has only {len(batches)} batches; using all of them")
    return batches


@dataclass
class Loaded:
    """The checkpoint, its model and probe batches, and where the outputs go."""

    checkpoint: dict[str, Any]
    model: Any
    batches: list[Any]
    data_description: str
    step: int
    out: Path


def load(args: argparse.Namespace, device: torch.device) -> Loaded:
    """Read the checkpoint, restore its model and draw the probe batches (the cheap checks
    first: bad paths are reported before Lightning loads)."""
    checkpoint = read_checkpoint(args.checkpoint)
    model_class = import_class(args.model, "--model")
    data_class = import_class(DEMO_DATA if args.demo_data else args.data, "--data")
    if not hasattr(model_class, "load_from_checkpoint"):
        raise CliError(f"--model {args.model} is not a LightningModule class")
    if not hasattr(data_class, "train_dataloader"):
        raise CliError(f"--data {data_class.__name__} has no train_dataloader()")
    out = args.out or unused_dir(Path("runs/analyze") / args.checkpoint.stem)
    with quiet_lightning():
        model = restore_model(model_class, args.model, checkpoint, args.checkpoint, device)
        datamodule, description = build_data(data_class, checkpoint, args.batch_size)
        batches = sample_batches(datamodule, description, args.num_batches, args.seed)
    step = int(checkpoint.get("global_step", 0))
    return Loaded(checkpoint, model, batches, description, step, out)


def unused_dir(path: Path) -> Path:
    """``path``, or ``path_2``, ``path_3``, ... if it is taken: one analysis per directory,
    so TensorBoard never mixes two of them in one run."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}_{number}")
    return candidate
