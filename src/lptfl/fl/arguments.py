"""Checks of the arguments a user's code passes to lptfl's public objects (the server's settings,
the Flower strategy and client helpers).

A wrong argument would otherwise surface deep inside a round (after clients have trained) or not
at all (a string split into characters, a zero batch size that trains nothing). Each check raises
one line naming the argument, the value and what is expected. numpy scalars count as numbers.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable

from lptfl.quant import PrecisionPolicy


def integer(name: str, value: object, *, minimum: int | None = None) -> int:
    """``value`` as an int if it is an integer (numpy's included, bool not) >= ``minimum``.

    Raises:
        TypeError: not an integer (a bool or a float such as 2.0 included).
        ValueError: below ``minimum``.
    """
    expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    value = operator.index(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def number(name: str, value: object, *, low: float, high: float = math.inf, low_open: bool = False,
           high_open: bool = False) -> float:
    """``value`` as a float if it is a finite real number (numpy's included, bool not) between
    ``low`` and ``high`` (each end included unless ``*_open``).

    Raises:
        TypeError: not a real number (a bool or a string such as "0.9" included).
        ValueError: not finite, or outside the range.
    """
    if math.isinf(high):
        expected = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        expected = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    value = float(value)
    inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not math.isfinite(value) or not inside:
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


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


def precision_policy(value: object) -> None:
    """Check that ``value``, a ``policy`` argument, is a PrecisionPolicy.

    Raises:
        TypeError: naming the type received.
    """
    instance("policy", value, PrecisionPolicy, "PrecisionPolicy.low_precision(8)")


__all__ = ["flag", "instance", "integer", "names", "number", "precision_policy"]
