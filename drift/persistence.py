"""The internals of River's drift detectors, read and written as JSON, to survive a restart.

River's detectors have no public state API: no ``state()``/``load_state()``; and pickle would let
a tampered state run code when loaded, and tie it to River's class layout anyway. So this module
reads each detector's private attributes, one by one, into plain JSON (`dump_internals`), and
writes them back into a freshly built detector (`load_internals`).
`drift.detectors.SignalDetector` keeps the rest of its state (counts, partial chunk,
standardisation, last alarm) itself and calls these two.

What is read, detector by detector, is river 0.26's layout (checked against 0.26.1):

* Page-Hinkley, KSWIN and the binary family (DDM, EDDM, HDDM_A, HDDM_W) are plain numbers, deques
  and `stats.Mean`/`Var` objects. KSWIN's random generator state is a list of ints. HDDM_W's
  exponentially weighted means are Rust objects with no way in but ``update``: they are rebuilt
  through their first update, which takes the value as it is.
* ADWIN's window lives in a Rust object (``river._river_rust.drift.AdaptiveWindowing``) whose only
  way in or out is ``__getstate__``/``__setstate__`` on bincode bytes of a serde struct: not
  pickle, but river decodes them with ``unwrap()``, so malformed bytes raise pyo3's PanicException
  (a BaseException, past any ``except Exception``), and well-formed but inconsistent ones panic
  later, inside ``update``. The state therefore holds the window's decoded fields as JSON (each
  exponential bucket's totals and variances, the counters); loading checks them (capacities, the
  width matching the buckets, finite numbers) before encoding the bytes river expects, and reads
  them back to confirm.

Should a later river move these attributes or change ADWIN's layout, `dump_internals` returns no
internals and the reason rather than failing the save (the caller saves everything else; the
restored detector starts afresh, an ADWIN with an empty window). Loading is strict: every value is
type- and range-checked (`read_count`, `read_finite`), so a tampered state raises ValueError,
TypeError or KeyError before it reaches River, never a panic inside it. Non-finite floats are
written as "inf", "-inf" and "nan" (`store.encoding.json_float`), since some are real values here
(Page-Hinkley's running minimum starts at +inf).
"""

from __future__ import annotations

import math
import random
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import river
from river import drift, stats
from river.drift import binary
from river.drift.binary.hddm_w import SampleInfo

from store.encoding import float_from_json, json_float


def dump_internals(name: str, detector: Any, params: dict) -> tuple[dict | None, str | None]:
    """The River detector's internals as JSON, and None; or None and why they could not be read.

    ``name`` is the detector's key in `drift.detectors.DETECTORS`. A river whose internals moved
    costs the internals only (the window restarts), not the rest of the caller's state.
    """
    try:
        return _CODECS[name][0](detector, params), None
    except (AttributeError, ValueError, struct.error) as error:
        return None, f"river {river.__version__}: {error}"


def load_internals(name: str, detector: Any, params: dict, saved: dict) -> None:
    """Write `dump_internals`' JSON into ``detector``, freshly built with the same parameters.

    Raises ValueError or TypeError (KeyError for a missing field) if ``saved`` does not hold
    together; the detector may then be half written, so the caller builds a throwaway one.
    """
    if not isinstance(saved, dict):
        raise TypeError("a detector's internals are an object")
    _CODECS[name][1](detector, params, saved)


# ---- strict readers of saved values --------------------------------------------------------------

def read_finite(value: Any) -> float:
    """A saved number that must be finite (most are: an infinity would poison River's sums)."""
    number = float_from_json(value)
    if number is None or not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def read_number(value: Any) -> float:
    """A saved number that may be infinite (River starts some extremes at ±inf), never null."""
    number = float_from_json(value)
    if number is None:
        raise ValueError(f"expected a number, got {value!r}")
    return number


