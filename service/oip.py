"""The Open Inference Protocol (KServe v2) over HTTP: its bodies, and its tensors to and from numpy.

A request is a JSON object, optionally followed by raw tensors (the binary tensor data extension:
the `Inference-Header-Content-Length` header gives the JSON's length, and each input that comes
raw says its `binary_data_size`; raw tensors are little-endian, row-major, in the order of the
inputs). Tensors given in JSON are row-major lists, flat or nested to their shape. An answer's
outputs come as JSON lists or, where asked (`binary_data` on an output, `binary_data_output` on
the request), raw after the JSON in the same way.

Everything here is pure and runs in a worker thread for the routes (`service.routes.oip`): a
request that breaks the protocol raises `ProtocolError` with a sentence that says what to change
(HTTP 400). The pydantic models are the contract that the OpenAPI schema shows; the routes read
the raw bytes, so a body of a million numbers never becomes a million pydantic objects.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import numpy as np
import orjson
from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic.json_schema import SkipJsonSchema
from typing_extensions import TypeAliasType

from service.inputs import repeated_key

# the header that gives the length of the JSON part when raw tensors follow it
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_MEDIA_TYPE = "application/octet-stream"
# what a tensor's elements are, by the protocol's names; little-endian as the extension says
NUMPY_TYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    # bfloat16 is the upper half of a float32: read as 16-bit words and widened (`_from_raw`);
    # JSON has no bfloat16, so a BF16 tensor comes raw only (as tritonclient sends it)
    "BF16": np.dtype("<u2"),
}
NUMERIC_TYPES = tuple(NUMPY_TYPES)
DATATYPES = (*NUMERIC_TYPES, "BYTES")
# the most bytes of JSON a request's header may hold besides its tensors' numbers (ids, names,
# parameters): what bounds a parse before the shapes are known
HEADER_SLACK = 64 * 1024
# a length in bytes: digits only (no sign, no spaces, no other script's digits), and few enough
# that int() is cheap and the value fits any body
LENGTH_PATTERN = re.compile(r"[0-9]{1,19}")


class ProtocolError(ValueError):
    """The request breaks the protocol or does not fit the model; the message says what to change
    (HTTP 400, `{"error": message}`)."""


class InflatedTooLarge(ValueError):
    """A compressed body inflates to more than the bodies taken (HTTP 413, as a body sent that
    large uncompressed gets)."""


# --- the contract, for the OpenAPI schema -------------------------------------------------------

ParameterValue = StrictBool | StrictInt | StrictFloat | StrictStr
Parameters = Annotated[
    dict[str, ParameterValue],
    Field(description="name/value pairs; a value is a string, a number or a boolean"),
]
# mypy cannot follow a recursive TypeAliasType (pydantic can)
TensorData = TypeAliasType(  # type: ignore[misc]
    "TensorData",
    Union[StrictFloat, StrictInt, StrictBool, StrictStr, list["TensorData"]],  # type: ignore[misc]  # noqa: UP007
)
Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                   "INT64", "FP16", "FP32", "FP64", "BF16", "BYTES"]


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _optional(description: str) -> Any:
    """A field that is left out, never null, when it says nothing."""
    return Field(None, json_schema_extra=_no_default, description=description)


class InferenceErrorResponse(BaseModel):
    """Every error under /v2, as the protocol shapes it."""

    error: str = Field(description="what went wrong and what to change, in one sentence")


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(description="binary_tensor_data, classification, feedback")


class ServerLiveResponse(BaseModel):
    live: bool


class ServerReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool


class MetadataTensor(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int] = Field(description="-1 for a dimension of any size (the batch)")


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str] = Field(description="the model version (the weights' digest)")
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: Parameters | SkipJsonSchema[None] = _optional(
        "adaptd's own: task, adapter, adapter_version (it moves as the adapter learns), "
        "set_encoding, level, feedback_model")


class RequestInput(BaseModel):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: Datatype
    parameters: Parameters | SkipJsonSchema[None] = _optional(
        "binary_data_size: this tensor's bytes after the JSON (binary tensor data extension)")
    data: TensorData | SkipJsonSchema[None] = _optional(
        "row-major elements, flat or nested to `shape`; left out when the tensor comes raw")


class RequestOutput(BaseModel):
    name: str
    parameters: Parameters | SkipJsonSchema[None] = _optional(
        "binary_data: true for this output raw after the JSON, false for it in JSON (left out: "
        "as the request's binary_data_output); classification: k for the k most probable "
        "classes")


class InferenceRequest(BaseModel):
    id: str | SkipJsonSchema[None] = _optional("echoed in the answer")
    parameters: Parameters | SkipJsonSchema[None] = _optional(
        "binary_data_output: true for every output raw; prediction_ids: the samples' ids, "
        "separated by spaces; group: the group the samples belong to (conformal.mondrian)")
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | SkipJsonSchema[None] = _optional(
        "the outputs wanted, each once, in this order; all of them when left out, none when "
        "empty")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: Parameters | SkipJsonSchema[None] = _optional(
        "binary_data_size, when the output comes raw after the JSON")
    data: TensorData | SkipJsonSchema[None] = _optional(
        "row-major elements, flat; left out when the output comes raw")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | SkipJsonSchema[None] = _optional("the model version that answered")
    id: str | SkipJsonSchema[None] = _optional("the request's id, when it had one")
    parameters: Parameters | SkipJsonSchema[None] = _optional(
        "prediction_ids (separated by spaces), adapter_version, level; for labels, the counts "
        "joined, unknown, duplicate, expired, rejected")
    outputs: list[ResponseOutput]


# --- requests -----------------------------------------------------------------------------------

@dataclass
class Tensor:
    """One input of a request: its declared name, shape and datatype, and its elements."""

    name: str
    shape: list[int]
    datatype: str
    values: np.ndarray  # of `shape`: NUMPY_TYPES[datatype] (float32 for BF16), or str for BYTES


@dataclass
class WantedOutput:
    name: str
    binary: bool
    classification: int | None = None


@dataclass
class ParsedRequest:
    """An inference request as read: its id, parameters, inputs by name and the outputs asked for
    (None: all of them, raw when `binary_output`; a list, even empty: those, in that order)."""

    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, Tensor]
    outputs: list[WantedOutput] | None
    binary_output: bool


@dataclass
class TensorSpec:
    """What a model takes for one input: the shape (the batch dimension first, -1; the
    trailing dimensions fixed, or -1 where any size is taken), the most entries along the batch
    dimension one request may hold, and the datatypes it reads."""

    name: str
    shape: list[int]
    max_batch: int
    datatypes: tuple[str, ...] = NUMERIC_TYPES


def decompressed(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """The body as sent before `Content-Encoding` (gzip or deflate, as tritonclient sends with
    `request_compression_algorithm`); at most `max_bytes` once inflated."""
    if encoding is None or encoding.strip().lower() in ("", "identity"):
        return body
    kind = encoding.strip().lower()
    if kind not in ("gzip", "deflate"):
        raise ProtocolError(f"Content-Encoding {encoding!r} is not taken: send the body "
                            "uncompressed, or as gzip or deflate")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if kind == "gzip" else 0))
    try:
        plain = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise ProtocolError(f"the body is not valid {kind} data ({exc})") from None
    if len(plain) > max_bytes:
        raise InflatedTooLarge(f"the request body is larger than {max_bytes} bytes once "
                               "inflated: send less per request")
    if not inflater.eof:
        raise ProtocolError(f"the {kind} body ends before its compressed stream does: send all "
                            "of it")
    if inflater.unused_data:
        raise ProtocolError(f"{len(inflater.unused_data)} bytes follow the end of the {kind} "
                            "stream: send one compressed stream and nothing after it")
    return plain


def read_request(body: bytes, header_length: str | None, specs: Sequence[TensorSpec],
                 outputs: Sequence[str], max_elements: int,
                 scores: str | None = None) -> ParsedRequest:
    """A request from its raw body: the JSON part (all of the body, or its first
    `header_length` bytes) and the raw tensors after it. Every input of `specs` must be given,
    none other; only the model's `outputs` may be asked for, each once, and `classification`
    only on `scores` (the class probabilities); `max_elements` bounds the numbers a request may
    hold before any is parsed.

    >>> spec = TensorSpec("input", [-1, 2], max_batch=4)
    >>> header = (b'{"id": "7", "inputs": [{"name": "input", "shape": [2, 2], "datatype": "INT16",'
    ...           b' "parameters": {"binary_data_size": 8}}]}')
    >>> raw = bytes([1, 0, 2, 0, 3, 0, 4, 0])  # four little-endian INT16
    >>> request = read_request(header + raw, str(len(header)), [spec], ["y"], max_elements=8)
    >>> request.id, request.inputs["input"].values
    ('7', array([[1, 2],
           [3, 4]], dtype=int16))
    >>> read_request(b'{"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", '
    ...              b'"data": [1, 2, 3]}]}', None, [spec], ["y"], 8)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    service.oip.ProtocolError: input 'input' has shape [1, 3]; the model takes [-1, 2] ...
    """
    json_part, raw = _split(body, header_length)
    commas = json_part.count(b",")
    if commas > max_elements + HEADER_SLACK:
        raise ProtocolError(f"the request holds {commas} commas, more values than the model "
                            f"takes in one request ({max_elements}): split the request")
    try:
        document = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the request is not valid JSON: {exc.msg} at character "
                            f"{exc.pos}") from None
    if not isinstance(document, dict):
        raise ProtocolError("the request must be a JSON object with `inputs`")
    repeated = repeated_key(json_part, _key_counts(document))
    if repeated is not None:
        raise ProtocolError(f"the key {repeated!r} appears twice in one object, and which was "
                            "meant is not clear: send it once")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("`id` must be a string")
    parameters = _parameters(document.get("parameters"), "the request's `parameters`")
    binary_output = _flag(parameters, "binary_data_output", "the request's `parameters`")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("`inputs` must be a list of at least one tensor")
    by_name = {spec.name: spec for spec in specs}
    tensors: dict[str, Tensor] = {}
    offset = 0
    # only then can numbers in JSON data hide a boolean (numpy reads [1, true] as [1, 1])
    maybe_booleans = b"true" in json_part or b"false" in json_part
    for index, item in enumerate(inputs):
        tensor, used = _input(index, item, by_name, raw, offset, max_elements, maybe_booleans)
        if tensor.name in tensors:
            raise ProtocolError(f"input {tensor.name!r} is given twice")
        tensors[tensor.name] = tensor
        offset += used
    if offset != len(raw):
        raise ProtocolError(f"{len(raw)} bytes follow the JSON but the inputs' binary_data_size "
                            f"add up to {offset}: check {HEADER_LENGTH} and binary_data_size")
    missing = [name for name in by_name if name not in tensors]
    if missing:
        raise ProtocolError(f"input {missing[0]!r} is missing; the model takes "
                            f"{_names(by_name)}")
    wanted = _outputs(document.get("outputs"), outputs, scores, binary_output)
    return ParsedRequest(request_id, parameters, tensors, wanted, binary_output)


def _key_counts(document: dict[str, Any]) -> dict[bytes, int]:
    """How often each key of the request's objects (itself, each input and output, and their
    `parameters`; tensor data holds none) may appear in its JSON text without a repeat: once for
    each object that holds it (`service.inputs.repeated_key`)."""
    objects = [document]
    for field in ("inputs", "outputs"):
        items = document.get(field)
        if isinstance(items, list):
            objects += [item for item in items if isinstance(item, dict)]
    objects += [o["parameters"] for o in list(objects) if isinstance(o.get("parameters"), dict)]
    counts: dict[bytes, int] = {}
    for holder in objects:
        for key in holder:
            text = orjson.dumps(key)  # as JSON spells it, quotes included
            counts[text] = counts.get(text, 0) + 1
    return counts


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    length = header_length.strip()
    if not LENGTH_PATTERN.fullmatch(length) or not 0 < int(length) <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} is {header_length[:20]!r}; it must be the length "
                            f"of the JSON part, from 1 to the body's {len(body)} bytes")
    return body[:int(length)], body[int(length):]


def _names(specs: Mapping[str, TensorSpec]) -> str:
    return _quoted(list(specs))


def _parameters(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be an object of names and values")
    for name, item in value.items():
        if not isinstance(item, (str, int, float, bool)):
            raise ProtocolError(f"{where}: {name!r} must be a string, a number or a boolean")
    return value


def _flag(parameters: Mapping[str, Any], name: str, where: str, default: bool = False) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"{where}: {name} must be true or false")
    return value


def _refuse_shared_memory(parameters: Mapping[str, Any], where: str) -> None:
    if any(name.startswith("shared_memory") for name in parameters):
        raise ProtocolError(f"{where}: shared memory is not supported: send the tensor in the "
                            "body (JSON, or raw with binary_data_size)")


def _input(index: int, item: object, specs: Mapping[str, TensorSpec], raw: bytes, offset: int,
           max_elements: int, maybe_booleans: bool) -> tuple[Tensor, int]:
    """One input tensor, and the raw bytes it took from after the JSON."""
    where = f"inputs[{index}]"
    if not isinstance(item, dict):
        raise ProtocolError(f"{where} must be an object with name, shape, datatype and data")
    name = item.get("name")
    if not isinstance(name, str):
        raise ProtocolError(f"{where}.name must be a string")
    spec = specs.get(name)
    if spec is None:
        raise ProtocolError(f"the model has no input {name!r}; it takes {_names(specs)}")
    where = f"input {name!r}"
    shape = item.get("shape")
    if (not isinstance(shape, list) or not shape
            or not all(type(n) is int and n >= 0 for n in shape)):
        raise ProtocolError(f"{where}: shape must be a list of sizes (integers, 0 or more)")
    datatype = item.get("datatype")
    if datatype not in DATATYPES:
        raise ProtocolError(f"{where}: datatype {str(datatype)[:20]!r} is not one of "
                            f"{', '.join(DATATYPES)}")
    if datatype not in spec.datatypes:
        taken = ("a numeric datatype" if spec.datatypes == NUMERIC_TYPES
                 else spec.datatypes[0] if len(spec.datatypes) == 1
                 else "one of " + ", ".join(spec.datatypes))
        raise ProtocolError(f"{where}: datatype {datatype} is not taken; send {taken}")
    _check_shape(where, shape, spec, max_elements)
    parameters = _parameters(item.get("parameters"), f"{where}: parameters")
    _refuse_shared_memory(parameters, where)
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in item:
            raise ProtocolError(f"{where}: give `data`, or binary_data_size and the raw tensor "
                                f"after the JSON ({HEADER_LENGTH})")
        values = _from_json(where, item["data"], shape, datatype, maybe_booleans)
        return Tensor(name, shape, datatype, values), 0
    if type(size) is not int or size < 0:
        raise ProtocolError(f"{where}: binary_data_size must be a number of bytes")
    if "data" in item:
        raise ProtocolError(f"{where}: give `data` or binary_data_size, not both")
    if offset + size > len(raw):
        raise ProtocolError(f"{where}: binary_data_size is {size} but only {len(raw) - offset} "
                            f"bytes follow the JSON for it ({HEADER_LENGTH} gives its length)")
    values = _from_raw(where, raw[offset:offset + size], shape, datatype)
    return Tensor(name, shape, datatype, values), size


def _check_shape(where: str, shape: list[int], spec: TensorSpec, max_elements: int) -> None:
    wanted = "[" + ", ".join(str(n) for n in spec.shape) + "]"
    fits = len(shape) == len(spec.shape) and all(
        want == -1 or want == got for want, got in zip(spec.shape[1:], shape[1:], strict=True))
    if not fits:
        raise ProtocolError(f"{where} has shape {shape}; the model takes {wanted} (the batch "
                            "first, -1 for any size)")
    if shape[0] < 1:
        raise ProtocolError(f"{where} is empty (its first dimension is 0)")
    if shape[0] > spec.max_batch:
        raise ProtocolError(f"{where} holds {shape[0]} along its first dimension (the batch); "
                            f"at most {spec.max_batch} are taken in one request: split the "
                            "request")
    if math.prod(shape) > max_elements:
        raise ProtocolError(f"{where} has shape {shape}, {math.prod(shape)} values; at most "
                            f"{max_elements} are taken in one request: split the request")


def _from_json(where: str, data: object, shape: list[int], datatype: str,
               maybe_booleans: bool = True) -> np.ndarray:
    """Elements given in JSON, checked against the datatype: booleans for BOOL, integers in
    range for the integer types, numbers for the floating ones, strings for BYTES."""
    if datatype == "BF16":
        raise ProtocolError(f"{where}: BF16 is taken only as binary data (binary_data_size): "
                            "JSON has no bfloat16; send FP32 in JSON")
    if not isinstance(data, list):
        raise ProtocolError(f"{where}: data must be a list, flat or nested to the shape")
    try:
        array = np.array(data)
    except (ValueError, TypeError, OverflowError):
        raise ProtocolError(f"{where}: data is not a regular array (its lists differ in "
                            "length)") from None
    count = math.prod(shape)
    if not (array.ndim == 1 and array.size == count) and list(array.shape) != shape:
        raise ProtocolError(f"{where}: data has shape {list(array.shape)}; send {count} values "
                            f"flat, or nested as the shape {shape}")
    kind = array.dtype.kind
    if datatype == "BYTES":
        # numpy reads ["a", 1] as the strings "a" and "1": every element must be a string
        if kind != "U" or not all(type(v) is str for v in _elements(data, array)):
            raise ProtocolError(f"{where}: BYTES data must be strings")
        return array.reshape(shape)
    if kind == "b":
        if datatype != "BOOL":
            raise ProtocolError(f"{where}: data holds true or false; {datatype} takes numbers")
        return array.reshape(shape)
    if kind not in "iuf":
        raise ProtocolError(f"{where}: data must hold only numbers ({datatype}), not strings or "
                            "nulls")
    if datatype == "BOOL":
        raise ProtocolError(f"{where}: BOOL data must be true or false")
    if maybe_booleans and any(type(v) is bool for v in _elements(data, array)):
        # numpy reads [1, true] as numbers: a boolean among numbers is refused all the same
        raise ProtocolError(f"{where}: data holds true or false; {datatype} takes numbers")
    target = NUMPY_TYPES[datatype]
    if target.kind in "iu":
        return _integers(where, data, array, datatype).reshape(shape)
    with np.errstate(over="ignore"):
        values = array.astype(target)
    if not np.isfinite(values).all():
        raise ProtocolError(f"{where}: data holds a value beyond the range of {datatype}")
    return values.reshape(shape)


def _elements(data: list[Any], array: np.ndarray) -> np.ndarray:
    """The elements of `data` as JSON gave them (Python objects), flat; `array` is numpy's
    reading of it, whose shape says how deep the lists go."""
    elements = np.empty(array.shape, dtype=object)
    elements[...] = data
    return elements.ravel()


def _integers(where: str, data: list[Any], array: np.ndarray, datatype: str) -> np.ndarray:
    """JSON integers (no fractions, no booleans) within the integer datatype's range, as that
    datatype, flat."""
    target = NUMPY_TYPES[datatype]
    info = np.iinfo(target)
    out_of_range = ProtocolError(f"{where}: data holds a value outside {datatype}'s range "
                                 f"{info.min} to {info.max}")
    if array.dtype.kind in "iu":
        if array.size and (int(array.min()) < info.min or int(array.max()) > info.max):
            raise out_of_range
        return array.astype(target).ravel()
    # numpy reads integers of both signs beyond int64 ([-1, 2**63]) as float64, and JSON
    # integers beyond 64 bits come as floats: each element is looked at as JSON gave it
    elements = _elements(data, array)
    for value in elements:
        if type(value) is int:
            if not info.min <= value <= info.max:
                raise out_of_range
        elif isinstance(value, float) and value.is_integer():
            raise out_of_range  # an integer too large for 64 bits
        else:
            raise ProtocolError(f"{where}: {datatype} data must be integers")
    return elements.astype(target)


def _from_raw(where: str, raw: bytes, shape: list[int], datatype: str) -> np.ndarray:
    """A raw tensor: little-endian elements, row-major, no padding (BYTES: each element a
    4-byte little-endian length, then its bytes)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return np.array(_bytes_elements(where, raw, count), dtype=str).reshape(shape)
    dtype = NUMPY_TYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise ProtocolError(f"{where}: binary_data_size is {len(raw)} bytes; shape {shape} of "
                            f"{datatype} takes {count * dtype.itemsize}")
    values = np.frombuffer(raw, dtype=dtype)
    if datatype == "BOOL":
        as_bytes = np.frombuffer(raw, dtype=np.uint8)
        if (as_bytes > 1).any():
            raise ProtocolError(f"{where}: a raw BOOL element is one byte, 0 or 1")
    elif datatype == "BF16":
        values = (values.astype("<u4") << 16).view("<f4")
    return values.reshape(shape)


