"""The checks every public entry point runs on user input, written once.

Each check returns the value it accepted (so it can be used inline) or raises a ``ValueError`` whose
message names the setting, the value it got and what is allowed: ``"tau must be a finite number in
(0, 1], got 1.5"``. Python's ``bool`` is an ``int``; no check accepts a bool where a number is meant.

This module imports nothing from locmoe: every other layer of the package may use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NoReturn


def is_integer(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def interval(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> str:
    """``"[0, 1)"``-style text of an interval; an infinite end is always open."""
    opening = "(" if low_open or low == -math.inf else "["
    closing = ")" if high_open or high == math.inf else "]"
    return f"{opening}{low:g}, {high:g}{closing}"


def check_number(
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float if it is a finite number in the interval, else ``ValueError``."""
    ok = is_finite_number(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        allowed = interval(low, high, low_open=low_open, high_open=high_open)
        raise ValueError(f"{name} must be a finite number in {allowed}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_integer(name: str, value: object, *, low: int, high: int | None = None) -> int:
    """``value`` if it is an integer in ``[low, high]`` (``high=None``: no upper end), else ``ValueError``."""
    if not is_integer(value) or value < low or (high is not None and value > high):  # type: ignore[operator]
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
    return value  # type: ignore[return-value]


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value  # type: ignore[return-value]


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0/1, not a string), else ``ValueError``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------
# The configuration-file form: "model.d_model=0 is invalid; allowed: an integer >= 1", where the name
# is the setting's path in a TOML file (locmoe.config); the same checks, worded for a file's reader.
# --------------------------------------------------------------------------------------------------


def invalid(name: str, value: object, allowed: str) -> NoReturn:
    """Raise ``ValueError("{name}={value!r} is invalid; allowed: {allowed}")``."""
    raise ValueError(f"{name}={value!r} is invalid; allowed: {allowed}")


def config_integer(name: str, value: object, low: int) -> None:
    """An integer ``>= low``, else :func:`invalid`."""
    if not is_integer(value) or value < low:  # type: ignore[operator]
        invalid(name, value, f"an integer >= {low}")


def config_number(name: str, value: object, low: float, high: float, *, open_low: bool = False) -> None:
    """A finite number in ``[low, high]`` (``(low, high]`` with ``open_low``), else :func:`invalid`."""
    if not is_finite_number(value) or value > high or value < low or (open_low and value == low):  # type: ignore[operator]
        invalid(name, value, f"a number in {'(' if open_low else '['}{low}, {high}]")


def config_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """One of ``choices``, else :func:`invalid` listing them."""
    if value not in choices:
        invalid(name, value, ", ".join(choices))


def parse_integer_flag(flag: str, text: str, low: int) -> int:
    """A command-line integer ``text`` of ``flag`` that must be ``>= low``; else ``ValueError`` in the
    CLI's one-line form ("--flag='x' is invalid; allowed: an integer >= low")."""
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise ValueError(f"{flag}={text!r} is invalid; allowed: an integer >= {low}")
    return value
