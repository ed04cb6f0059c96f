"""Settings, parsed once at the edge and handed down as plain typed values.

Sources, strongest first: command-line flags, `ADAPTD_*` environment variables (nested sections
with a double underscore: `ADAPTD_STORE__URL`, `ADAPTD_BATCHER__MAX_WAIT_MS`), an optional TOML
file (`--config` or `ADAPTD_CONFIG`), then the defaults below. With no configuration at all the
service runs the bundled demo model on the in-process store.

Keys renamed in this version (`RENAMED`) are refused from every source with a message that names
the new key, so an old config never runs with a part silently off.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from adapters.labels.online_learner import KINDS
from adapters.task import task_named

DEMO_FACTORY = "service.demo:digits_cnn"
# a tabular model's most features, for `mixture.enabled` and `mixture.learner` = auto: a
# Hoeffding adaptive tree costs about 0.35 ms a sample at 100 (learnt and predicted), 0.05 at 6
TABULAR_FEATURES = 100
# `mixture.eta`: at most this many rates, each at most this (at 100 one label moves a weight by
# e^100 already)
MAX_RATES = 8
MAX_ETA = 100.0

# Keys renamed in this version, by their old path: what to say when one still arrives, from the
# file, an ADAPTD_* variable or a flag. Each is refused rather than mapped, so one name stays.
RENAMED: dict[tuple[str, ...], str] = {
    ("compensation",): "`[compensation]` is now `[error_memory]` (same keys); rename the section "
                       "(ADAPTD_COMPENSATION__* is now ADAPTD_ERROR_MEMORY__*)",
    ("correction",): "`[correction]` is now `[output_corrector]` (same keys); rename the section "
                     "(ADAPTD_CORRECTION__* is now ADAPTD_OUTPUT_CORRECTOR__*)",
    ("feedback", "supervised"): "`[feedback.supervised]` is now the top-level `[supervised]` "
                                "(same keys); move the section (ADAPTD_FEEDBACK__SUPERVISED__* "
                                "is now ADAPTD_SUPERVISED__*)",
    ("adapter", "calibration_data"): "adapter.calibration_data is now model.reference_data; move "
                                     "the key to [model] (ADAPTD_ADAPTER__CALIBRATION_DATA is now "
                                     "ADAPTD_MODEL__REFERENCE_DATA)",
    ("adapter", "calibration_samples"): "adapter.calibration_samples is now "
                                        "model.reference_samples; move the key to [model] "
                                        "(ADAPTD_ADAPTER__CALIBRATION_SAMPLES is now "
                                        "ADAPTD_MODEL__REFERENCE_SAMPLES)",
}


def _refuse(found: Sequence[tuple[tuple[str, ...], str, Any]]) -> None:
    """A validation error for each (where, message, value) of a renamed key, or nothing. Raised
    by the source that read the key, so the error shows that key's value and nothing else."""
    if found:
        raise ValidationError.from_exception_data("Settings", [
            InitErrorDetails(type=PydanticCustomError("renamed_setting", message), loc=where,
                             input=value)
            for where, message, value in found
        ])


def _refuse_renamed_keys(data: Any) -> None:
    """Refuse the renamed keys in nested settings `data` (the TOML file's, or keyword arguments)."""
    found = []
    for path, message in RENAMED.items():
        node = data
        for key in path:
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            found.append((path, message, node))
    _refuse(found)


