"""Drift: River's detectors on label-free and labelled signals, and the policy that acts on alarms.

`drift.detectors` wraps one `river.drift` detector on one named signal (`SignalDetector`, built by
`build_detector` or `default_detector`), with a JSON state that survives a restart; River has no
public state API, so `drift.persistence` reads and writes the River detectors' internals for that
state. `Alarm.to_json` is an alarm's one JSON shape, saved and served. `drift.policy`
turns alarms into actions (a learning-rate boost that decays back, an adapter reset, a memory trim,
a calibrator reset) with a cool-down and a confirmation rule, and says what it did as event dicts;
`drift.judge` holds back a share of those actions and judges each kind against them by the labels.
`drift.baseline` measures a classifier's label-free values against the level of the class predicted
for each sample, so classes arriving in runs do not look like drift.
None of them imports the service or the adapters: the engine feeds signals in and applies actions.
"""

from __future__ import annotations

from drift.baseline import ClassBaseline
from drift.detectors import (
    DEFAULT_DETECTORS,
    DETECTORS,
    SIGNALS,
    Alarm,
    SignalDetector,
    StateMismatch,
    build_detector,
    confidence,
    default_detector,
    entropy,
    feature_mean,
)
from drift.judge import ActionJudge
from drift.policy import ACTIONS, Action, DriftPolicy

__all__ = [
    "ACTIONS",
    "DEFAULT_DETECTORS",
    "DETECTORS",
    "SIGNALS",
    "Action",
    "ActionJudge",
    "Alarm",
    "ClassBaseline",
    "DriftPolicy",
    "SignalDetector",
    "StateMismatch",
    "build_detector",
    "confidence",
    "default_detector",
    "entropy",
    "feature_mean",
]
