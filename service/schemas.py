"""Request and response bodies of the v1 API; their OpenAPI schema is the contract."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StringConstraints
from pydantic.json_schema import SkipJsonSchema
from typing_extensions import TypeAliasType

# one sample: numbers nested to the model's input shape (checked against it by the route); mypy
# cannot follow a recursive TypeAliasType (pydantic can, and builds the schema from it)
Number = Annotated[StrictFloat, Field(allow_inf_nan=False)]
Tensor = TypeAliasType(  # type: ignore[misc]
    "Tensor", Union[Number, list["Tensor"]]  # type: ignore[misc]  # noqa: UP007
)
# printable ASCII without spaces; the label stream checks its entries' ids by the same rule
PREDICTION_ID_PATTERN = r"^[\x21-\x7e]{1,128}$"
# a group named in a predict request (the class-run filter, conformal.mondrian = "group"):
# like an id, shorter
MAX_GROUP_LENGTH = 64
GROUP_PATTERN = r"^[\x21-\x7e]{1,64}$"
PredictionId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=PREDICTION_ID_PATTERN),
    Field(description="printable ASCII without spaces, at most 128 characters"),
]


class SchemaError(BaseModel):
    """One way a request does not fit the schema, as FastAPI's validation errors put it."""

    type: str = Field(description="what kind of problem, e.g. missing, json_invalid, float_type")
    loc: list[str | int] = Field(
        description="where: the part of the request (body, query...), then field names and list "
        "indices; for a body that is not JSON, its character offset"
    )
    msg: str


MAX_REPORTED_ERRORS = 10


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


class ErrorResponse(BaseModel):
    """Every error the service answers (4xx and 5xx alike): one sentence in `detail`; for a
    request that does not fit the schema, the first problems in `errors` too."""

    detail: str = Field(description="what went wrong and what to change, in one sentence")
    # absent rather than null when there is nothing to say: SkipJsonSchema and _no_default keep
    # `null` out of the schema (the handlers never send it)
    errors: Annotated[list[SchemaError], Field(max_length=MAX_REPORTED_ERRORS)] | SkipJsonSchema[
        None
    ] = Field(
        None, json_schema_extra=_no_default,
        description=f"only for a request that does not fit the schema: its first "
        f"{MAX_REPORTED_ERRORS} problems",
    )
    more_errors: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = Field(
        None, json_schema_extra=_no_default,
        description="how many problems `errors` leaves out, when it is cut short",
    )


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(Body):
    inputs: list[Tensor] = Field(
        min_length=1,
        description="samples, each nested to the model's input shape (see GET /v1/state)",
    )
    ids: list[PredictionId] | None = Field(
        None, description="one id per sample, unique; new ids are made where omitted"
    )
    group: Annotated[str, StringConstraints(pattern=GROUP_PATTERN)] | None = Field(
        None, description="the group these samples belong to (a camera, a device, a customer, "
        "a region...): the class-run filter follows each group's samples as a sequence of their "
        "own; with conformal.mondrian = 'group' each group's sets or intervals get a threshold of "
        "their own; kept in each prediction's record",
    )


class Prediction(BaseModel):
    id: str
    prediction: int | float | list[float] = Field(
        description="class index (classification) or value(s) (regression)"
    )
    probabilities: list[float] | None = None
    set: list[int] | None = Field(None, description="conformal prediction set, when calibrated")
    interval: list[float] | list[list[float]] | None = Field(
        None, description="conformal interval [low, high]; one per output for a multi-output "
        "regressor",
    )
    level: float | None = Field(
        None, description="the coverage the set or interval aims at (1 − α); null when "
        "conformal calibration is off",
    )
    model_version: str
    adapter_version: int


class PredictResponse(BaseModel):
    predictions: list[Prediction]


class Label(Body):
    id: PredictionId
    label: Annotated[StrictFloat, Field(allow_inf_nan=False)] | Annotated[
        list[Annotated[StrictFloat, Field(allow_inf_nan=False)]],
        Field(min_length=1, max_length=4096),
    ] = Field(
        description="class index (classification), observed value (regression), or the list of "
        "observed values of a multi-output regressor (one per output, e.g. per horizon)"
    )


class FeedbackRequest(Body):
    labels: list[Label] = Field(min_length=1)


REJECTED = ("ids whose label was not joined because its effects cannot be computed from the "
            "stored prediction (outputs or features that are not finite, say): the prediction "
            "stays unlabelled, and the same label sent again is rejected again; the other labels "
            "are joined. The service's log says why")


class FeedbackResponse(BaseModel):
    joined: int
    unknown: list[str]
    duplicate: list[str]
    expired: list[str]
    rejected: list[str] = Field(default_factory=list, description=REJECTED)


class BulkFeedbackResponse(BaseModel):
    labels: int = Field(description="labels read from the body")
    joined: int
    unknown: int
    duplicate: int
    expired: int
    rejected: int = Field(0, description="labels rejected: " + REJECTED)
    examples: dict[str, list[str]] = Field(
        description="up to 20 ids per outcome that was not a join (unknown, duplicate, expired, "
                    "rejected)"
    )