class Section(BaseModel):
    """A table of the config file; unknown keys are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(Section):
    """Which model to serve: a factory returning an `nn.Module`, and what it takes and returns."""

    factory: str = Field(DEMO_FACTORY, description="`package.module:function` returning the model")
    weights: Path | None = Field(
        None, description="safetensors state dict; the demo factory defaults to its bundled weights"
    )
    name: str = Field("digits-cnn", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    task: Literal["classification", "regression"] = "classification"
    input_shape: list[PositiveInt] = Field([1, 16, 16], min_length=1, description="one sample")
    num_classes: PositiveInt | None = Field(10, description="classification only")
    class_names: list[str] | None = None
    reference_data: Path | None = Field(
        None,
        description="safetensors file with in-distribution `inputs` (and optional `labels`): "
        "the model's training distribution, for EATA's and PSMT's Fisher, AdaNPC's seed memory, "
        "the collapse guard, the error memory's centring and conformal's score range; the demo "
        "model uses its own training split",
    )

    reference_samples: PositiveInt = Field(
        2000, description="at most this many rows of model.reference_data are used"
    )
    max_abs_input: PositiveFloat | None = Field(
        None,
        description="the largest |value| a sample may hold (422 beyond it); unset, derived at "
        "start-up from the first nn.Linear or nn.Conv*d so its outputs cannot overflow float32 "
        "even when squared: sqrt(float32 max) / the largest L1 norm of one unit's weights and bias",
    )

    @model_validator(mode="after")
    def _classes_fit_task(self) -> ModelSettings:
        if task_named(self.task).discrete:
            if self.num_classes is None or self.num_classes < 2:
                raise ValueError("a classification model needs model.num_classes >= 2")
            if self.class_names is not None and len(self.class_names) != self.num_classes:
                raise ValueError(
                    f"model.class_names has {len(self.class_names)} names for "
                    f"{self.num_classes} classes"
                )
        return self


class BatcherSettings(Section):
    """How concurrent requests are merged into one forward pass."""

    max_batch_size: PositiveInt = 64
    max_wait_ms: float = Field(5.0, ge=0.0, le=10_000.0)
    max_request_samples: PositiveInt = Field(256, description="samples one request may carry")
    max_queued_samples: PositiveInt | None = Field(
        None, description="samples waiting to be batched, at most; a request that would pass it "
        "is refused at once with 503 and Retry-After. Unset: 16 × max_batch_size, and at least "
        "max_request_samples",
    )
    max_inflight_requests: PositiveInt = Field(
        512, description="prediction requests queued or running at once, at most; beyond it a "
        "request is refused at once with 503 and Retry-After",
    )
    parse_process_bytes: int | None = Field(
        64 * 1024, ge=0,
        description="a /v1/predict body larger than this is parsed in a process of its own "
        "(started at the first), where its parse does not hold up the model's forward pass; "
        "above max_body_bytes, or on a machine with one CPU: every body is parsed in this "
        "process",
    )

    @property
    def queued_samples_limit(self) -> int:
        """max_queued_samples, or its default."""
        if self.max_queued_samples is not None:
            return self.max_queued_samples
        return max(16 * self.max_batch_size, self.max_request_samples)

    @model_validator(mode="after")
    def _a_request_can_queue(self) -> BatcherSettings:
        if self.max_queued_samples is not None and (
            self.max_queued_samples < self.max_request_samples
        ):
            raise ValueError(
                f"batcher.max_queued_samples ({self.max_queued_samples}) is below "
                f"batcher.max_request_samples ({self.max_request_samples}): a request that "
                "large could never be queued; raise the first or lower the second"
            )
        return self


class StoreSettings(Section):
    """Where state lives: `memory` (in process) or a `redis://` URL."""

    url: str = "memory"
    namespace: str | None = Field(None, description="key prefix; defaults to the model's name")
    record_ttl_s: PositiveFloat = Field(
        86_400.0, description="how long a prediction awaits its label"
    )
    expired_grace_s: float = Field(
        86_400.0, ge=0.0,
        description="how long after expiry a late label is reported as expired",
    )
    max_records: int = Field(200_000, ge=1, le=2**29, description="in-process store only")
    max_bytes: int = Field(
        128 * 2**20, ge=2**20,
        description="in-process store only: the bytes prediction records may take, reserved "
        "at start with the id markers' table, so memory does not grow with traffic",
    )
    snapshot_path: Path | None = Field(
        None, description="in-process store only: a file its lasting state (adapter "
        "checkpoints, memories, the calibrator, drift state, events) is written to every "
        "snapshot_every_s and on stop, and read back at start",
    )
    snapshot_every_s: PositiveFloat = Field(60.0, description="how often the snapshot is written")

    @model_validator(mode="after")
    def _known_scheme(self) -> StoreSettings:
        if self.url not in ("memory", "memory://") and not self.url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError(f"store.url {self.url!r}: use 'memory' or redis://host:port/db")
        if self.snapshot_path is not None and self.url not in ("memory", "memory://"):
            raise ValueError("store.snapshot_path is for the in-process store; Redis keeps its "
                             "own state")
        return self


class MemorySettings(Section):
    """AdaNPC's memory of features and labels (reference defaults: k 100, τ 0.1, β 0.1)."""

    k: PositiveInt = Field(100, description="neighbours that vote")
    temperature: PositiveFloat = Field(0.1, description="τ in softmax(similarity / τ)")
    confidence_threshold: float = Field(
        0.8, ge=0.0, le=1.0, description="β: a test sample joins the memory with its served class "
        "when its normalised confidence (C·max p − 1) / (C − 1) reaches it"
    )
    vote_window: PositiveInt = Field(
        200, description="joined labels on which the vote's weight is chosen (the newest)"
    )
    min_labels: PositiveInt = Field(
        20, description="joined labels before the vote may get any weight"
    )
    capacity: PositiveInt = Field(10_000, description="rows added at test time, at most")
    policy: Literal["per_class_fifo", "fifo"] = "per_class_fifo"
    persist: bool = Field(True, description="append added rows to the store; reload on start")


