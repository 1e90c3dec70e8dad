"""Small argument checkers that produce the project's error messages."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fesmia_hooks.exceptions import ConfigurationError


def positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise a clear error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ConfigurationError(f"`{name}` must be {kind}, got {value!r}")
    return value


def optional_positive_int(name: str, value: Any) -> int | None:
    """Like :func:`positive_int` but lets ``None`` through."""
    return None if value is None else positive_int(name, value)


def probability(name: str, value: Any, *, open_low: bool = True, open_high: bool = True) -> float:
    """Return ``value`` as float if it lies in (0, 1) (bounds open as asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = (v > 0 if open_low else v >= 0) and (v < 1 if open_high else v <= 1)
    if not ok:
        lo = "(0" if open_low else "[0"
        hi = "1)" if open_high else "1]"
        raise ConfigurationError(f"`{name}` must be a number in {lo}, {hi}, got {value!r}")
    return float(value)


def optional_path(name: str, value: Any) -> Any:
    """Return ``value`` if it is a path (``str`` or ``os.PathLike``) or ``None``."""
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ConfigurationError(
            f"`{name}` must be a path (str or os.PathLike) or None, got {type(value).__name__}"
        )
    return value


def boolean(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"`{name}` must be a bool, got {value!r}")
    return value


def choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``."""
    options = tuple(allowed)
    if value not in options:
        listed = ", ".join(repr(o) for o in options)
        raise ConfigurationError(f"`{name}` must be one of {listed}, got {value!r}")
    return str(value)


def writable_folder(name: str, value: Any) -> Path:
    """``value`` as a folder that exists and is writable, or can be created; nothing is made.

    Raises:
        ConfigurationError: When it is a file, lies below a file, or cannot be written.
    """
    path = Path(optional_path(name, value))
    if path.exists() and not path.is_dir():
        raise ConfigurationError(f"`{name}` must be a folder, got an existing file: {path}")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigurationError(
            f"`{name}` cannot be created: {existing} is a file, not a folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigurationError(f"`{name}` cannot be written: no permission in {existing}")
    return path
