"""Checks of the numbers a user passes (CLI options, config fields): finite and in range, else one line."""

from __future__ import annotations

import math

from hirelc.errors import HirelcError


def finite(name: str, value, low: float | None = None, high: float | None = None, strict_low: bool = False,
           strict_high: bool = False) -> float:
    """``value`` as a float, checked to be finite and within [low, high] (open ends with ``strict_*``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise HirelcError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise HirelcError(f"{name} must be a finite number, got {value}")
    if low is not None and (v <= low if strict_low else v < low):
        raise HirelcError(f"{name} must be {'>' if strict_low else '>='} {low:g}, got {value}")
    if high is not None and (v >= high if strict_high else v > high):
        raise HirelcError(f"{name} must be {'<' if strict_high else '<='} {high:g}, got {value}")
    return v


def at_least(name: str, value: int | None, low: int) -> None:
    """An integer option that must be >= ``low`` (None passes: not given)."""
    if value is not None and value < low:
        raise HirelcError(f"{name} must be >= {low}, got {value}")
