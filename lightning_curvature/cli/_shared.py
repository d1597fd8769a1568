"""What the subcommands share: the program name and exit statuses, the one-line error,
argument types that check ranges, and a quieter Lightning."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

PROG = "lightning-curvature"
#: Exit status for bad input (argparse's own), and for a measurement that failed on good input.
BAD_INPUT = 2
FAILED = 1
DEMO_MODEL = "lightning_curvature.demo.DigitsClassifier"
DEMO_DATA = "lightning_curvature.demo.DigitsDataModule"


class CliError(Exception):
    """Bad input: reported as one line on stderr (``PROG: error: message``), exit status 2."""

    def __init__(self, message: str, prog: str = PROG) -> None:
        super().__init__(message)
        self.prog = prog


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) and never exits the process:
    :func:`~lightning_curvature.cli.main` turns it into a return code, so tests and callers
    can use ``main([...])``."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see {self.prog} --help)", prog=self.prog)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def fraction(text: str) -> float:
    """An argparse ``type`` for numbers in the open interval (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def one_line(error: BaseException) -> str:
    """An exception's message on one line of at most 300 characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's start-up banners (GPU available, tips) and warnings that do not apply to
    these runs would bury what the command prints."""
    from lightning_curvature._lightning import LIGHTNING_PACKAGE

    loggers = [logging.getLogger(name) for name in (LIGHTNING_PACKAGE, "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def importable_working_directory() -> None:
    """Put the working directory first on ``sys.path``, as ``python -m`` does, so that the
    console script finds ``--model mypkg.MyModule`` in the directory it runs from too."""
    here = Path.cwd().resolve()
    if not any(Path(entry or os.curdir).resolve() == here for entry in sys.path):
        sys.path.insert(0, str(here))


def non_negative(text: str) -> float:
    """An argparse ``type`` for finite numbers ``>= 0``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


def positive(text: str) -> float:
    """An argparse ``type`` for finite numbers ``> 0``."""
    value = non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be a number > 0, got 0")
    return value