def _bytes_elements(where: str, raw: bytes, count: int) -> list[str]:
    elements = []
    offset = 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise ProtocolError(f"{where}: the raw BYTES tensor ends before its {count} elements")
        length = int.from_bytes(raw[offset:offset + 4], "little")
        offset += 4
        chunk = raw[offset:offset + length]
        if len(chunk) != length:
            raise ProtocolError(f"{where}: the raw BYTES tensor ends inside an element")
        offset += length
        try:
            elements.append(chunk.decode("ascii"))
        except UnicodeDecodeError:
            raise ProtocolError(f"{where}: an element is not ASCII text") from None
    if offset != len(raw):
        raise ProtocolError(f"{where}: the raw BYTES tensor has {len(raw) - offset} bytes after "
                            f"its {count} elements")
    return elements


def _outputs(value: object, names: Sequence[str], scores: str | None,
             binary_output: bool) -> list[WantedOutput] | None:
    """The outputs asked for: each one of the model's `names`, once, raw where its `binary_data`
    says, or else where the request's `binary_data_output` does (the binary tensor data
    extension: the request's flag holds for every output but those that say otherwise)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise ProtocolError("`outputs` must be a list of {name, parameters}")
    if len(value) > len(names):
        raise ProtocolError(f"`outputs` asks for {len(value)} outputs; the model gives "
                            f"{len(names)} ({_quoted(names)}): ask for each at most once")
    wanted: list[WantedOutput] = []
    seen: set[str] = set()
    for index, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError(f"outputs[{index}] must be an object with a name")
        name = item["name"]
        if name not in names:
            raise ProtocolError(f"the model has no output {name[:80]!r}; it gives "
                                f"{_quoted(names)}")
        where = f"output {name!r}"
        if name in seen:
            raise ProtocolError(f"{where} is asked for twice")
        seen.add(name)
        parameters = _parameters(item.get("parameters"), f"{where}: parameters")
        _refuse_shared_memory(parameters, where)
        classification = parameters.get("classification")
        if classification is not None:
            if type(classification) is not int or classification < 1:
                raise ProtocolError(f"{where}: classification must be a number of classes, 1 "
                                    "or more")
            if name != scores:
                raise ProtocolError(f"{where}: classification is taken only on the class "
                                    f"probabilities ({scores!r})" if scores else
                                    f"{where}: this model takes no classification")
        wanted.append(WantedOutput(name, _flag(parameters, "binary_data", where, binary_output),
                                   classification))
    return wanted


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in names)


# --- answers ------------------------------------------------------------------------------------

@dataclass
class Output:
    """One output the model can give: its datatype and its values (the batch first)."""

    datatype: str
    values: np.ndarray  # numeric, bool, or str for BYTES


def answer(model_name: str, model_version: str, request: ParsedRequest,
           outputs: Mapping[str, Output], parameters: Mapping[str, Any],
           class_labels: Sequence[str] | None = None) -> tuple[bytes, int | None]:
    """The answer's body, and the length of its JSON part when raw outputs follow it (None when
    all of it is JSON). `outputs` are the ones the model gives, in their default order; the
    request picks among them (`read_request` has checked its choice). An output asked for with
    `classification: k` becomes the k most probable classes, "probability:index[:label]"
    strings."""
    wanted = request.outputs
    if wanted is None:
        wanted = [WantedOutput(name, request.binary_output) for name in outputs]
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for item in wanted:
        output = outputs[item.name]
        if item.classification is not None:
            output = _top_classes(output.values, item.classification, class_labels)
        values = output.values
        entry: dict[str, Any] = {"name": item.name, "datatype": output.datatype,
                                 "shape": list(values.shape)}
        if item.binary:
            blob = _to_raw(output)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _to_json(output)
        described.append(entry)
    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        document["id"] = request.id
    if parameters:
        document["parameters"] = dict(parameters)
    document["outputs"] = described
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _to_json(output: Output) -> Any:
    flat = np.ascontiguousarray(output.values).ravel()
    return flat.tolist() if output.datatype == "BYTES" else flat


def _to_raw(output: Output) -> bytes:
    flat = np.ascontiguousarray(output.values).ravel()
    if output.datatype == "BYTES":
        return b"".join(len(b := str(v).encode()).to_bytes(4, "little") + b for v in flat)
    return flat.astype(NUMPY_TYPES[output.datatype], copy=False).tobytes()


def _top_classes(probabilities: np.ndarray, k: int, labels: Sequence[str] | None) -> Output:
    """Triton's classification extension: per sample, the `k` most probable classes as
    "probability:index" strings, ":label" added where classes have names."""
    k = min(k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    rows = []
    for sample, classes in zip(probabilities, order, strict=True):
        row = []
        for index in classes:
            text = f"{float(sample[index])}:{int(index)}"
            row.append(text + (f":{labels[index]}" if labels else ""))
        rows.append(row)
    return Output("BYTES", np.array(rows, dtype=str).reshape(len(rows), k))
