"""Checks of the arguments a Flower app passes to lptfl's strategy and client helpers.

A wrong argument would otherwise surface deep inside a round (after clients have trained) or not
at all (a string split into characters, a zero batch size that trains nothing). Each check raises
one line naming the argument, the value and what is expected.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(name: str, value: object, *, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum``.

    Raises:
        TypeError: not an int (a bool or a float such as 2.0 included).
        ValueError: below ``minimum``.
    """
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def number(name: str, value: object, *, low: float, high: float = math.inf, low_open: bool = False,
           high_open: bool = False) -> float:
    """``value`` as a float if it is a finite real number in the interval from ``low`` to ``high``
    (each end closed unless ``*_open``).

    Raises:
        TypeError: not an int or float (a bool or a string such as "0.9" included).
        ValueError: not finite, or outside the interval.
    """
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or math.isinf(high) else ']'}"
    if not (_is_int(value) or isinstance(value, float)):
        raise TypeError(f"{name} must be a number in {interval}, got {type(value).__name__} {value!r}")
    inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not math.isfinite(value) or not inside:
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")
    return float(value)


def flag(name: str, value: object) -> bool:
    """``value`` if it is a bool (a string such as "false" would count as true).

    Raises:
        TypeError: not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def names(name: str, value: object) -> list[str]:
    """The state-entry names in ``value``, an iterable of strings other than a single string (which
    would be read as its characters).

    Raises:
        TypeError: a single string, not iterable, or an item that is not a string.
    """
    if isinstance(value, str):
        raise TypeError(f"{name} must be a list of state-entry names, got the single string {value!r} "
                        f"(write [{value!r}])")
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of state-entry names, got {type(value).__name__}")
    items = list(value)
    wrong = [item for item in items if not isinstance(item, str)]
    if wrong:
        raise TypeError(f"{name} must hold state-entry names (strings), got {wrong[0]!r}")
    return items


def instance(name: str, value: object, kind: type, example: str, *, optional: bool = False) -> None:
    """Check that ``value`` is a ``kind`` (or None where ``optional``).

    Raises:
        TypeError: naming the type received and an example of a right value.
    """
    if (value is None and optional) or isinstance(value, kind):
        return
    accepted = f"a {kind.__name__}{' or None' if optional else ''}"
    raise TypeError(f"{name} must be {accepted} (e.g. {example}), got {type(value).__name__}")


__all__ = ["flag", "instance", "integer", "names", "number"]
