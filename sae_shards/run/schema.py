"""From plain containers to config dataclasses: types checked, unknown keys named.

``build_dataclass`` turns a dict (Hydra's container, a checkpoint's JSON, a callback's keyword
argument) into a config dataclass, recursively, checking each value against its field's
annotation (``Literal`` choices, lists, optional values, finite numbers) and naming the dotted
field, and for an unknown key the closest known one. ``check_fields`` applies the same checks to
a dataclass built in Python (``CaptureConfig(source=...)``), from its ``__post_init__``.
Standard library only.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Mapping


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """Build ``cls`` from a plain dict, recursively, rejecting unknown keys and wrong types."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    types_ = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        hints = [f"{prefix}{k} (did you mean {prefix}{close}?)" if close else prefix + k
                 for k in unknown for close in [closest(k, known)]]
        raise ValueError(f"unknown config keys {hints}; {where} takes {sorted(known)}")
    return cls(**coerce_fields(cls, data, prefix, types_))


def check_fields(obj: Any, prefix: str) -> None:
    """Check the fields of the config dataclass ``obj`` as ``build_dataclass`` checks a dict's
    values, naming ``prefix + field``: what a config built in Python, not from a dict, is held
    to. An int given for a float field is stored as the float (frozen dataclasses included); a
    nested config dataclass is taken as it is (its own ``__post_init__`` checked it)."""
    types_ = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        checked = _coerce(types_[f.name], value, prefix + f.name, _unbounded(f))
        if checked is not value:  # int -> float, a list's or mapping's items checked
            object.__setattr__(obj, f.name, checked)


def coerce_fields(cls: type, data: Mapping[str, Any], prefix: str,
                  types_: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``data`` (keys that are fields of dataclass ``cls``) checked against the fields'
    annotations, each error naming ``prefix + field``: what ``build_dataclass`` builds from, and
    how a mapping of options (``task.options``) is checked before it reaches its class."""
    types_ = typing.get_type_hints(cls) if types_ is None else types_
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    return {name: _coerce(types_[name], value, prefix + name, _unbounded(fields_.get(name)))
            for name, value in data.items()}


UNBOUNDED = "unbounded"
"""A float field's metadata key: ``inf`` is a value it takes (no limit), not a mistake."""


def _unbounded(f: dataclasses.Field | None) -> bool:
    return f is not None and bool(f.metadata.get(UNBOUNDED))


def closest(name: str, known: Any) -> str | None:
    """The known name a mistyped ``name`` most likely meant (case ignored: ``sae.K`` is
    ``sae.k``), or None."""
    by_lower = {k.lower(): k for k in known}
    match = difflib.get_close_matches(name.lower(), list(by_lower), n=1)
    return by_lower[match[0]] if match else None


def _coerce(tp: Any, value: Any, name: str, unbounded: bool = False) -> Any:
    """Check ``value`` against a field's annotation (ints are accepted where floats are; inf
    only where the field is ``unbounded``)."""
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build_dataclass(tp, value, name + ".")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{name}={value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            shown = (f"; a list of one is written [{value!r}] (on the command line "
                     f"{name}=[{value}], quoted in a shell: '{name}=[{value}]')"
                     if isinstance(value, (str, int, float)) else "")
            raise ValueError(f"{name}: expected a list, got {value!r}{shown}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:  # fixed length, e.g. tuple[int, int], or tuple[int, ...]
        items = typing.get_args(tp)
        if len(items) == 2 and items[1] is Ellipsis and isinstance(value, (list, tuple)):
            items = (items[0],) * len(value)
        if len(items) == 2 and items[1] is Ellipsis:  # not a list: any length is wanted
            raise ValueError(f"{name}: expected a list of {items[0].__name__}, got {value!r}")
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ValueError(f"{name}: expected a list of {len(items)} "
                             f"({', '.join(t.__name__ for t in items)}), got {value!r}")
        return tuple(_coerce(t, v, f"{name}[{i}]") for i, (t, v) in enumerate(zip(items, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        key_t, value_t = typing.get_args(tp) or (Any, Any)
        return {_coerce(key_t, k, f"{name} key {k!r}"): _coerce(value_t, v, f"{name}.{k}")
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (tp is float and isinstance(value, float) and not math.isfinite(value)
            and not (unbounded and value == math.inf)):
        raise ValueError(f"{name}={value}: expected a finite number")
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        quote = (f" (quote it to keep it text: {name}='{value}', or \"{name}='{value}'\" in a "
                 "shell)" if tp is str and isinstance(value, (int, float, bool)) else "")
        raise ValueError(f"{name}: expected {tp.__name__}, got {type(value).__name__} "
                         f"{value!r}{quote}")
    return value


def unknown_key_error(dotted: str, root: type) -> str | None:
    """Why the dotted key ``dotted`` (e.g. from a command-line override) names no field of the
    dataclass ``root``,
    with the closest field; None when it does. Keys below a ``dict`` field (``task.options.*``,
    ``rl.extra.*``) are free-form and accepted here."""
    cls, parts = root, dotted.split(".")
    for i, part in enumerate(parts):
        fields_ = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields_:
            where = ".".join(parts[:i]) or "config"
            close = closest(part, fields_)
            elsewhere = field_paths(root, part)  # the name, misplaced (max_steps, rl.seed)
            guess = (elsewhere[0] if elsewhere else
                     ".".join([*parts[:i], close]) if close else None)
            hint = f"; did you mean {guess}?" if guess else f"; {where} takes {sorted(fields_)}"
            return f"{dotted!r} is not a config field{hint}"
        tp = _hint(cls, part)
        if not dataclasses.is_dataclass(tp):
            rest = parts[i + 1:]
            if rest and typing.get_origin(tp) is not dict:
                return f"{dotted!r}: {'.'.join(parts[:i + 1])} is a value, not a section"
            return None
        cls = tp
    return None


def field_paths(root: type, name: str, prefix: str = "") -> list[str]:
    """The dotted paths of every field named ``name`` in the dataclass ``root`` and the
    dataclasses below it, shallowest first (``checkpoint_every`` -> ``runner.checkpoint_every``)."""
    here, below = [], []
    for f in dataclasses.fields(root):
        if f.name == name:
            here.append(prefix + name)
        tp = _hint(root, f.name)
        if dataclasses.is_dataclass(tp):
            below += field_paths(tp, name, f"{prefix}{f.name}.")
    return here + below


def _hint(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]
