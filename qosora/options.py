"""Options declared once: a dataclass field carries its type, default, bounds and help; the rest is derived.

    rank: int = option(64, "adapter rank r", min=1)
    method: Method = option("sorsa", "adapter method")          # Method = Literal["sorsa", ...]

`check(obj)` validates every field against its type (Literal choices, int / float / bool, finite numbers) and its
bounds; `add_arguments(parser, Cls)` makes the argparse flags (name, choices, default, help) from the same fields;
`from_args(Cls, args)` builds the dataclass back from the parsed flags. The CLI restates nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, Literal

from qosora.errors import QosoraError

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, flag: str | None = None, min: float | None = None,
           gt: float | None = None, max: float | None = None, cli: bool = True, default_factory: Any = _MISSING):
    """A dataclass field with its CLI flag (default `--field-name`), bounds (`min` <=, `gt` <) and help text."""
    metadata = {"help": help, "flag": flag, "min": min, "gt": gt, "max": max, "cli": cli}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def same_option(cls, name: str, **changes):
    """A field declared like `cls.name` (help, flag, bounds, default), for an option two dataclasses share:
    `qosora plan`'s seq_len is the training run's `seq_len`, with its own default."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    kw = {"default": f.default, "help": f.metadata.get("help", ""), "flag": f.metadata.get("flag"),
          "min": f.metadata.get("min"), "gt": f.metadata.get("gt"), "max": f.metadata.get("max"),
          "cli": f.metadata.get("cli", True)}
    kw.update(changes)
    return option(kw.pop("default"), kw.pop("help"), **kw)


def choices(tp) -> tuple | None:
    """The values of a Literal type (also inside `X | None`), else None."""
    tp = _strip_optional(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check(obj) -> None:
    """Raise QosoraError naming the flag for the first field whose value breaks its type or bounds."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            check(value)
            continue
        if value is None:
            continue
        name = flag_of(f)
        allowed = choices(tp)
        if allowed is not None:
            if value not in allowed:
                raise QosoraError(f"unknown {name} {value!r}: choose one of {', '.join(map(str, allowed))}")
            continue
        base = _strip_optional(tp)
        if base is bool and not isinstance(value, bool):
            raise QosoraError(f"{name} must be true or false, got {value!r}")
        if base is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise QosoraError(f"{name} must be an integer, got {value!r}")
        if base is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise QosoraError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise QosoraError(f"{name} must be a finite number, got {value!r}")
        lo, gt, hi = f.metadata.get("min"), f.metadata.get("gt"), f.metadata.get("max")
        if lo is not None and value < lo:
            raise QosoraError(f"{name} must be >= {lo:g}, got {value!r}")
        if gt is not None and value <= gt:
            raise QosoraError(f"{name} must be > {gt:g}, got {value!r}")
        if hi is not None and value > hi:
            raise QosoraError(f"{name} must be <= {hi:g}, got {value!r}")


def _dest(cls, f: dataclasses.Field) -> str:
    return f"{cls.__name__}.{f.name}"


def add_arguments(parser, cls, only: typing.Iterable[str] | None = None, defaults: dict | None = None) -> None:
    """Add one flag per CLI field of `cls` (all, or those named in `only`) to an argparse parser or group.

    `defaults` overrides a field's default for this verb only (e.g. `qosora demo --steps 60`).
    """
    hints, names = _hints(cls), None if only is None else set(only)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True) or (names is not None and f.name not in names):
            continue
        tp, base = hints[f.name], _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(base):
            continue
        default = defaults.get(f.name, None if f.default is _MISSING else f.default)
        required = f.default is _MISSING and f.default_factory is _MISSING and f.name not in defaults
        text = f.metadata.get("help", "")
        kw: dict[str, Any] = {"dest": _dest(cls, f), "help": text}
        allowed = choices(tp)
        if base is bool:
            if default is None:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["action"] = "store_false" if default else "store_true"
            kw["default"] = default
        else:
            kw.update(default=default, required=required)
            if allowed is not None:
                kw.update(choices=allowed, type=type(allowed[0]))
            elif base in (int, float, str):
                kw.update(type=base, metavar=f.name.upper())
            if default is not None and not required:
                kw["help"] = f"{text} (default: {default})" if text else f"default: {default}"
        parser.add_argument(flag_of(f), **kw)


def from_args(cls, args: argparse.Namespace, **overrides):
    """The dataclass `cls` from the flags `add_arguments` made; fields without a flag keep their defaults."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        dest = _dest(cls, f)
        if hasattr(args, dest):
            kwargs[f.name] = getattr(args, dest)
    kwargs.update(overrides)
    return cls(**kwargs)
