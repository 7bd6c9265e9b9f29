"""Published weight versions: immutable folders made visible by an atomic pointer (online learning).

`felrec-stream learn` publishes the encoder it trains on the live topic every N events; the worker
(`consume --models-dir`), `serve` replicas and `export` read them. A version is a few MB: the whole
FELRec model is its encoder.

Layout under `root` (the models directory):

    versions/v000003/            one version (seq 3), never changed once visible
        weights.pt               a felrec-stream checkpoint (weights + configs): `load_model` reads it
        manifest.json            `VersionManifest` (parent, trained-through position, digests, guard)
    LATEST                       {"version": "v000003"}: the newest published version
    PROGRESS                     {"events": n, "offsets": {...}, "done": bool}: how far the learner has
                                 decided (published or refused) its versions; a worker in until-end mode
                                 waits for it, so the versions it adopts do not depend on timing
    pins/<owner>.json            the versions a reader's kept snapshots name (never deleted)
    .tmp-*                       a publish in progress (removed by the next publisher)

Publish protocol: weights + manifest into `.tmp-<name>` (each fsynced) -> rename to `versions/<name>`
-> fsync `versions/` -> LATEST tmp + fsync + os.replace. A crash before the rename leaves a `.tmp-*`
folder nobody reads; after it and before LATEST, a complete version that the next `publish` of the
same name finds and keeps (publishing is idempotent: the learner publishes again after a restart).

Positions: `trained_through` holds the topic positions (next offset per partition) after the last
event the version was trained on, and their count. A reader adopts a version only when it has
applied every one of those events: no event is ever encoded or scored by weights trained on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from felrec_stream.config import Configs, to_dict
from felrec_stream.errors import ModelError
from felrec_stream.faults import fault_point
from felrec_stream.state.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from felrec_stream.state.durable import atomic_json, fsync_dir

VERSIONS, LATEST, PROGRESS, PINS = "versions", "LATEST", "PROGRESS", "pins"
WEIGHTS, MANIFEST = "weights.pt", "manifest.json"
_NAME = re.compile(r"^v(\d{6,})$")


def model_version(model_state: Mapping[str, torch.Tensor], configs: Configs) -> str:
    """sha256 over the weights and the configs that change what the encoder writes.

    Why not the file hash: re-saving the same weights (another epoch counter, optimizer state)
    must not invalidate a worker's snapshots; a changed weight or history length must.
    """
    sha = hashlib.sha256()
    for name in sorted(model_state):
        tensor = model_state[name].detach().cpu().contiguous()
        sha.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    shaping = {"encoder": to_dict(configs.encoder), "model": to_dict(configs.model),
               "history_len": configs.cache.history_len, "cold_start_input": configs.cache.cold_start_input}
    if configs.cache.popularity_halflife:  # only when set: versions of checkpoints without it stay the same
        shaping["popularity_halflife"] = configs.cache.popularity_halflife
    sha.update(json.dumps(shaping, sort_keys=True).encode())
    return sha.hexdigest()[:16]


def shape_digest(configs: Configs) -> str:
    """What two versions must share for one to replace the other in a running worker: the
    encoder and model configs and the cache rules that shape the vectors (weights aside)."""
    shaping = {"encoder": to_dict(configs.encoder), "model": to_dict(configs.model),
               "history_len": configs.cache.history_len, "cold_start_input": configs.cache.cold_start_input,
               "d_model": configs.encoder.d_model}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Position:
    """A point of the topic: next offset per partition after an event, and how many events precede it."""

    events: int = 0
    offsets: Mapping[int, int] = field(default_factory=dict)

    def reached_by(self, offsets: Mapping[int, int]) -> bool:
        """True when `offsets` are at or past this position on every partition."""
        return all(offsets.get(p, 0) >= o for p, o in self.offsets.items())

    def to_dict(self) -> dict[str, Any]:
        return {"events": int(self.events), "offsets": {str(p): int(o) for p, o in sorted(self.offsets.items())}}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Position":
        return cls(int(values["events"]), {int(p): int(o) for p, o in dict(values["offsets"]).items()})


@dataclass(frozen=True)
class VersionManifest:
    """What a version is: its name and seq, the version it was trained from, the position it was
    trained through, the digests a reader checks, and the guard's figures when it was published."""

    name: str
    seq: int
    parent: str  # a version name, or "checkpoint:<model_version>" for the first
    trained_through: Position
    model_version: str  # `model_version` of the weights (what a worker's snapshot records)
    shape_digest: str
    guard: Mapping[str, float] = field(default_factory=dict)
    learner: str = ""  # the learner run's lineage

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trained_through"] = self.trained_through.to_dict()
        out["guard"] = dict(self.guard)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "VersionManifest":
        return cls(str(values["name"]), int(values["seq"]), str(values["parent"]),
                   Position.from_dict(values["trained_through"]), str(values["model_version"]),
                   str(values["shape_digest"]), dict(values.get("guard") or {}), str(values.get("learner", "")))


