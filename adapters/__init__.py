"""Test-time adaptation methods, one per file, and `build_adapter`, which picks one by name.

`adapters` as a whole holds everything that adapts online, one room per kind: `adapters.tta` (this
registry's methods and what they share: robust BatchNorm, the Fisher estimate, the collapse guard),
`adapters.memory` (AdaNPC and the error memory over one cosine top-k vote), `adapters.labels` (what
learns from joined labels: the output corrector, the low-rank adapter and supervised step),
`adapters.conformal` (scores and the online calibrators) and `adapters.learner` (the `Learner`
protocol every learning part implements).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Protocol

import torch.nn as nn

from adapters.task import Task, task_named
from adapters.tta.base import Adapter, AdaptOutput, GradientAdapter, softmax_entropy
from adapters.tta.bn import NormStatistics
from adapters.tta.eata import EATA, ETA
from adapters.tta.none import NoAdaptation
from adapters.tta.psmt import PSMT
from adapters.tta.rotta import RoTTA
from adapters.tta.sar import SAR
from adapters.tta.tent import Tent

ADAPTERS: dict[str, type[Adapter]] = {
    NoAdaptation.name: NoAdaptation,
    NormStatistics.name: NormStatistics,
    Tent.name: Tent,
    ETA.name: ETA,
    EATA.name: EATA,
    PSMT.name: PSMT,
    RoTTA.name: RoTTA,
    SAR.name: SAR,
}


class AdapterKnobs(Protocol):
    """What `build_adapter` reads from its settings (the service's `AdapterSettings` has these)."""

    @property
    def method(self) -> str: ...
    @property
    def norm(self) -> str: ...
    @property
    def norm_momentum(self) -> float: ...
    @property
    def norm_window(self) -> int: ...
    @property
    def adapt_batch_size(self) -> int: ...
    @property
    def max_learning_rate(self) -> float: ...
    @property
    def learning_rate(self) -> float | None: ...
    @property
    def options(self) -> Mapping[str, object]: ...


def build_adapter(settings: AdapterKnobs | str, model: nn.Module, task: str | Task,
                  **context: object) -> Adapter:
    """The adapter that `settings` names (an `AdapterSettings`, or just a name), around `model`.

    Common knobs (norm, norm_momentum, adapt_batch_size, max_learning_rate, learning_rate) go to
    the methods that take them; `settings.options` are the method's own constructor arguments;
    `context` (num_classes, the reference inputs) goes to the methods whose constructors name it.

    >>> import torch.nn as nn
    >>> build_adapter("none", nn.Linear(4, 2), task="classification").name
    'none'
    """
    name = settings if isinstance(settings, str) else settings.method
    try:
        adapter_cls = ADAPTERS[name]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise ValueError(f"unknown adapter {name!r}; choose one of: {known}") from None
    task = task_named(task).name
    if task not in adapter_cls.tasks:
        tasks = ", ".join(adapter_cls.tasks)
        raise ValueError(f"adapter {name!r} works for {tasks} models, not {task}")
    kwargs: dict[str, object] = {}
    if not isinstance(settings, str):
        accepted = inspect.signature(adapter_cls.__init__).parameters
        takes_common = issubclass(adapter_cls, GradientAdapter)
        common = {"norm": settings.norm, "norm_momentum": settings.norm_momentum,
                  "norm_window": settings.norm_window}
        if context.get("num_classes") is not None:
            common["num_classes"] = context["num_classes"]
        if takes_common:
            common |= {"adapt_batch_size": settings.adapt_batch_size,
                       "max_learning_rate": settings.max_learning_rate}
        if settings.learning_rate is not None:
            common["learning_rate"] = settings.learning_rate
        kwargs = {k: v for k, v in common.items() if k in accepted or takes_common}
        unknown = set(settings.options) - set(accepted)
        if unknown:
            raise ValueError(f"adapter {name!r} has no option {sorted(unknown)}; it takes "
                             f"{sorted(set(accepted) - {'self', 'model', 'common'})}")
        kwargs |= settings.options
    accepted = inspect.signature(adapter_cls.__init__).parameters
    kwargs |= {k: v for k, v in context.items() if k in accepted and v is not None}
    return adapter_cls(model, **kwargs)


__all__ = ["ADAPTERS", "EATA", "ETA", "AdaptOutput", "Adapter", "GradientAdapter", "NoAdaptation",
           "NormStatistics", "PSMT", "RoTTA", "SAR", "Tent", "build_adapter", "softmax_entropy"]