class ModelState(BaseModel):
    name: str
    task: str
    input_shape: list[int]
    classes: list[str] | None
    version: str


class AdapterState(BaseModel):
    name: str
    learning_rate: float
    steps: int
    backward_samples: int
    version: int
    norm: str | None = Field(None, description="test-time BatchNorm statistics: robust or batch")
    buffered_samples: int = Field(0, description="samples waiting for the next gradient step")
    guard: dict | None = Field(None, description="the collapse guard, when one watches")
    shadow: dict | None = Field(
        None, description="the comparison with the source model on joined labels, when the "
        "source runs beside what learns: its window, the labels in it since the last reset, and "
        "the served and source errors over them")
    details: dict[str, object] = Field(default_factory=dict, description="method-specific")


class StoreState(BaseModel):
    backend: str
    namespace: str
    up: bool
    record_ttl_s: float


class BatcherState(BaseModel):
    max_batch_size: int
    max_wait_ms: float
    waiting_samples: int


class QualityState(BaseModel):
    window: int
    labels: int
    rolling_error: float | None = Field(
        description="error rate (classification) or mean absolute error (regression)"
    )


class StateResponse(BaseModel):
    model: ModelState
    adapter: AdapterState
    calibrator: dict | None = Field(
        None, description="online conformal calibration: method, auto (why method \"auto\" "
        "picked it, else null), signal (whether sets follow the batch's entropy), score, "
        "target, alpha_t, threshold, updates, coverage and labels per window, mean set size "
        "or width, and per_group (coverage per class or named group, and their thresholds with "
        "conformal.mondrian); null when off",
    )
    detectors: list[dict] = Field(
        default_factory=list, description="drift detectors: detector, signal, labelled, params, "
        "counts, warm, statistic and estimate, last alarm",
    )
    drift_policy: dict | None = Field(
        None, description="the drift policy: actions, boost, cool-down, the sample clock and the "
        "learning-rate factor now; null when drift detection is off",
    )
    memories: dict[str, int] = Field(default_factory=dict, description="memory sizes by name")
    learning: dict[str, object] = Field(
        default_factory=dict, description="every part that changes what is served, with its "
        "settings as built (what `auto` chose included): adapter, adanpc, error_memory, "
        "supervised, output_corrector, mixture (each present only when on), and whether the "
        "collapse guard, the source shadow and drift detection run")
    warnings: list[str] = Field(
        default_factory=list, description="configured parts that will do nothing, each with "
        "what to change (also logged at start-up)")
    store: StoreState
    batcher: BatcherState
    quality: QualityState


class Health(BaseModel):
    status: str
    checks: dict[str, bool] = Field(default_factory=dict)


class CheckpointResponse(BaseModel):
    version: int = Field(description="the checkpoint's version in the store")
    bytes: int
    adapter: str


class EventItem(BaseModel):
    seq: int = Field(description="increasing sequence number; page back with ?before=seq")
    time: float = Field(description="seconds since the epoch")
    kind: str = Field(description="drift_alarm, drift_action, drift_change, drift_unconfirmed, "
                      "drift_judged, collapse, shadow, reset")
    source: str = Field(description="who raised it: detector/signal (adwin/error), guard, "
                        "operator")
    action: str | None = Field(description="what the service did: boost_lr, trim_memory, "
                               "reset_calibrator, adapter_reset; null for an alarm")
    detail: dict[str, object] = Field(description="statistic, estimate, sample clock, outcome...")
    replica: str | None = Field(None, description="the replica that recorded it")


class EventsResponse(BaseModel):
    events: list[EventItem]


class HistoryPointItem(BaseModel):
    """The label loop's numbers after the joins of one moment; null where nothing tells yet."""

    time: float = Field(description="seconds since the epoch, of the last join the point holds")
    labels: int = Field(description="labels this replica has measured an error for so far")
    samples: int | None = Field(description="the sample clock (samples served, as the drift "
                                "detectors count them); null when drift detection is off")
    rolling_error: float | None = Field(description="error rate (classification) or mean absolute "
                                        "error (regression) over the rolling window")
    coverage: float | None = Field(description="how often the sets or intervals served held the "
                                   "label, over the last 100 labels; null when calibration is off")
    size: float | None = Field(description="mean set size (classification) or interval width "
                               "(regression) of the last 1,000 predictions")
    learning_rate: float = Field(description="the adapter's learning rate (0 when it has none)")


class HistoryResponse(BaseModel):
    spacing_s: float = Field(description="the least time between two points now: it doubles "
                             "each time the history fills and every other point is dropped")
    capacity: int = Field(description="the most points kept")
    error_window: int = Field(description="the labels the rolling error is the mean of")
    coverage_window: int = Field(description="the labels the coverage is measured over")
    coverage_target: float | None = Field(description="the coverage the sets or intervals aim at "
                                          "(1 − α); null when calibration is off")
    size_name: str = Field(description="what `size` is: mean_set_size or mean_width")
    points: list[HistoryPointItem] = Field(description="oldest first, one per join at most "
                                           "`spacing_s` apart (the newest holds the last join)")