class AdapterSettings(Section):
    """The test-time adaptation method and its knobs (None keeps the method's reference default)."""

    name: str = Field(
        "auto",
        pattern=r"^[a-z]+(\+[a-z]+)*$",
        description="auto, none, bn, tent, eta, eata, psmt, rotta, sar; add '+adanpc' for "
        "AdaNPC's memory votes on top (or 'adanpc' alone, on the source model). auto: bn for a "
        "model whose BatchNorm normalises over positions (a convolutional network), else none",
    )
    learning_rate: PositiveFloat | None = None
    max_learning_rate: PositiveFloat = Field(
        0.01, description="no schedule or drift action raises the learning rate above this"
    )
    norm: Literal["robust", "balanced", "batch", "source"] = Field(
        "robust",
        description="test-time BatchNorm statistics: robust (source blended with a per-sample "
        "average of test statistics, fit for single requests), balanced (one such average per "
        "predicted class, mixed by the classes' shares over `norm_window` samples, so a run of "
        "one class does not drag it), batch (the references' choice) or source (the training "
        "statistics, unchanged)",
    )
    norm_momentum: float = Field(0.02, gt=0.0, le=1.0, description="robust BN, per sample")
    norm_layers: Literal["auto", "same", "graded"] = Field(
        "auto", description="robust BN: every layer moves by norm_momentum (same), or each by "
        "its share, measured on the reference data, so that a run of one class drags every "
        "layer about equally far (graded: the layers whose statistics are mostly the class "
        "move slowly); auto: graded for a classifier with reference data, else same"
    )
    norm_window: int = Field(
        500, ge=2, description="balanced BN: samples over which a class's share of the "
        "statistics is counted (a run of one class drags them only as far as its share)"
    )
    adapt_batch_size: PositiveInt = Field(
        64, description="samples per gradient step; smaller batches are buffered until then"
    )
    runs: Literal["auto", "filter", "off"] = Field(
        "auto", description="a classifier's answers filtered over consecutive samples by a "
        "sticky Markov chain whose stickiness is learnt from the stream (classes that come in "
        "runs keep their class; shuffled traffic is served as the model answers); off: each "
        "request alone; auto: filter for a classifier whose adapter changes the model (BatchNorm "
        "statistics or a gradient step)"
    )
    runs_window: int = Field(
        200, ge=1, description="the class-run filter: samples over which the model's class mix "
        "is averaged"
    )
    runs_groups: int = Field(
        1024, ge=1, description="the class-run filter: the groups (the `group` a predict request "
        "names) whose rows it follows as sequences of their own; beyond, the group served least "
        "recently is forgotten"
    )
    runs_settle: int = Field(
        100, ge=0, description="the class-run filter: rows it stands aside for (serving the "
        "model's answers, learning no stickiness) after the inputs shift at the model's robust "
        "BatchNorm layers, while their statistics settle (0: never)"
    )
    repeat_memory: int = Field(
        4096, ge=0, description="distinct recent inputs remembered: a batch made only of inputs "
        "identical to one of them is served but learnt from by nothing (0: learn from repeats)"
    )
    options: dict[str, float | int | bool | str] = Field(
        default_factory=dict, description="method-specific knobs, by constructor argument name"
    )
    collapse_window: PositiveInt = Field(
        512, description="predictions the collapse guard looks at"
    )
    collapse_max_divergence: PositiveFloat = Field(
        3.0, description="a regressor's collapse guard: reset when the served values' RMS "
        "distance from the source's exceeds this many of the source's spreads"
    )
    memory: MemorySettings = MemorySettings()
    collapse_min_ratio: float = Field(
        0.3, ge=0.0, lt=1.0,
        description="reset when the served predictions' effective number of classes above one "
        "falls below this share of the source model's on the same inputs (a regressor: the "
        "spread of its values); 0 turns the guard off",
    )
    restore: bool = Field(True, description="resume from the store's latest adapter checkpoint")
    checkpoint_every_s: float = Field(
        300.0, ge=0.0, description="save a checkpoint this often while the adapter learns, and "
        "on stop (0: only when POST /v1/admin/checkpoint asks)",
    )


    @field_validator("name")
    @classmethod
    def _auto_leads(cls, name: str) -> str:
        parts = name.split("+")
        if "auto" in parts and (parts[0] != "auto" or any(p != "adanpc" for p in parts[1:])):
            raise ValueError(f"adapter.name {name!r}: 'auto' chooses the method (bn or none), so "
                             f"it comes first and only '+adanpc' may follow it")
        return name

    @property
    def method(self) -> str:
        """The test-time method: the name's first part ('adanpc' alone runs on the source)."""
        first = self.name.split("+")[0]
        return "none" if first == "adanpc" else first

    @property
    def memories(self) -> list[str]:
        """Memory-based methods stacked after the test-time method, in order."""
        return [part for part in self.name.split("+") if part == "adanpc"]


