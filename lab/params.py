"""Notebook parameters checked in the notebook's first cell after papermill's injection: papermill
injects whatever it is given (`-p iters abc` is the string "abc"), so a wrong type or an out-of-range
value is refused here with one message saying what to change, before anything runs or is written."""

from __future__ import annotations

import math
from collections.abc import Iterable, MutableMapping
from typing import Any

from lab.errors import LabError

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


def _as_type(name: str, value: Any, typ: type) -> Any:
    """The value as the declared type (text from `papermill -r` is parsed), else LabError."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            v = float(value)
        elif isinstance(value, str):
            try:
                v = float(value.strip())
            except ValueError:
                v = None
        else:
            v = None
        if v is not None and math.isfinite(v):
            return v
        if v is not None:
            raise LabError(f"parameter {name}: {value!r} is not a finite number; pass e.g. -p {name} 1.0")
    elif typ is str:
        if isinstance(value, str):
            return value
    else:  # a type this check does not know: leave it to the notebook
        return value
    raise LabError(f"parameter {name}: {value!r} is not {_NAMES[typ]}; pass e.g. -p {name} {_example(typ)}")


def _example(typ: type) -> str:
    return {int: "1", float: "1.0", bool: "True", str: "value"}[typ]


def validate_notebook_params(
    namespace: MutableMapping[str, Any],
    positive: Iterable[str] = (),
    nonneg: Iterable[str] = (),
    fraction: Iterable[str] = (),
) -> dict[str, Any]:
    """Check every annotated parameter of the notebook (`name: type = default` in the parameters cell)
    against its type, and the named ones against their range; convert text to the declared type in
    `namespace` (the notebook's globals()). Returns the checked values. Raises LabError on the first
    bad one, naming the parameter and what to pass instead."""
    annotations = namespace.get("__annotations__") or {}
    checked: dict[str, Any] = {}
    for name, typ in annotations.items():
        if name not in namespace or not isinstance(typ, type):
            continue
        namespace[name] = checked[name] = _as_type(name, namespace[name], typ)
    for name in positive:
        if name in checked and not checked[name] > 0:
            raise LabError(f"parameter {name}: {checked[name]!r} must be > 0")
    for name in nonneg:
        if name in checked and not checked[name] >= 0:
            raise LabError(f"parameter {name}: {checked[name]!r} must be >= 0")
    for name in fraction:
        if name in checked and not 0 < checked[name] <= 1:
            raise LabError(f"parameter {name}: {checked[name]!r} must be a fraction in (0, 1]")
    return checked
