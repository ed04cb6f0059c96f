"""The one place where store keys are built, so every key of a deployment sits under one prefix.

A deployment and model share a namespace (for instance ``demo:digits-cnn``); its keys all start
with ``adaptd:{namespace}:``. The braces are literal: they make the namespace a Redis Cluster hash
tag, so every key of one namespace hashes to the same slot. The join script touches many records in
one call and the adapter save touches a counter, a blob and a pointer together, which a cluster
only allows within one slot. The price is that one namespace lives on one shard; deployments grow
by namespace (one per model), not by spreading one model's records over shards. The closing brace
also keeps namespaces apart: ``adaptd:{a}:`` is never a prefix of ``adaptd:{a:b}:``.

>>> keys = Keys("demo:digits-cnn")
>>> keys.record("req-1")
'adaptd:{demo:digits-cnn}:record:req-1'
>>> keys.adapter_blob(3)
'adaptd:{demo:digits-cnn}:adapter:blob:3'
>>> keys.memory("adanpc")
'adaptd:{demo:digits-cnn}:memory:adanpc'
"""

from __future__ import annotations


class Keys:
    """Key names for one namespace; ids go last, so any id stays inside the namespace prefix."""

    def __init__(self, namespace: str) -> None:
        if not namespace:
            raise ValueError("the store namespace is empty: name the deployment and model")
        if "{" in namespace or "}" in namespace:
            # a brace would end the hash tag early and let two namespaces share a prefix
            raise ValueError(f"the store namespace {namespace!r} contains a brace; remove it")
        self.namespace = namespace
        self.prefix = f"adaptd:{{{namespace}}}:"

    def record(self, prediction_id: str) -> str:
        """The hash holding one prediction record (`PredictionRecord.to_fields`)."""
        return f"{self.prefix}record:{prediction_id}"

    def seen(self, prediction_id: str) -> str:
        """The marker that outlives a record by the grace period: ``0`` unlabelled, ``1`` labelled.

        It is what tells an expired id (or one labelled before it expired) from one never seen.
        """
        return f"{self.prefix}seen:{prediction_id}"

    def adapter_blob(self, version: int) -> str:
        """The checkpoint bytes (safetensors) of one adapter version."""
        return f"{self.prefix}adapter:blob:{int(version)}"

    def adapter_latest(self) -> str:
        """The pointer to the newest adapter version."""
        return f"{self.prefix}adapter:latest"

    def adapter_version(self) -> str:
        """The counter that hands out adapter versions (INCR), so replicas never reuse one."""
        return f"{self.prefix}adapter:version"

    def ready(self) -> str:
        """The key a readiness probe writes (with a TTL of seconds): can the store take writes?"""
        return f"{self.prefix}ready"

    def memory(self, name: str) -> str:
        """The list of packed float32 rows of one named memory (AdaNPC's, the error memory)."""
        if not name:
            raise ValueError("a memory needs a name, such as 'adanpc'")
        return f"{self.prefix}memory:{name}"

    def labels(self) -> str:
        """The Stream that label producers add to (fields ``id`` and ``label``), consumed by the
        replicas as one consumer group."""
        return f"{self.prefix}labels"

    def dead_labels(self) -> str:
        """The capped Stream where malformed label entries go, with the reason, instead of being
        lost or blocking the ones behind them."""
        return f"{self.prefix}labels:dead"

    def events(self) -> str:
        """The capped list of events (drift alarms and actions, resets), newest first, as JSON."""
        return f"{self.prefix}events"

    def state(self, name: str) -> str:
        """A named piece of saved state, such as the drift detectors' and policy's."""
        if not name:
            raise ValueError("a saved state needs a name, such as 'drift'")
        return f"{self.prefix}state:{name}"

    def calibrator(self, name: str) -> str:
        """The state of one named online conformal calibrator, shared by every replica."""
        if not name:
            raise ValueError("a calibrator needs a name, such as 'conformal'")
        return f"{self.prefix}calibrator:{name}"
