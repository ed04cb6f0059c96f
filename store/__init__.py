"""State that must outlive a process or be shared by replicas, behind one narrow contract.

`Store` is the contract (see `store.base`); `MemoryStore` keeps everything in process (the embedded
default) and `RedisStore` keeps it in Redis under one namespace prefix. `open_store` builds either
from a URL.
"""

from __future__ import annotations

from typing import Any

from store.base import (
    EffectsFn,
    JoinResult,
    LabelEffects,
    LabelStream,
    LabelValue,
    PartialJoin,
    PredictionRecord,
    Snapshots,
    Store,
    StoreUnavailable,
)
from store.memory import MemoryStore


def open_store(url: str, namespace: str, record_ttl_s: float, **options: Any) -> Store:
    """Build a store from a URL: ``memory`` (or ``memory://``) or ``redis://host:port/db``.

    ``options`` go to the backend's constructor (`MemoryStore` or `RedisStore`), whose own
    parameters they must be: which ones apply depends on the URL.

    >>> store = open_store("memory", namespace="demo", record_ttl_s=60)
    >>> store.backend
    'memory'
    """
    if url in ("memory", "memory://"):
        return MemoryStore(namespace=namespace, record_ttl_s=record_ttl_s, **options)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from store.redis import RedisStore

        return RedisStore(url, namespace=namespace, record_ttl_s=record_ttl_s, **options)
    raise ValueError(
        f"unknown store {url!r}: use 'memory' or a redis URL such as redis://localhost:6379/0"
    )


__all__ = [
    "EffectsFn",
    "JoinResult",
    "LabelEffects",
    "LabelStream",
    "LabelValue",
    "PartialJoin",
    "MemoryStore",
    "PredictionRecord",
    "Snapshots",
    "Store",
    "StoreUnavailable",
    "open_store",
]
