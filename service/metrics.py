"""Prometheus metrics, all named `adaptd_*`, on a registry of the app's own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# the *_created series double every counter's exposition and no dashboard here reads them
disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LAG_BUCKETS = (0.1, 1, 10, 60, 300, 900, 3600, 4 * 3600, 86_400, 7 * 86_400)


class Metrics:
    """Every metric the service exports. Labels are bounded: route templates, outcomes, ops."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "adaptd_http_requests", "HTTP requests by route template, method (GET, POST, PUT, "
            "DELETE, PATCH, HEAD, OPTIONS or other) and status class (2xx, 3xx, 4xx, 5xx)",
            ["route", "method", "status"], registry=r,
        )
        self.request_latency = Histogram(
            "adaptd_http_request_duration_seconds", "HTTP request latency by route template",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "adaptd_batch_size", "samples per forward pass after micro-batching",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "adaptd_queue_depth", "samples waiting in the micro-batcher", registry=r
        )
        self.inflight_requests = Gauge(
            "adaptd_inflight_requests", "prediction requests queued, gathered or running in the "
            "micro-batcher", registry=r,
        )
        self.requests_shed = Counter(
            "adaptd_requests_shed", "prediction requests refused at once with 503 because the "
            "micro-batcher was full, by bound: queued_samples or inflight_requests",
            ["reason"], registry=r,
        )
        for reason in ("queued_samples", "inflight_requests"):
            self.requests_shed.labels(reason)
        self.predictions = Counter(
            "adaptd_predictions", "samples predicted", registry=r
        )
        self.prediction_failures = Counter(
            "adaptd_prediction_failures", "samples whose forward pass failed", registry=r
        )
        self.repeated_inputs = Counter(
            "adaptd_repeated_inputs", "samples served but not learnt from: their batch held only "
            "inputs identical to recent ones (a repeated request is one sample to what learns)",
            registry=r,
        )
        self.non_finite_outputs = Counter(
            "adaptd_non_finite_outputs", "samples refused because the model gave NaN or infinite "
            "outputs for them, run alone (they also count as prediction failures)", registry=r
        )
        self.labels = Counter(
            "adaptd_labels", "labels received, by outcome of the join",
            ["outcome"], registry=r,
        )
        for outcome in ("joined", "unknown", "duplicate", "expired", "rejected"):
            self.labels.labels(outcome)
        self.label_lag = Histogram(
            "adaptd_label_lag_seconds", "time from prediction to its joined label",
            buckets=LAG_BUCKETS, registry=r,
        )
        self.rolling_error = Gauge(
            "adaptd_rolling_error",
            "error rate (classification) or mean absolute error (regression) over the last labels",
            registry=r,
        )
        self.rolling_labels = Gauge(
            "adaptd_rolling_labels", "labels currently in the rolling error window", registry=r
        )
        self.adaptation_steps = Counter(
            "adaptd_adaptation_steps", "optimizer steps taken by the test-time adapter", registry=r
        )
        self.adaptation_skipped = Counter(
            "adaptd_adaptation_skipped", "adaptation steps not taken because the loss or a "
            "gradient was NaN or infinite", registry=r,
        )
        self.adaptation_samples = Counter(
            "adaptd_adaptation_samples", "samples that entered a gradient step (backward samples)",
            registry=r,
        )
        self.learning_rate = Gauge(
            "adaptd_learning_rate", "current learning rate of the test-time adapter", registry=r
        )
        self.mean_entropy = Gauge(
            "adaptd_mean_entropy", "mean softmax entropy of the last batch", registry=r
        )
        self.correction_steps = Counter(
            "adaptd_correction_steps", "updates of the regression output corrector from labels",
            registry=r,
        )
        self.supervised_steps = Counter(
            "adaptd_supervised_steps",
            "supervised optimizer steps on labelled feedback, replays included",
            registry=r,
        )
        self.stream_entries = Counter(
            "adaptd_label_stream_entries",
            "label stream entries by what became of them: read, claimed (from a dead consumer), "
            "acked, dead (malformed, moved to the dead-letter stream)", ["outcome"], registry=r,
        )
        for outcome in ("read", "claimed", "acked", "dead"):
            self.stream_entries.labels(outcome)
        self.stream_crashes = Counter(
            "adaptd_label_stream_crashes", "times the label-stream consumer died of an "
            "unexpected error (each is logged with its traceback and restarted)", registry=r,
        )
        self.stream_backlog = Gauge(
            "adaptd_label_stream_backlog", "entries in the label stream not yet acknowledged",
            registry=r,
        )
        self.conformal_coverage = Gauge(
            "adaptd_conformal_coverage", "share of the last labels inside the set or interval "
            "served for them, by calibrator and window (labels)", ["calibrator", "window"],
            registry=r,
        )
        self.conformal_size = Gauge(
            "adaptd_conformal_size", "mean set size (classification) or interval width "
            "(regression) of the last 1000 predictions", ["calibrator"], registry=r,
        )
        self.conformal_alpha = Gauge(
            "adaptd_conformal_alpha", "the calibrator's current miscoverage level α_t",
            ["calibrator"], registry=r,
        )
        self.conformal_threshold = Gauge(
            "adaptd_conformal_threshold", "the score threshold sets and intervals are built with",
            ["calibrator"], registry=r,
        )
        self.conformal_target = Gauge(
            "adaptd_conformal_target", "the coverage the calibrator aims at, 1 − α",
            ["calibrator"], registry=r,
        )
        # bounded: the classes of a model with at most conformal.mondrian_max_groups of them,
        # or at most that many groups
        self.conformal_group_coverage = Gauge(
            "adaptd_conformal_group_coverage", "share of the last 1000 labels of one class (by "
            "its label) or one named group inside the set or interval served for them",
            ["calibrator", "by", "group"], registry=r,
        )
        self.conformal_group_threshold = Gauge(
            "adaptd_conformal_group_threshold", "the threshold of one class's or group's own "
            "calibrator (conformal.mondrian), as last read from the store",
            ["calibrator", "by", "group"], registry=r,
        )
        self.drift_alarms = Counter(
            "adaptd_drift_alarms", "drift alarms raised, by detector and signal",
            ["detector", "signal"], registry=r,
        )
        self.drift_actions = Counter(
            "adaptd_drift_actions", "actions the drift policy took, by action and the alarm's "
            "detector and signal", ["action", "detector", "signal"], registry=r,
        )
        self.drift_held = Counter(
            "adaptd_drift_actions_held", "actions the drift policy held back as controls (or "
            "because the judge found them hurting), by action", ["action"], registry=r,
        )
        self.drift_effect = Gauge(
            "adaptd_drift_action_effect", "the mean change of the labelled loss (less the "
            "source's on the same samples, where the shadow's copy serves) from before an "
            "alarm to after it, over the judged alarms where the action was acted or held",
            ["action", "arm"], registry=r,
        )
        self.drift_verdict = Gauge(
            "adaptd_drift_action_verdict", "the judge's verdict on an action kind: 1 hurts, 0 "
            "unclear, -1 helps", ["action"], registry=r,
        )
        self.drift_boost = Gauge(
            "adaptd_drift_learning_rate_factor", "the drift policy's learning-rate multiplier "
            "now (1 outside a boost)", registry=r,
        )
        self.memory_size = Gauge(
            "adaptd_memory_size", "rows in each memory (seed included)", ["memory"], registry=r
        )
        self.adapter_resets = Counter(
            "adaptd_adapter_resets", "adapter resets to the source weights, by who asked",
            ["reason"], registry=r,
        )
        self.events = Counter(
            "adaptd_events", "events by kind, source and action (e.g. collapse, guard, reset)",
            ["kind", "source", "action"], registry=r,
        )
        for reason in ("operator", "collapse", "drift", "shadow"):
            self.adapter_resets.labels(reason)
        for kind, source in (("collapse", "guard"), ("reset", "operator"), ("shadow", "shadow")):
            self.events.labels(kind, source, "adapter_reset")
        self.shadow_error = Gauge(
            "adaptd_shadow_error", "the shadow comparison on joined labels: the error rate (or "
            "mean absolute error) of what was served and of the source model on the same samples, "
            "over the comparison's window since the last reset", ["model"], registry=r,
        )
        self.mixture_weight = Gauge(
            "adaptd_mixture_weight", "the online mixture's weight on each candidate "
            "(newest_label, recent_residual, learner.<kind> for each of River's learners, "
            "source, adapted, "
            "compensated) as served, learnt from joined labels (a candidate on probation "
            "capped at the slowest rate's weight)",
            ["candidate"], registry=r,
        )
        self.mixture_rate_share = Gauge(
            "adaptd_mixture_rate_share", "with several mixture.eta, the share of what is served "
            "that each rate has, learnt from what each rate served for joined labels",
            ["eta"], registry=r,
        )
        self.store_errors = Counter(
            "adaptd_store_errors", "store operations that failed, by operation",
            ["op"], registry=r,
        )
        self.store_up = Gauge(
            "adaptd_store_up", "1 when the store answered its last operation", registry=r
        )
