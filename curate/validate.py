"""Option checks that run before any data or model loads: one sentence with the fix each.

Typer turns ``--lr nan`` into a float NaN and ``--limit -3`` into -3; these
helpers refuse such values at the command line, naming the option. They
import nothing heavy, so any module (the CLI, recipes) can use them.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

from curate.errors import CurateError

DTYPES = ("auto", "fp32", "float32", "bf16", "bfloat16", "bf16-mixed", "fp16", "float16")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def number(option: str, value: float | None, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, example: str | None = None) -> float | None:
    """A finite number within the bounds (None passes: the option was not given)."""
    if value is None:
        return None
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        want = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        hint = f", e.g. {option} {example}" if example else ""
        raise CurateError(f"{option} must be {want}, got {value}{hint}")
    return value


def integer(option: str, value: int | None, *, low: int = 1, example: str | None = None) -> int | None:
    """An integer >= ``low`` (None passes)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        hint = f", e.g. {option} {example}" if example else ""
        raise CurateError(f"{option} must be a whole number >= {low}, got {value}{hint}")
    return value


def choice(option: str, value: str | None, allowed: Iterable[str]) -> str | None:
    allowed = tuple(allowed)
    if value is not None and value not in allowed:
        raise CurateError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def device(value: str, option: str = "--device") -> str:
    """auto, cpu, mps, cuda or cuda:N (whether that device exists is checked when it is used)."""
    if not isinstance(value, str) or not _DEVICE.match(value.strip()):
        raise CurateError(f"{option} must be auto, cpu, cuda or cuda:N, got {value!r}")
    return value.strip()


def dtype(value: str, allowed: Iterable[str] = DTYPES, option: str = "--dtype") -> str:
    return choice(option, value, allowed)


def fraction(option: str, value: float | None, *, allow_zero: bool = True, example: str = "0.1") -> float | None:
    """A fraction in [0, 1) (or (0, 1) without ``allow_zero``)."""
    return number(option, value, low=0.0, high=1.0, low_open=not allow_zero, high_open=True, example=example)


def percentage(option: str, value: float | None) -> float | None:
    """A percentage in (0, 100]."""
    return number(option, value, low=0.0, high=100.0, low_open=True, example="10")


def numbers(option: str, text: str, **bounds: Any) -> list[float]:
    """Comma-separated numbers, each checked like :func:`number`."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CurateError(f"{option} takes comma-separated numbers, e.g. 0.1,0.5, not {text!r}") from None
    if not values:
        raise CurateError(f"{option} needs at least one number, e.g. 0.1,0.5")
    for value in values:
        number(option, value, **bounds)
    return values