class SupervisedSettings(Section):
    """A supervised step on labelled feedback, through the engine like every model change."""

    enabled: bool = False
    train: Literal["auto", "norm", "lowrank", "all"] = Field(
        "auto",
        description="what trains: the normalisation affines where the model has them (auto), "
        "a low-rank adapter beside the last linear layers (models without normalisation), or "
        "every parameter (all)",
    )
    rank: PositiveInt = Field(4, description="the low-rank adapter's rank")
    layers: PositiveInt = Field(1, description="how many of the last linear layers get one")
    learning_rate: PositiveFloat = 1e-3
    batch_size: PositiveInt = Field(32, description="labelled samples per step")
    replay: NonNegativeInt = Field(
        0, le=1_000_000, description="the last labelled samples kept in memory to rehearse "
        "(0: none); each costs its input's size")
    replay_steps: NonNegativeInt = Field(
        0, le=100, description="steps on batches drawn from the kept samples after each "
        "step on new labels (needs replay)")
    reference_batch: NonNegativeInt = Field(
        0, le=4096, description="labelled reference samples added to every step, normalised "
        "by the source's statistics, so the training distribution is not forgotten (needs "
        "reference data with labels)")
    average: float = Field(
        0.0, ge=0.0, lt=1.0, description="0: serve the weights the step moves; in (0, 1): "
        "serve their exponential moving average, with this decay per step (0.9 averages about "
        "the last ten steps); costs two more copies of what trains")

    @model_validator(mode="after")
    def _replay_with_its_steps(self) -> SupervisedSettings:
        if self.replay_steps and not self.replay:
            raise ValueError("supervised.replay_steps needs samples to replay: set "
                             "supervised.replay above 0")
        if self.replay and not self.replay_steps:
            raise ValueError("supervised.replay keeps samples that only supervised.replay_steps "
                             "rehearses: set it above 0 (or replay = 0)")
        return self


class FeedbackSettings(Section):
    """How labels arrive and are scored."""

    rolling_window: PositiveInt = Field(1000, description="labels in the rolling error")
    max_labels_per_request: PositiveInt = 10_000
    stream: bool = Field(
        False, description="consume labels from the Redis Stream `adaptd:{namespace}:labels` "
        "with a consumer group (needs a redis store)",
    )
    stream_group: str = Field("adaptd", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    stream_consumer: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]{1,128}$",
        description="this replica's name in the group; defaults to host-pid",
    )
    stream_batch: PositiveInt = Field(500, le=10_000, description="entries read at once")
    stream_block_ms: PositiveInt = Field(500, le=1500, description="how long a read waits")
    stream_claim_idle_ms: PositiveInt = Field(
        30_000, description="entries delivered this long ago and never acknowledged (a dead "
        "consumer's) are claimed by another",
    )


class ShadowSettings(Section):
    """The source model run beside the adapted one: the collapse guard compares their predictions,
    and joined labels compare their errors; every learning part is reset when what is served is
    worse than the source. Only where something learns (an adapter, a memory, the error memory,
    the output corrector or the supervised step); it costs one more forward pass per batch and a
    copy of the model's weights."""

    enabled: bool = True
    window: PositiveInt = Field(1000, description="joined labels the comparison looks at")
    min_labels: PositiveInt = Field(
        200, description="labels since the last reset before the comparison may reset anything"
    )
    evidence: float = Field(
        100_000.0, gt=1.0, description="the e-value at which the comparison resets: where "
        "what learns is no worse than the source, the mean number of labels between false "
        "resets is at least this"
    )

    @model_validator(mode="after")
    def _window_holds_min_labels(self) -> ShadowSettings:
        if self.min_labels > self.window:
            raise ValueError(f"shadow.min_labels ({self.min_labels}) cannot exceed "
                             f"shadow.window ({self.window})")
        return self


