"""The meta of a worker snapshot, typed: `SnapshotMeta` and its one dict form (`to_dict`/`from_dict`).

The worker writes this dict into every snapshot's manifest (`SnapshotManager.write_state(meta=...)`)
and every reader parses it through `SnapshotMeta.from_dict` (the worker's restore, the serving
snapshot reader, the export): one place knows the keys, their types and the back-compat rules.

Back-compat (`from_dict`): every key may be missing (a snapshot written by `serving.snapshots.snapshot_state`
holds only `cache`; older ones less): missing fields get the defaults below. The cache config is
read from meta["cache"], else meta["config"]["cache"], else meta["configs"]["cache"] (older
layouts); a value there that is not a mapping is ignored, as is a `lineage` that is not a string.
Keys this module does not know are ignored (a newer writer may add some). `model_versions` (the
`ModelSwap`s of online learning, oldest first) is written only when not empty, so
`SnapshotMeta.from_dict(d).to_dict() == d` for every dict the worker writes.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from felrec_stream.config import CacheConfig, ScoringConfig, from_dict as config_from_dict
from felrec_stream.errors import StoreError

_INTS = ("applied_events", "batches", "dead_letters", "late_events")
_OPTIONAL_STRS = ("kind", "topic", "model_version", "checkpoint")


class InvalidSnapshotMeta(StoreError, ValueError):
    """A snapshot's meta holds a field of the wrong type (the snapshot is skipped like a corrupt one)."""


@dataclass(frozen=True)
class ModelSwap:
    """The worker switched to published version `version` (weights `model_version`) after
    `applied_events` events (the store had applied `store_events`), at topic `offsets`."""

    version: str
    model_version: str
    applied_events: int
    store_events: int
    offsets: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "model_version": self.model_version, "applied_events": self.applied_events,
                "store_events": self.store_events,
                "offsets": {str(k): int(v) for k, v in sorted(self.offsets.items())}}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelSwap":
        return cls(str(values["version"]), str(values["model_version"]), int(values["applied_events"]),
                   int(values["store_events"]), {int(k): int(v) for k, v in dict(values["offsets"]).items()})


@dataclass(frozen=True)
class SnapshotMeta:
    """What a worker snapshot says about itself (the dict is `to_dict()`; see the module docstring).

    Mapping fields hold plain JSON values; treat them as read-only (`to_dict` hands out copies).
    """

    kind: str | None = None  # "felrec-worker" for the worker's snapshots
    format: int | None = None  # the worker's snapshot format
    topic: str | None = None
    lineage: str | None = None  # the writer's history id (a writer that starts from scratch begins a new one)
    topic_identity: dict[str, Any] = field(default_factory=dict)  # Source.identity() when written
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset to read
    applied_events: int = 0
    batches: int = 0
    dead_letters: int = 0
    late_events: int = 0
    batch_size: int | None = None
    model_version: str | None = None
    checkpoint: str | None = None  # the checkpoint's path
    cache: dict[str, Any] = field(default_factory=dict)  # the cache config as run (shards, index): serving reads it
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # section -> config dict (encoder, model, ...)
    # online learning: the published weight versions the worker switched to, oldest first; the
    # last one wrote the newest vectors (the worker restores it). Written only when not empty.
    model_versions: tuple[ModelSwap, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict written into the manifest (offsets keyed by str(partition), sorted)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "offsets":
                value = {str(k): int(v) for k, v in sorted(value.items())}
            elif f.name == "model_versions":
                if not value:
                    continue
                value = [swap.to_dict() for swap in value]
            out[f.name] = copy.deepcopy(value)
        return out

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any] | None) -> "SnapshotMeta":
        """Parse a manifest's meta (see the module docstring for what may be missing or old)."""
        if meta is None:
            meta = {}
        if not isinstance(meta, Mapping):
            raise InvalidSnapshotMeta(f"snapshot meta must be a mapping, got {type(meta).__name__}")
        values: dict[str, Any] = {"lineage": lineage_of(meta), "cache": _cache_values(meta),
                                  "configs": _mappings(meta.get("configs"))}
        try:
            for name in _OPTIONAL_STRS:
                if meta.get(name) is not None:
                    values[name] = str(meta[name])
            for name in ("format", "batch_size"):
                if meta.get(name) is not None:
                    values[name] = int(meta[name])
            for name in _INTS:
                if meta.get(name) is not None:
                    values[name] = int(meta[name])
            values["offsets"] = {int(k): int(v) for k, v in dict(meta.get("offsets") or {}).items()}
            values["topic_identity"] = copy.deepcopy(dict(meta.get("topic_identity") or {}))
            values["model_versions"] = tuple(ModelSwap.from_dict(v) for v in (meta.get("model_versions") or ()))
        except (TypeError, ValueError, KeyError) as exc:
            raise InvalidSnapshotMeta(f"malformed snapshot meta: {type(exc).__name__}: {exc}") from None
        return cls(**values)

    def cache_config(self, overrides: Mapping[str, Any] | None = None) -> CacheConfig:
        """The recorded cache config (missing -> CacheConfig() defaults) plus the non-None `overrides`."""
        values = dict(self.cache)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return config_from_dict(CacheConfig, values, "cache")

    def scoring_config(self) -> ScoringConfig:
        """The recorded scoring config (configs["scoring"]); missing -> defaults (weight 0: cosine
        only, as snapshots written before the popularity prior were served)."""
        return config_from_dict(ScoringConfig, self.configs.get("scoring") or {}, "scoring")


def lineage_of(meta: Mapping[str, Any]) -> str | None:
    """meta["lineage"] when it is a string (`Snapshot.lineage` reads it here too)."""
    value = meta.get("lineage")
    return value if isinstance(value, str) else None


def _cache_values(meta: Mapping[str, Any]) -> dict[str, Any]:
    for holder in (meta, meta.get("config") or {}, meta.get("configs") or {}):
        if isinstance(holder, Mapping) and isinstance(holder.get("cache"), Mapping):
            return copy.deepcopy(dict(holder["cache"]))
    return {}


def _mappings(value: Any) -> dict[str, dict[str, Any]]:
    """configs: the sections that are mappings (anything else was never readable)."""
    if not isinstance(value, Mapping):
        return {}
    return {str(k): copy.deepcopy(dict(v)) for k, v in value.items() if isinstance(v, Mapping)}
