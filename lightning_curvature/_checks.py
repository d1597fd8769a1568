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
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(
    name: str,
    value: object,
    *,
    above: float | None = None,
    at_most: float | None = None,
    allowed: str | None = None,
) -> float:
    """``value`` as a finite Python float with ``above < value <= at_most``, or a ValueError
    naming ``name``; ``allowed`` words the range in the message."""
    in_range = (
        not isinstance(value, bool)
        and isinstance(value, Real)
        and math.isfinite(float(value))
        and (above is None or float(value) > above)
        and (at_most is None or float(value) <= at_most)
    )
    if not in_range:
        if allowed is None:
            low = "" if above is None else f" > {above:g}"
            high = "" if at_most is None else f" <= {at_most:g}"
            allowed = f"a number{low}{' and' if low and high else ''}{high}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


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
    number = check_number(name, value, above=0.0, allowed="a number in (0, 1)")
    if number >= 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return number