def read_count(value: Any) -> int:
    """A saved non-negative int (not a bool, not a float that happens to be whole)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a count, got {value!r}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


# ---- River internals, detector by detector -------------------------------------------------------
# Each dump reads River 0.26's attributes; each load writes them into a freshly built detector.

def _dump_mean(mean: stats.Mean) -> dict[str, Any]:
    return {"n": json_float(mean.n), "mean": json_float(mean._mean)}


def _load_mean(saved: dict[str, Any]) -> stats.Mean:
    mean = stats.Mean()
    mean.n, mean._mean = read_finite(saved["n"]), read_finite(saved["mean"])
    if mean.n < 0:
        raise ValueError("a negative count in a mean")
    return mean


def _dump_var(var: stats.Var) -> dict[str, Any]:
    return {"mean": _dump_mean(var.mean), "S": json_float(var._S)}


def _load_var(saved: dict[str, Any], ddof: int) -> stats.Var:
    var = stats.Var(ddof=ddof)
    var.mean, var._S = _load_mean(saved["mean"]), read_finite(saved["S"])
    return var


def _flags(detector: Any) -> dict[str, bool]:
    flags = {"drift": detector._drift_detected}
    if hasattr(detector, "_warning_detected"):
        flags["warning"] = detector._warning_detected
    return flags


def _load_flags(detector: Any, saved: dict[str, Any]) -> None:
    detector._drift_detected = _flag(saved["drift"])
    if hasattr(detector, "_warning_detected"):
        detector._warning_detected = _flag(saved["warning"])


def _dump_page_hinkley(detector: drift.PageHinkley, params: dict) -> dict[str, Any]:
    return {**_flags(detector), "x_mean": _dump_mean(detector._x_mean),
            "sum_increase": json_float(detector._sum_increase),
            "sum_decrease": json_float(detector._sum_decrease),
            "min_increase": json_float(detector._min_increase),
            "max_decrease": json_float(detector._max_decrease)}


def _load_page_hinkley(detector: drift.PageHinkley, params: dict, saved: dict) -> None:
    detector._x_mean = _load_mean(saved["x_mean"])
    detector._sum_increase = read_finite(saved["sum_increase"])
    detector._sum_decrease = read_finite(saved["sum_decrease"])
    detector._min_increase = read_number(saved["min_increase"])  # inf until the first update
    # River starts it at the int -1, so its inferred type is int; it holds floats after an update
    detector._max_decrease = read_finite(saved["max_decrease"])  # type: ignore[assignment]
    _load_flags(detector, saved)


def _dump_kswin(detector: drift.KSWIN, params: dict) -> dict[str, Any]:
    version, internal, gauss = detector._rng.getstate()
    return {**_flags(detector), "window": [json_float(v) for v in detector.window],
            "n": detector.n, "p_value": json_float(detector.p_value),
            "rng": {"version": version, "internal": list(internal), "gauss": json_float(gauss)}}


def _load_kswin(detector: drift.KSWIN, params: dict, saved: dict) -> None:
    window = [read_finite(v) for v in saved["window"]]
    if len(window) > detector.window_size:
        raise ValueError(f"a window of {len(window)} values, window_size is "
                         f"{detector.window_size}")
    detector.window = deque(window, maxlen=detector.window_size)
    detector.n = read_count(saved["n"])
    # River starts it at the int 0, so its inferred type is int; the KS test makes it a float
    detector.p_value = read_finite(saved["p_value"])  # type: ignore[assignment]
    rng = saved["rng"]
    internal = rng["internal"]
    if not (isinstance(internal, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                               for i in internal)):
        raise TypeError("the KSWIN generator state is a list of ints")
    generator = random.Random()
    generator.setstate((rng["version"], tuple(internal), float_from_json(rng["gauss"])))
    detector._rng = generator
    _load_flags(detector, saved)


def _dump_ddm(detector: binary.DDM, params: dict) -> dict[str, Any]:
    return {**_flags(detector), "p": _dump_mean(detector._p), "p_min": json_float(detector._p_min),
            "s_min": json_float(detector._s_min), "ps_min": json_float(detector._ps_min)}


def _load_ddm(detector: binary.DDM, params: dict, saved: dict) -> None:
    detector._p = _load_mean(saved["p"])
    detector._p_min = None if saved["p_min"] is None else read_finite(saved["p_min"])
    detector._s_min = None if saved["s_min"] is None else read_finite(saved["s_min"])
    detector._ps_min = read_number(saved["ps_min"])  # inf until warm
    _load_flags(detector, saved)


def _dump_eddm(detector: binary.EDDM, params: dict) -> dict[str, Any]:
    return {**_flags(detector), "distances": _dump_var(detector._error_distances),
            "n": detector._n, "last_error": detector._last_error,
            "n_errors": detector._n_errors, "p2s_prime_max": json_float(detector._p2s_prime_max)}


def _load_eddm(detector: binary.EDDM, params: dict, saved: dict) -> None:
    detector._error_distances = _load_var(saved["distances"], detector._error_distances.ddof)
    detector._n = read_count(saved["n"])
    detector._last_error = read_count(saved["last_error"])
    detector._n_errors = read_count(saved["n_errors"])
    # River starts it at the int -1, so its inferred type is int; it holds floats after an error
    detector._p2s_prime_max = read_finite(saved["p2s_prime_max"])  # type: ignore[assignment]
    _load_flags(detector, saved)


def _dump_hddm_a(detector: binary.HDDMA, params: dict) -> dict[str, Any]:
    return {**_flags(detector), "z": _dump_mean(detector._z),
            "x_min": _dump_mean(detector._x_min), "x_max": _dump_mean(detector._x_max)}


def _load_hddm_a(detector: binary.HDDMA, params: dict, saved: dict) -> None:
    detector._z = _load_mean(saved["z"])
    detector._x_min = _load_mean(saved["x_min"])
    detector._x_max = _load_mean(saved["x_max"])
    _load_flags(detector, saved)


_HDDM_W_SAMPLES = ("_total", "_s1_decr", "_s1_incr", "_s2_decr", "_s2_incr")


def _dump_sample_info(info: SampleInfo) -> dict[str, Any]:
    return {"ewma": json_float(info.ewma), "init": info.is_init, "ibc": json_float(info.ibc)}


def _load_sample_info(saved: dict[str, Any], lambda_val: float) -> SampleInfo:
    info = SampleInfo(lambda_val)
    if _flag(saved["init"]):
        # the exponentially weighted mean (a Rust object) takes its first value as it is
        info._ewma.update(read_finite(saved["ewma"]))
        info._is_init = True
    info._ibc = read_finite(saved["ibc"])
    return info


def _dump_hddm_w(detector: binary.HDDMW, params: dict) -> dict[str, Any]:
    return {**_flags(detector),
            **{name[1:]: _dump_sample_info(getattr(detector, name)) for name in _HDDM_W_SAMPLES},
            "incr_cutpoint": json_float(detector._incr_cutpoint),
            "decr_cutpoint": json_float(detector._decr_cutpoint)}


def _load_hddm_w(detector: binary.HDDMW, params: dict, saved: dict) -> None:
    for name in _HDDM_W_SAMPLES:
        setattr(detector, name, _load_sample_info(saved[name[1:]], detector.lambda_val))
    detector._incr_cutpoint = read_number(saved["incr_cutpoint"])
    detector._decr_cutpoint = read_number(saved["decr_cutpoint"])
    _load_flags(detector, saved)


# ADWIN's window: the bincode (v1: little-endian, fixed-width ints, u64 lengths) encoding of
# river 0.26's RsAdaptiveWindowing = {inner: AdaptiveWindowing, delta, clock, max_buckets,
# min_window_length, grace_period}; see river's rust_src/adwin.rs and pyo3_bindings.rs.
_ADWIN_INNER = struct.Struct("<diQddddddiiii")
_ADWIN_OUTER = struct.Struct("<diQii")
_U64 = struct.Struct("<Q")
_I32_MAX = 2**31 - 1


def _adwin_decode(blob: bytes, params: dict) -> dict[str, Any]:
    (delta, clock, max_buckets, min_window, grace, total, variance, width, total_width,
     n_buckets, max_n_buckets, tick, n_detections) = _ADWIN_INNER.unpack_from(blob, 0)
    offset = _ADWIN_INNER.size
    (count,), offset = _U64.unpack_from(blob, offset), offset + 8
    buckets = []
    for _ in range(count):
        (max_size,), (current,) = _U64.unpack_from(blob, offset), _U64.unpack_from(blob, offset + 8)
        offset += 16
        columns = []
        for _column in range(2):
            (length,), offset = _U64.unpack_from(blob, offset), offset + 8
            values = struct.unpack_from(f"<{length}d", blob, offset)
            offset += 8 * length
            if length != max_buckets + 1 or any(values[current:]):
                raise ValueError("an ADWIN bucket laid out unlike river 0.26's")
            columns.append([json_float(v) for v in values[:current]])
        if max_size != max_buckets:
            raise ValueError("an ADWIN bucket laid out unlike river 0.26's")
        buckets.append({"count": current, "totals": columns[0], "variances": columns[1]})
    outer = _ADWIN_OUTER.unpack_from(blob, offset)
    if offset + _ADWIN_OUTER.size != len(blob):
        raise ValueError("ADWIN's window bytes are longer than river 0.26's layout")
    expected = (params["delta"], params["clock"], params["max_buckets"],
                params["min_window_length"], params["grace_period"])
    if outer != expected or (delta, clock, max_buckets, min_window, grace) != expected:
        raise ValueError("ADWIN's window bytes do not carry its parameters where river 0.26 does")
    return {"total": json_float(total), "variance": json_float(variance),
            "width": json_float(width), "total_width": json_float(total_width),
            "n_buckets": n_buckets,
            "max_n_buckets": max_n_buckets, "tick": tick, "n_detections": n_detections,
            "buckets": buckets}


def _adwin_encode(saved: dict[str, Any], params: dict) -> bytes:
    max_buckets = params["max_buckets"]
    buckets = saved["buckets"]
    if not isinstance(buckets, list) or not 1 <= len(buckets) <= 60:
        raise ValueError("ADWIN's window needs 1 to 60 buckets")
    parts, width = [], 0
    for index, bucket in enumerate(buckets):
        count = read_count(bucket["count"])
        totals = [read_finite(v) for v in bucket["totals"]]
        variances = [read_finite(v) for v in bucket["variances"]]
        if count > max_buckets + 1 or len(totals) != count or len(variances) != count:
            raise ValueError(f"ADWIN bucket {index} holds {count} entries, at most "
                             f"{max_buckets + 1}, with as many totals and variances")
        if count == 0 and index == len(buckets) - 1 and index > 0:
            raise ValueError("ADWIN's oldest bucket is empty")
        width += count << index
        padding = [0.0] * (max_buckets + 1 - count)
        parts.append(_U64.pack(max_buckets) + _U64.pack(count))
        for column in (totals, variances):
            parts.append(_U64.pack(max_buckets + 1) + struct.pack(f"<{max_buckets + 1}d",
                                                                  *column, *padding))
    if read_finite(saved["width"]) != width:
        raise ValueError(f"ADWIN's width {saved['width']} is not its buckets' {width}")
    counters = [saved[key] for key in ("n_buckets", "max_n_buckets", "tick", "n_detections")]
    if not all(isinstance(c, int) and not isinstance(c, bool) and abs(c) <= _I32_MAX
               for c in counters):
        raise ValueError("ADWIN's counters are 32-bit integers")
    head = _ADWIN_INNER.pack(
        params["delta"], params["clock"], max_buckets, float(params["min_window_length"]),
        float(params["grace_period"]), read_finite(saved["total"]), read_finite(saved["variance"]),
        float(width), read_finite(saved["total_width"]), *counters)
    tail = _ADWIN_OUTER.pack(params["delta"], params["clock"], max_buckets,
                             params["min_window_length"], params["grace_period"])
    return head + _U64.pack(len(buckets)) + b"".join(parts) + tail


def _adwin_params(detector: drift.ADWIN) -> dict[str, Any]:
    return {"delta": float(detector.delta), "clock": int(detector.clock),
            "max_buckets": int(detector.max_buckets),
            "min_window_length": int(detector.min_window_length),
            "grace_period": int(detector.grace_period)}


def _dump_adwin(detector: drift.ADWIN, params: dict) -> dict[str, Any]:
    blob = detector._helper.__getstate__()
    layout = _adwin_params(detector)
    saved = _adwin_decode(blob, layout)
    if _adwin_encode(saved, layout) != blob:
        raise ValueError("ADWIN's window does not survive a decode and encode")
    return {**_flags(detector), "window": saved}


def _load_adwin(detector: drift.ADWIN, params: dict, saved: dict) -> None:
    blob = _adwin_encode(saved["window"], _adwin_params(detector))
    detector._helper.__setstate__(blob)
    if detector._helper.__getstate__() != blob:
        raise ValueError("river did not take ADWIN's window as given")
    _load_flags(detector, saved)


_CODECS: dict[str, tuple[Callable, Callable]] = {
    "adwin": (_dump_adwin, _load_adwin),
    "page_hinkley": (_dump_page_hinkley, _load_page_hinkley),
    "kswin": (_dump_kswin, _load_kswin),
    "ddm": (_dump_ddm, _load_ddm),
    "eddm": (_dump_eddm, _load_eddm),
    "hddm_a": (_dump_hddm_a, _load_hddm_a),
    "hddm_w": (_dump_hddm_w, _load_hddm_w),
}