class MixtureSettings(Section):
    """An online mixture of what the pipeline makes (the source model, with the copy of
    [shadow]; the adapted model; the compensated outputs), weighted by their losses on joined
    labels, served instead of the last stage alone; needs at least two of them."""

    enabled: bool | Literal["auto"] = Field(
        "auto", description="auto: on for a tabular model (each sample one vector of at most "
        f"{TABULAR_FEATURES} numbers) where River's learners are candidates (mixture.learner), "
        "off otherwise (BENCHMARKS.md B6)")
    eta: PositiveFloat | Annotated[list[PositiveFloat], Field(min_length=1)] = Field(
        [2.0, 0.1], description="η, how fast a candidate's weight follows its losses (per "
        "label); several rates keep weights each, and are served in the shares that what each "
        "served earns on its labels, the label delay included (the first starts with 0.9)")
    share: float = Field(0.001, ge=0.0, lt=1.0, description="σ, the fixed share every candidate "
                         "keeps, so one that becomes best can take over")
    newest_label: Literal["auto", "on", "probation", "off"] = Field(
        "auto", description="a candidate that serves the label that arrived last, for streams "
        "whose labels persist; probation: a faster rate serves it no more than the slowest "
        "rate weighs it; auto: on for a regressor, probation for a tabular classifier, off for "
        "another classifier")
    recent_residual: Literal["auto", "on", "off"] = Field(
        "auto", description="a regressor's candidate that serves the last stage's values plus "
        "its mean residual (label less what it served) over the last 16 labels, for streams "
        "where the model errs alike for a while; auto: on for a regressor whose last stage is "
        "the model as trained (no adapter, supervised step, output corrector or error memory: "
        "a last stage that learns from labels has learnt the residuals it would add again), "
        "else off; on for a classifier is refused")
    learner: Literal["auto", "off", "ht", "hat", "arf"] | Annotated[
        list[Literal["ht", "hat", "arf"]], Field(min_length=1, max_length=3)] = Field(
        "auto", description="candidates that River's learners make, trained online on the "
        "joined labels and the inputs they were predicted from: ht (HoeffdingTree), hat "
        "(HoeffdingAdaptiveTree), arf (adaptive random forest), or a list of them, each a "
        "candidate of its own; for tabular models whose concept moves; auto: [hat, ht] for a "
        "tabular model with one output or two or more classes under mixture.enabled = auto, "
        "else off")

    newest_from_reference: bool = Field(
        True, description="before the first joined label, the newest-label candidate serves "
        "the labelled reference data's last label (the newest there is where the reference "
        "data is the model's training data in time order, ending where the stream begins) "
        "instead of repeating the last stage, so the first labels judge it (a newest label a "
        "replica saved in the store comes first); false where the reference data is not in "
        "time order")

    @field_validator("learner", mode="before")
    @classmethod
    def _learners(cls, learner: Any) -> Any:
        """One message for any bad list: one to three of ht, hat, arf, each once."""
        if not isinstance(learner, list | tuple):
            return learner
        if not learner or any(kind not in KINDS for kind in learner):
            raise ValueError(f"mixture.learner: auto, off, one of {', '.join(KINDS)}, or a "
                             f"list of them; got {list(learner)!r}")
        if len(set(learner)) < len(learner):
            raise ValueError(f"mixture.learner: each learner once, got {list(learner)!r}")
        return list(learner)

    @property
    def learners(self) -> tuple[str, ...]:
        """River's learners named (`learner` made a tuple: none for off); `auto` is made
        concrete at start-up, where the model is known, and raises here before."""
        if isinstance(self.learner, list):
            return tuple(self.learner)
        if self.learner == "auto":
            raise ValueError("mixture.learner = 'auto' is resolved at start-up, with the model")
        return () if self.learner == "off" else (self.learner,)

    @field_validator("eta", mode="before")
    @classmethod
    def _rates(cls, eta: Any) -> Any:
        """One message for any bad η: a number, or a list of 1 to 8, each in (0, 100]."""
        rates = eta if isinstance(eta, list | tuple) else [eta]
        if not 1 <= len(rates) <= MAX_RATES:
            raise ValueError(f"mixture.eta: one rate or a list of 1 to {MAX_RATES}, got {eta!r}")
        for rate in rates:
            if isinstance(rate, bool) or not isinstance(rate, int | float | str):
                raise ValueError(f"mixture.eta: each rate is a number, got {rate!r}")
            try:
                value = float(rate)
            except ValueError:
                raise ValueError(f"mixture.eta: each rate is a number, got {rate!r}") from None
            if not 0 < value <= MAX_ETA:
                raise ValueError(f"mixture.eta: each rate lies in (0, {MAX_ETA:g}], got {rate!r}")
        named = [f"{float(rate):g}" for rate in rates]  # as /metrics names them
        if len(set(named)) < len(named):
            raise ValueError(f"mixture.eta: each rate once, got {eta!r}")
        return eta


