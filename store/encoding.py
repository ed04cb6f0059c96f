"""Plain JSON values from Python and numpy ones, and back: the one place that decides how a
non-finite float is written.

JSON has no NaN or infinity (``json.dumps`` writes ``NaN``, which strict parsers, browsers and Redis
clients in other languages refuse), so every blob the service stores or serves goes through
`json_safe`. It offers two ways to write a non-finite float, because the two kinds of reader want
different things:

* ``nonfinite="null"`` (the default): ``None``. For what people and dashboards read (events, the
  ``/v1/state`` view): a statistic that is not defined yet is simply absent, and the field stays a
  number or null.
* ``nonfinite="text"``: the strings ``"inf"``, ``"-inf"`` and ``"nan"``. For state that is read
  back (the drift detectors' and policy's), where an infinity is a value (Page-Hinkley's running
  minimum starts at +inf) and must survive the round trip; `float_from_json` and `from_json_safe`
  read it back.

This module sits in `store`, the lowest layer, so `drift` and `service` can share it without either
importing the other.
"""

from __future__ import annotations

import math
from typing import Any, Literal

NonFinite = Literal["null", "text"]
_TEXT = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def json_float(value: float | None) -> float | str | None:
    """One number, as a float, in the reversible form: non-finite ones as "inf", "-inf", "nan".

    Always a float, never an int, so a value that happens to be whole is written the same way
    (``0.0``) as any other: saved state compares equal, byte for byte, across saves.

    >>> [json_float(v) for v in (1, 2.5, float("-inf"), float("nan"), None)]
    [1.0, 2.5, '-inf', 'nan', None]
    """
    if value is None:
        return None
    value = float(value)
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def json_safe(value: Any, *, nonfinite: NonFinite = "null") -> Any:
    """Plain JSON values: dicts (with string keys), lists, numbers, strings, booleans, None.

    Tuples become lists and numpy scalars plain numbers; a non-finite float becomes None, or with
    ``nonfinite="text"`` its `json_float` string. Other values pass through as they are.

    >>> json_safe({"a": float("nan"), "b": (1.5, float("inf"))})
    {'a': None, 'b': [1.5, None]}
    >>> json_safe({"a": float("nan"), "b": (1, float("inf"))}, nonfinite="text")
    {'a': 'nan', 'b': [1, 'inf']}
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v, nonfinite=nonfinite) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, nonfinite=nonfinite) for v in value]
    if hasattr(value, "item") and callable(value.item):  # a numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return json_float(value) if nonfinite == "text" else None
    return value


def float_from_json(value: Any) -> float | None:
    """The inverse of `json_float`, strict: a number, one of its three strings, or None.

    Anything else raises (ValueError for another string, TypeError for another type, booleans
    included), so a tampered or foreign state is refused rather than read as a number.

    >>> float_from_json("-inf"), float_from_json(3), float_from_json(None)
    (-inf, 3.0, None)
    """
    if value is None:
        return None
    if isinstance(value, str) and value not in _TEXT:
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def from_json_safe(value: Any) -> Any:
    """The inverse of ``json_safe(..., nonfinite="text")``: the three strings back to floats.

    Lenient, unlike `float_from_json`: every other value is returned as it is, since a container
    may hold strings of its own.

    >>> from_json_safe({"threshold": "inf", "mode": "up", "window": [1.0, "nan"]})
    {'threshold': inf, 'mode': 'up', 'window': [1.0, nan]}
    """
    if isinstance(value, dict):
        return {k: from_json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json_safe(v) for v in value]
    if isinstance(value, str) and value in _TEXT:
        return _TEXT[value]
    return value
