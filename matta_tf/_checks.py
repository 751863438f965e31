"""Argument checks for the whole library: one home, one message format.

Every check raises `ValueError` naming the argument and the value received, in the keras-rs style:
"`name` must be ... Received: name=value". Layers, training, optimizers and `mnestify` call these;
configuration files have their own dotted-path errors (`matta_tf.pipelines.config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """`value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}. Received: {name}={value!r}")


def check_positive_int(name: str, value: Any) -> None:
    """`value` is an integer >= 1 (a bool is not an integer here)."""
    if not _is_int(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")


def check_non_negative_int(name: str, value: Any) -> None:
    """`value` is an integer >= 0."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer. Received: {name}={value!r}")


def check_int_in_range(name: str, value: Any, low: int, high: int) -> None:
    """`value` is an integer in `[low, high]`."""
    if not _is_int(value) or not low <= value <= high:
        raise ValueError(f"`{name}` must be an integer in [{low}, {high}]. Received: {name}={value!r}")


def check_at_least(name: str, value: Any, low: float) -> None:
    """`value` is a (finite or infinite) number >= `low`."""
    if not _is_number(value) or not value >= low:
        raise ValueError(f"`{name}` must be a number >= {low:g}. Received: {name}={value!r}")


def check_in_interval(name: str, value: Any, low: float, high: float, low_open: bool = False,
                      high_open: bool = False) -> None:
    """`value` is a number in the interval from `low` to `high`, each end open or closed."""
    too_low = not _is_number(value) or (value <= low if low_open else not value >= low)
    too_high = _is_number(value) and (value >= high if high_open else not value <= high)
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"`{name}` must be in {interval}. Received: {name}={value!r}")
