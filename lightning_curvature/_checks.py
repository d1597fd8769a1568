"""Argument checks that name the argument as the user wrote it, its value, and what is allowed.

NumPy integers and floats are accepted wherever Python ones are (``numbers.Integral`` and
``numbers.Real``); ``bool`` is refused where a count or a number is expected, because
``True`` passing as ``1`` hides a mistake.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as a Python int, or a ValueError naming ``name`` when it is not an integer
    at least ``minimum``."""
    if type(value) is int and value >= minimum:  # the usual case, at every step: decided fast
        return value
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(
    name: str,
    value: object,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    allowed: str | None = None,
) -> float:
    """``value`` as a finite Python float inside the bounds given (``above``/``at_least``
    below it, ``below``/``at_most`` above it), or a ValueError naming ``name``; ``allowed``
    words the range in the message."""
    number = float(value) if isinstance(value, Real) and not isinstance(value, bool) else None
    in_range = (
        number is not None
        and math.isfinite(number)
        and (above is None or number > above)
        and (at_least is None or number >= at_least)
        and (below is None or number < below)
        and (at_most is None or number <= at_most)
    )
    if not in_range:
        if allowed is None:
            bounds = [
                f"{sign} {bound:g}"
                for sign, bound in ((">", above), (">=", at_least), ("<", below), ("<=", at_most))
                if bound is not None
            ]
            allowed = "a number" + (" " + " and ".join(bounds) if bounds else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    assert number is not None
    return number


def check_bool(name: str, value: object) -> bool:
    """``value`` as a Python bool (NumPy bools too), or a ValueError naming ``name``."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """``value`` when it is one of ``allowed``, or a ValueError naming ``name``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_open_unit(name: str, value: object) -> float:
    """``value`` as a float strictly between 0 and 1, or a ValueError naming ``name``."""
    return check_number(name, value, above=0.0, below=1.0, allowed="a number in (0, 1)")