class ErrorMemorySettings(Section):
    """ReLoop2's error memory: labelled samples correct the outputs of similar new inputs."""

    kind: Literal["off", "auto", "exact", "hashed"] = Field(
        "off", description="exact top-K retrieval, or the hashed (SimHash sketch) "
        "approximation; auto: exact, asleep until the first label joins (records keep no "
        "features and nothing is compensated before), none for a model without nn.Linear"
    )
    k: PositiveInt = Field(100, description="K, the neighbours of the exact memory")
    temperature: PositiveFloat = Field(0.1, description="τ in softmax(similarity / τ)")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="γ: own error against neighbours'")
    weight: float = Field(0.5, ge=0.0, le=1.0, description="λ, how much error is added back")
    capacity: PositiveInt = Field(10_000, description="the newest rows kept")
    half_life: PositiveFloat | None = Field(
        None, description="recency (exact memory): a row's weight halves with every half_life "
        "rows added after it (a classifier's: rows of its own label); unset weighs rows by "
        "similarity alone"
    )
    center: bool = Field(
        True, description="subtract the reference data's mean feature before the cosine"
    )
    persist: bool = Field(True, description="rows go to the store with their labels; "
                          "reloaded on start")
    options: dict[str, float | int | bool | str] = Field(
        default_factory=dict, description="the hashed memory's knobs (tables, bits, ...)"
    )


class OutputCorrectorSettings(Section):
    """Regression: a small network after the model, trained online on arriving labels (ADCSD)."""

    enabled: bool = False
    hidden: PositiveInt = 128
    learning_rate: PositiveFloat = 1e-3
    window: PositiveInt = Field(64, description="the newest labelled samples a step trains on")
    steps: PositiveInt = Field(1, description="Adam steps per batch of labels")
    loss: Literal["mse", "mae", "huber"] = "mse"
    use_features: bool = Field(True, description="feed the model's features to the network")


class ConformalSettings(Section):
    """Online conformal calibration: a set or an interval on every prediction at 1 − α coverage."""

    method: Literal["auto", "off", "split", "aci", "faci", "dtaci", "sfogd", "saocp", "pid"] = (
        Field("auto", description="dtaci (ACI experts, dynamically tuned), faci, aci, saocp "
              "(strongly adaptive, needs the score range D), sfogd, pid (conformal PID control, "
              "its scorecaster reading the batch's entropy), split (sliding-window split "
              "conformal) or off; auto is the measured best of BENCHMARKS.md B3 (dtaci), and "
              "/v1/state says what it picked"))
    alpha: float = Field(0.1, gt=0.0, lt=1.0, description="target miscoverage; coverage 1 − α")
    score: Literal["auto", "lac", "aps", "residual"] = Field(
        "auto", description="lac (1 − p_y) or aps for classification, residual (|y − ŷ|) for "
        "regression; auto picks lac or residual by task",
    )
    max_scale: PositiveFloat | None = Field(
        None, description="D, the score range SAOCP and SF-OGD learn over: 1 for lac/aps; for "
        "residuals √3 × the largest reference residual when the reference data has labels",
    )
    options: dict[str, float | int | bool | str] = Field(
        default_factory=dict, description="the method's knobs (lifetime, gamma, window, ...)"
    )
    mondrian: Literal["none", "class", "group"] = Field(
        "none", description="none: one threshold for every prediction; class: one per class "
        "(class-conditional coverage, classification only: candidate y is in the set iff its "
        "score is within class y's threshold); group: one per group the caller names in the "
        "predict request (`group`). Each threshold learns from its own labels only",
    )
    mondrian_max_groups: PositiveInt = Field(
        100, description="the most classes or groups with a threshold of their own: a model "
        "with more classes cannot start with mondrian = 'class'; groups beyond the first this "
        "many whose labels arrive are served, and taught, by the shared threshold",
    )
    mondrian_min_labels: int = Field(
        50, ge=0, description="labels a class or group must have taught its own calibrator "
        "before its threshold is served; until then it is served the shared one",
    )


class DetectorSettings(Section):
    """One River drift detector on one signal."""

    detector: Literal["adwin", "page_hinkley", "kswin", "ddm", "eddm", "hddm_a", "hddm_w"]
    signal: Literal["entropy", "confidence", "feature_mean", "error", "residual"]
    params: dict[str, float | int | bool | str] = Field(
        default_factory=dict, description="the River class's constructor arguments")
    chunk: PositiveInt | None = Field(None, description="values per detector update (a mean)")
    warmup: int | None = Field(None, ge=0, description="updates that fix the z-score scale")


