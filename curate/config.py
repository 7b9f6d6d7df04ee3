"""Step settings as dataclasses: one field per setting, with its default and help text.

A step's dataclass is the single source for its CLI options
(:func:`cli_options` adds one typer option per field) and its recipe keys
(:func:`from_mapping` refuses unknown keys and wrong types, naming the
recipe key), so the two cannot drift apart::

    @dataclass
    class TrainConfig:
        lr: float = setting(1e-6, "Peak learning rate.")

Fields whose CLI text needs parsing (``"auto"`` or a number) carry a
``parse`` function in their metadata; their CLI option takes a string.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
import typing
from typing import Any, Callable, Optional, Union

from curate.errors import CurateError


def setting(default: Any, help: str, *, parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field with help text (and, for text options such as 'auto', a parser of the CLI string)."""
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """Each field's accepted value types, ``type(None)`` included where the field is optional."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        members = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
        out[f.name] = tuple(members)
    return out


def _accepts(value: Any, allowed: tuple[Any, ...]) -> bool:
    for kind in allowed:
        if typing.get_origin(kind) in (list, tuple):  # e.g. tuple[int, ...]: a YAML list of those
            inner = [k for k in typing.get_args(kind) if k is not Ellipsis]
            if isinstance(value, (list, tuple)) and all(_accepts(v, tuple(inner)) for v in value):
                return True
            continue
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind not in (int, float) and isinstance(value, kind):
            return True
    return False


def _describe(allowed: tuple[Any, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a text", bool: "true or false", type(None): "null"}
    return " or ".join(names.get(k, "a list" if typing.get_origin(k) in (list, tuple) else getattr(k, "__name__", str(k)))
                       for k in allowed)


def unknown_key_error(keys: Any, valid: Any, key: Callable[[str], str]) -> CurateError | None:
    """The one-sentence error for the first of ``keys`` not in ``valid`` (None if all are known)."""
    unknown = sorted(set(keys) - set(valid))
    if not unknown:
        return None
    return CurateError(f"{key(unknown[0])} is not a setting; the valid keys there are {', '.join(sorted(valid))}")


def from_mapping(cls: type, values: dict[str, Any], key: Callable[[str], str]) -> Any:
    """An instance of ``cls`` from recipe values; unknown keys and wrong types are refused naming ``key(name)``."""
    types_ = field_types(cls)
    error = unknown_key_error(values, types_, key)
    if error is not None:
        raise error
    converted = {}
    for name, value in values.items():
        if not _accepts(value, types_[name]):
            raise CurateError(f"{key(name)} must be {_describe(types_[name])}, got {value!r}")
        converted[name] = float(value) if types_[name][0] is float and isinstance(value, int) else value
    return cls(**converted)


def check_finite(cfg: Any, key: Callable[[str], str]) -> None:
    """Refuse NaN / infinite values of number fields (a NaN learning rate only shows up as a NaN loss later)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise CurateError(f"{key(f.name)} must be a finite number, got {value}")


def _cli_annotation(allowed: tuple[type, ...], parse) -> Any:
    if parse is not None:
        return str
    real = [k for k in allowed if k is not type(None)]
    kind = real[0]
    return Optional[kind] if type(None) in allowed else kind


def cli_options(cls: type) -> Callable[[Callable], Callable]:
    """Decorate a typer command ``fn(..., config: cls)``: every field of ``cls`` becomes an option of it.

    The command receives the options as one ``config`` instance (strings of
    ``parse`` fields parsed, validation left to the command's library call).
    """
    import typer

    types_ = field_types(cls)

    def decorate(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != "config"]
        hints = typing.get_type_hints(fn)
        clash = {p.name for p in own} & set(types_)
        if clash:
            raise TypeError(f"{fn.__name__} repeats config options {sorted(clash)}")
        added = []
        annotations = {p.name: hints.get(p.name, Any) for p in own}
        for f in dataclasses.fields(cls):
            parse = f.metadata.get("parse")
            annotation = _cli_annotation(types_[f.name], parse)
            default = str(f.default) if parse is not None else f.default
            added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                           default=typer.Option(default, help=f.metadata.get("help", ""))))
            annotations[f.name] = annotation

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values = {}
            for f in dataclasses.fields(cls):
                value = kwargs.pop(f.name)
                parse = f.metadata.get("parse")
                values[f.name] = parse(value) if parse is not None and isinstance(value, str) else value
            return fn(*args, **kwargs, config=cls(**values))

        wrapper.__signature__ = inspect.Signature(
            [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added)
        wrapper.__annotations__ = annotations
        del wrapper.__wrapped__  # typer must read the signature above, not fn's
        return wrapper

    return decorate