def version_name(seq: int) -> str:
    return f"v{seq:06d}"


class VersionStore:
    """Publish, list and read weight versions under one models directory (layout: module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.versions = self.root / VERSIONS

    # -- writing (the learner) --

    def publish(self, checkpoint: Checkpoint, manifest: VersionManifest) -> Path:
        """Make `manifest.name` visible and LATEST (idempotent: a complete folder of that name is kept)."""
        self.versions.mkdir(parents=True, exist_ok=True)
        final = self.versions / manifest.name
        if not (final / MANIFEST).is_file():
            tmp = self.root / f".tmp-{manifest.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_checkpoint(checkpoint, tmp / WEIGHTS)
            atomic_json(tmp / MANIFEST, manifest.to_dict())
            fsync_dir(tmp)
            fault_point("version_files_written")
            os.replace(tmp, final)
            fsync_dir(self.versions)
        fault_point("version_visible")
        self._point_latest(manifest.name)
        return final

    def _point_latest(self, name: str) -> None:
        current = self.latest_name()
        if current is not None and _seq(current) >= _seq(name):
            return  # never move the pointer backwards (a restarted learner republishing an old name)
        atomic_json(self.root / LATEST, {"version": name})
        fsync_dir(self.root)

    def clean_partial(self) -> None:
        """Remove publishes a crash interrupted (never visible to readers)."""
        for tmp in self.root.glob(".tmp-v*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def record_progress(self, position: Position, done: bool = False) -> None:
        """Every version at or before `position` is decided (published or refused). Never moves
        backwards (a restarted learner re-trains from its snapshot to where it had been)."""
        self.root.mkdir(parents=True, exist_ok=True)
        recorded, was_done = self.progress()
        if recorded.events > position.events or (was_done and recorded.events == position.events):
            return
        atomic_json(self.root / PROGRESS, {**position.to_dict(), "done": bool(done)})

    def collect(self, keep: int) -> list[str]:
        """Delete all but the newest `keep` versions, except LATEST and every version a reader has
        pinned (`pin`: the versions the worker's kept snapshots name); returns the deleted names."""
        names = self.names()
        spared = set(names[-keep:]) | self.pinned() | {self.latest_name()}
        deleted = [n for n in names if n not in spared]
        for name in deleted:
            shutil.rmtree(self.versions / name, ignore_errors=True)
        return deleted

    def pin(self, owner: str, names: Iterable[str]) -> None:
        """`owner` (a worker's snapshot directory) needs `names`: `collect` never deletes them."""
        (self.root / PINS).mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256(owner.encode()).hexdigest()[:16]
        atomic_json(self.root / PINS / f"{key}.json", {"owner": owner, "versions": sorted(set(names))})

    def pinned(self) -> set[str]:
        """Versions some reader pinned; pins of an owner directory that no longer exists (its
        snapshots were deleted) do not count."""
        out: set[str] = set()
        for path in sorted((self.root / PINS).glob("*.json")) if (self.root / PINS).is_dir() else []:
            try:
                pin = json.loads(path.read_text())
            except (json.JSONDecodeError, FileNotFoundError):
                continue  # being replaced: the next collect sees it
            if Path(pin.get("owner", "")).is_absolute() and not Path(pin["owner"]).exists():
                continue
            out.update(pin.get("versions", []))
        return out

    # -- reading (worker, serve, export) --

    def names(self) -> list[str]:
        if not self.versions.is_dir():
            return []
        return sorted((p.name for p in self.versions.iterdir() if _NAME.match(p.name) and (p / MANIFEST).is_file()),
                      key=_seq)

    def latest_name(self) -> str | None:
        try:
            name = json.loads((self.root / LATEST).read_text())["version"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None
        return str(name)

    def manifest(self, name: str) -> VersionManifest:
        path = self.versions / name / MANIFEST
        try:
            return VersionManifest.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ModelError(f"model version {name} is not in {self.root} (deleted, or another --models-dir)") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model version {name} in {self.root} has an unreadable manifest: {exc}") from None

    def manifests(self) -> list[VersionManifest]:
        return [self.manifest(name) for name in self.names()]

    def weights_path(self, name: str) -> Path:
        return self.versions / name / WEIGHTS

    def checkpoint(self, name: str) -> Checkpoint:
        return load_checkpoint(self.weights_path(name))

    def progress(self) -> tuple[Position, bool]:
        """How far the learner has decided its versions (nothing yet: position 0, not done)."""
        try:
            values = json.loads((self.root / PROGRESS).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return Position(), False
        return Position.from_dict(values), bool(values.get("done", False))


def _seq(name: str) -> int:
    match = _NAME.match(name)
    if match is None:
        raise ModelError(f"{name!r} is not a model version name (v000001, v000002, ...)")
    return int(match.group(1))