class JudgeSettings(Section):
    """Actions held back as controls, and each action kind judged against them by the labels."""

    holdout: int = Field(
        4, ge=0, description="an eligible alarm holds an action back with chance 1 / holdout "
        "(takes it with that chance, once the verdict is hurts); 0 turns the judge off")
    horizon: PositiveInt = Field(
        1000, description="samples before and after an alarm whose labels make its outcome")
    min_trials: int = Field(4, ge=2, description="outcomes each arm needs before a verdict")
    z: PositiveFloat = Field(3.0, description="Welch's statistic of acted against held "
                             "outcomes at which an action kind hurts (or, negated, helps)")
    kept: PositiveInt = Field(20, description="outcomes kept per arm")
    min_labels: PositiveInt = Field(
        20, description="labels each window needs for an alarm's outcome to count")
    seed: int = Field(0, ge=0, description="seeds the draws of which alarms hold an action back")

    @model_validator(mode="after")
    def _fits(self) -> JudgeSettings:
        if self.holdout == 1:
            raise ValueError("drift.policy.judge.holdout: 0 (off) or at least 2 (1 would hold "
                             "back every action)")
        if self.kept < self.min_trials:
            raise ValueError("drift.policy.judge: kept must be at least min_trials")
        return self


class PolicySettings(Section):
    """What an alarm does (see docs/adaptation.md): actions, boost, cool-down, confirmation."""

    label_free_actions: list[Literal["boost_lr", "reset_adapter", "trim_memory",
                                     "reset_calibrator"]] = ["boost_lr"]
    labelled_actions: list[Literal["boost_lr", "reset_adapter", "trim_memory",
                                   "reset_calibrator"]] = ["boost_lr", "trim_memory"]
    boost: float = Field(5.0, ge=1.0, description="the learning rate's multiplier at an alarm")
    half_life: PositiveFloat = Field(500.0, description="samples over which the boost halves")
    cooldown: int = Field(2000, ge=0, description="samples before an action is taken again")
    confirmation: Literal["independent", "labelled"] = Field(
        "independent", description="labelled: a label-free alarm acts only once a labelled "
        "alarm follows within confirm_window samples",
    )
    confirm_window: int = Field(2000, ge=0)
    trim_keep: int = Field(64, ge=0, description="rows a memory keeps at trim_memory")
    judge: JudgeSettings = JudgeSettings()


class DriftSettings(Section):
    """Drift detectors on label-free and labelled signals, and the policy acting on alarms."""

    enabled: bool = True
    label_free: list[DetectorSettings] | None = Field(
        None, description="detectors on the prediction path; default: the measured defaults on "
        "entropy and feature_mean (classification) or feature_mean (regression)",
    )
    labelled: list[DetectorSettings] | None = Field(
        None, description="detectors on the label path; default: the measured default on the "
        "0/1 error (classification) or the absolute residual (regression)",
    )
    label_free_baseline: Literal["class", "none"] = Field(
        "class", description="class: a classifier's label-free detectors see each value's "
        "distance from the running level of the class predicted for its sample "
        "(`drift.baseline`), so classes arriving in runs do not look like drift; none: the "
        "values as they are (a regressor's always)",
    )
    policy: PolicySettings = PolicySettings()
    act_on: Literal["harm", "any"] = Field(
        "harm", description="harm: an alarm whose signal moved the harmless way (entropy, error "
        "or residual down, confidence up: often the model improving as it learns) is an event "
        "of kind drift_change and takes no action; any: every alarm goes to the policy",
    )
    events_kept: PositiveInt = Field(1000, description="events kept in the store's shared log")
    save_every_s: PositiveFloat = Field(
        30.0, description="how often detector and policy state is saved to the store"
    )

    @model_validator(mode="after")
    def _signals_fit_paths(self) -> DriftSettings:
        for path, specs, labelled in (("label_free", self.label_free, False),
                                      ("labelled", self.labelled, True)):
            for spec in specs or []:
                if (spec.signal in ("error", "residual")) != labelled:
                    raise ValueError(f"drift.{path}: signal {spec.signal!r} belongs to the "
                                     f"{'labelled' if not labelled else 'label_free'} list")
        return self


