"""Small helpers used across the package (no torch, no triton: importable anywhere)."""

from __future__ import annotations

import numbers


def cdiv(a: int, b: int) -> int:
    """Ceiling division: how many blocks of ``b`` hold ``a`` items."""
    return -(-a // b)


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int, or a TypeError/ValueError that names ``name``.  Integers of any kind
    (numpy's too) are taken; bools and floats are not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` as a Python bool, or a TypeError that names ``name``.  Only bools (numpy's too) are taken:
    ``"no"`` or ``0`` would otherwise be read by truth value, and ``"no"`` is true."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):  # numpy's bool scalar
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_float(name: str, value) -> float:
    """``value`` as a Python float, or a TypeError that names ``name``.  Real numbers of any kind (ints,
    numpy's floats) are taken; bools and strings are not.  The range is the caller's to check."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)
