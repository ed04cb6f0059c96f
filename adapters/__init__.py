"""Everything that adapts online. One method per file; `build_adapter` picks one by name."""

from __future__ import annotations

from adapters.base import Adapter, AdaptOutput, softmax_entropy
from adapters.none import NoAdaptation
from adapters.tent import Tent

ADAPTERS: dict[str, type[Adapter]] = {
    NoAdaptation.name: NoAdaptation,
    Tent.name: Tent,
}


def build_adapter(name: str, model, task: str, **options: object) -> Adapter:
    """The adapter called `name` (lower case, as in the config), wrapped around `model`.

    >>> import torch.nn as nn
    >>> build_adapter("none", nn.Linear(4, 2), task="classification").name
    'none'
    """
    try:
        adapter_cls = ADAPTERS[name]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise ValueError(f"unknown adapter {name!r}; choose one of: {known}") from None
    if task not in adapter_cls.tasks:
        tasks = ", ".join(adapter_cls.tasks)
        raise ValueError(f"adapter {name!r} works for {tasks} models, not {task}")
    return adapter_cls(model, **options)


__all__ = ["ADAPTERS", "AdaptOutput", "Adapter", "NoAdaptation", "Tent", "build_adapter",
           "softmax_entropy"]