class Settings(BaseSettings):
    """Everything the service reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="ADAPTD_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_token: SecretStr | None = Field(
        None, description="bearer token required by write routes when set"
    )
    max_body_bytes: PositiveInt = Field(8 * 1024 * 1024, description="larger bodies get 413")
    body_timeout_s: PositiveFloat = Field(
        10.0, description="a request body not fully received this long after the request's "
        "headers gets 408 and its connection is closed",
    )
    keep_alive_s: PositiveInt = Field(
        5, description="an idle keep-alive connection is closed after this long (adaptd serve)"
    )
    max_connections: PositiveInt = Field(
        512, description="open connections or requests being handled at once, at most; beyond "
        "it new requests get 503 from uvicorn (adaptd serve; uvicorn's limit_concurrency)",
    )
    http: Literal["auto", "httptools", "h11"] = Field(
        "auto", description="adaptd serve: uvicorn's HTTP parser; auto: httptools (C, installed "
        "with adaptd) where it imports, else h11 (pure Python)",
    )
    loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="adaptd serve: the event loop; auto: uvloop (libuv, installed with "
        "adaptd on Linux and macOS) where it imports, else asyncio's own",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    torch_threads: PositiveInt | None = Field(
        None, description="threads torch may use within one forward pass or step (its intra-op "
        "threads); unset: one fewer than the CPUs this process may run on, at least 1, so that "
        "reading, parsing and answering requests keep a core while the model computes",
    )

    model: ModelSettings = ModelSettings()
    batcher: BatcherSettings = BatcherSettings()
    store: StoreSettings = StoreSettings()
    adapter: AdapterSettings = AdapterSettings()
    feedback: FeedbackSettings = FeedbackSettings()
    supervised: SupervisedSettings = SupervisedSettings()
    error_memory: ErrorMemorySettings = ErrorMemorySettings()
    shadow: ShadowSettings = ShadowSettings()
    mixture: MixtureSettings = MixtureSettings()
    output_corrector: OutputCorrectorSettings = OutputCorrectorSettings()
    conformal: ConformalSettings = ConformalSettings()
    drift: DriftSettings = DriftSettings()

    def __init__(self, **values: Any) -> None:
        _refuse_renamed_keys(values)  # flags and keyword arguments; the sources check their own
        super().__init__(**values)

    @model_validator(mode="after")
    def _parts_fit(self) -> Settings:
        if self.feedback.stream and not self.store.url.startswith(("redis", "rediss", "unix")):
            raise ValueError("feedback.stream consumes a Redis Stream: set store.url to a redis "
                             "URL, or send labels to POST /v1/feedback")
        score = self.conformal.score
        task = task_named(self.model.task)
        if score != "auto" and score not in task.scores_known:
            raise ValueError(f"conformal.score {score!r} does not fit a {task} model: "
                             "use lac or aps for classification, residual for regression")
        if self.output_corrector.enabled and task.discrete:
            raise ValueError("output_corrector corrects a regression model's values; for "
                             "classification use error_memory")
        return self

    @property
    def namespace(self) -> str:
        return self.store.namespace or self.model.name

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [
            init_settings, env_settings, _RenamedEnvironment(settings_cls)
        ]
        if settings_cls.model_config.get("toml_file"):
            sources.append(_TomlFile(settings_cls))
        return tuple(sources)


class _RenamedEnvironment(PydanticBaseSettingsSource):
    """Refuses the ADAPTD_* variables of renamed keys. The environment source drops a variable of
    an unknown top-level section (ADAPTD_COMPENSATION__KIND) without a word, which would leave the
    part silently off; this source adds nothing."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        prefix = str(self.config.get("env_prefix") or "").lower()
        delimiter = str(self.config.get("env_nested_delimiter") or "__")
        found = []
        for name, value in sorted(os.environ.items()):
            if not name.lower().startswith(prefix):
                continue
            path = tuple(name.lower()[len(prefix):].split(delimiter))
            for old, message in RENAMED.items():
                if path[:len(old)] == old:
                    found.append(((name,), message, value))
                elif old[:len(path)] == path and _json_has(value, old[len(path):]):
                    found.append(((name,), message, value))  # ADAPTD_FEEDBACK='{"supervised": ..}'
        _refuse(found)
        return {}


def _json_has(value: str | None, path: tuple[str, ...]) -> bool:
    """Whether `value`, read as JSON, is a table with `path` in it."""
    try:
        node = json.loads(value or "")
    except ValueError:
        return False
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


class _TomlFile(TomlConfigSettingsSource):
    """The TOML file, refusing renamed keys by name before the table reaches validation."""

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        _refuse_renamed_keys(data)
        return data


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Settings from the config file, the environment and `overrides` (CLI flags), in that order.

    Overrides are nested like the file: ``load_settings(store={"url": "redis://..."})``.

    >>> load_settings(adapter={"name": "tent"}).adapter.name
    'tent'
    """
    config = config or os.environ.get("ADAPTD_CONFIG")
    settings_cls: type[Settings] = Settings
    if config:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        settings_cls = type(
            "Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": path}}
        )
    return settings_cls(**overrides)
