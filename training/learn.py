"""Online learning: the encoder keeps training on the live topic and publishes weight versions.

`felrec-stream learn` runs a `Learner`: it starts from a trained checkpoint, reads the topic through
a `Source` (Kafka in production, `InMemorySource` in tests), trains each micro-batch with the
training job's own step (`train.train_window`, the same loss, optimizer rules and cache writes) and
publishes a version every `learn.publish_every` events (felrec_stream/state/versions.py).

Where it starts (the first run; later runs restore their own snapshot): `learn.start=checkpoint`
continues the checkpoint's training cache and skips the events it holds (the checkpoint was
trained on the topic's first events, as `replay` writes a dataset); `earliest` trains from the first
event with an empty cache; `latest` replays every event up to the end of the topic as it is at
start without gradients (the cache warms, the weights stay) and trains on what arrives after.

Against forgetting, a seeded reservoir (algorithm R) keeps `reservoir_size` older events; each step
also trains on `replay_ratio` * batch of them, encoded from their entities' *current* histories (the
cache holds only the present), as a loss term that never writes the cache.

Publishing: at a decision point the guard scores the last `guard_window` events the way they were
served (predict, then update): each event's user is encoded from its history before the event by
the weights of the moment and by the parent version, and its item is ranked among the cached items.
A version whose rank is worse than its parent's by more than `guard_tolerance`, or whose user
vectors collapse, is refused (logged `version_refused`), and training goes on.

Exactly once: at each decision point the learner first snapshots its whole state (weights,
optimizer, queue and output statistics, cache, RNG states, reservoir, positions and the decision),
then publishes, then records its progress. A restart restores the newest snapshot, publishes the
version that snapshot decided (idempotent), and continues from its positions; training is
deterministic for a fixed thread count, so the versions equal an uninterrupted run's.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from felrec_stream.config import Configs, LearnConfig, to_dict
from felrec_stream.device import check_precision
from felrec_stream.errors import ModelError
from felrec_stream.faults import fault_point
from felrec_stream.log import get_logger
from felrec_stream.model.felrec import FELRec
from felrec_stream.model.norms import adapting_norms
from felrec_stream.model.losses import representation_spread
from felrec_stream.parallel import Leader, Ranks, sync_batch_norms
from felrec_stream.state.checkpoint import Checkpoint, model_from
from felrec_stream.state.engine import encode_sequences, event_sequences, infer_batch, prepare_batch
from felrec_stream.state.snapshot import SnapshotManager
from felrec_stream.state.store import RepresentationStore
from felrec_stream.state.versions import Position, VersionManifest, VersionStore, model_version, shape_digest, \
    version_name
from felrec_stream.stream.events import EventBatch
from felrec_stream.stream.source import Source
from training.train import Stepper, StepStats, draw_negatives, make_optimizer, step_rows, train_window

log = get_logger(__name__)

SNAPSHOT_KIND = "felrec-learner"


# ---- the reservoir ------------------------------------------------------------------------------

class Reservoir:
    """Uniform sample of every event seen so far (algorithm R), seeded and resumable."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seen = size, 0
        self.rng = np.random.default_rng([seed, 1])
        self.events: EventBatch | None = None

    def add(self, batch: EventBatch) -> None:
        if self.size == 0 or not len(batch):
            return
        keep: list[int] = []
        slots: list[int] = []
        for row in range(len(batch)):
            if self.seen < self.size:
                keep.append(row)
                slots.append(self.seen)
            else:
                j = int(self.rng.integers(0, self.seen + 1))
                if j < self.size:
                    keep.append(row)
                    slots.append(j)
            self.seen += 1
        self._write(batch, np.asarray(keep, dtype=np.int64), np.asarray(slots, dtype=np.int64))

    def _write(self, batch: EventBatch, rows: np.ndarray, slots: np.ndarray) -> None:
        if not len(rows):
            return
        columns = {}
        for name in ("user", "item", "timestamp", "event_id"):
            new = getattr(batch, name)[rows]
            old = None if self.events is None else getattr(self.events, name)
            grown = max(int(slots.max()) + 1, 0 if old is None else len(old))
            out = np.empty(grown, dtype=new.dtype) if old is None else np.resize(old, grown).astype(old.dtype)
            out[slots] = new  # later rows of the same batch overwrite earlier ones at one slot, as in order
            columns[name] = out
        self.events = EventBatch(**columns)

    def sample(self, n: int, rng: np.random.Generator) -> EventBatch | None:
        if self.events is None or n < 2:
            return None
        rows = np.sort(rng.choice(len(self.events), size=min(n, len(self.events)), replace=False))
        return self.events.take(rows)

    def state_dict(self) -> dict[str, Any]:
        ev = self.events
        return {"seen": self.seen, "rng": json.dumps(self.rng.bit_generator.state),
                "events": None if ev is None else {"user": ev.user, "item": ev.item, "timestamp": ev.timestamp,
                                                   "event_id": ev.event_id}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])
        self.rng.bit_generator.state = json.loads(state["rng"])
        ev = state["events"]
        self.events = None if ev is None else EventBatch(
            np.asarray(ev["user"], dtype=object), np.asarray(ev["item"], dtype=object),
            np.asarray(ev["timestamp"], dtype=np.int64), np.asarray(ev["event_id"], dtype=np.int64))


# ---- the learner --------------------------------------------------------------------------------

@dataclass
class LearnProgress:
    """Counters that travel inside every learner snapshot."""

    events: int = 0  # events read from the topic (skipped and warm-up ones included)
    trained: int = 0  # events trained on
    batches: int = 0
    offsets: dict[int, int] = field(default_factory=dict)
    decided: int = 0  # `trained` at the last decision point
    published: str = ""  # the newest published version ("": the checkpoint)
    refused: int = 0
    seq: int = 0  # the seq of the last decided version


@dataclass(frozen=True)
class LearnResult:
    events: int
    trained: int
    published: list[str]  # this run
    refused: int
    latest: str
    stopped_by: str
    poison_skipped: int  # this run; the worker dead-letters them


@dataclass
class _Guard:
    """Prequential ranks of the last `window` events: the weights of the moment vs the parent's."""

    window: int
    rows: list[tuple[float, float]] = field(default_factory=list)  # (candidate rank, parent rank)

    def add(self, ranks: list[tuple[float, float]]) -> None:
        self.rows.extend(ranks)
        del self.rows[: max(0, len(self.rows) - self.window)]

    def figures(self) -> dict[str, float]:
        if not self.rows:
            return {"events": 0}
        candidate, parent = np.mean(self.rows, axis=0)
        return {"events": len(self.rows), "rank": round(float(candidate), 6), "parent_rank": round(float(parent), 6)}


class Learner:
    """Restore or start -> read batches -> train -> decide/snapshot/publish -> stop (module docstring)."""

    def __init__(self, checkpoint: Checkpoint, source: Source, versions: VersionStore, snapshots: SnapshotManager,
                 config: LearnConfig, device: torch.device | str = "cpu", checkpoint_path: str = "",
                 ranks: Ranks | None = None) -> None:
        self.source, self.versions, self.snapshots, self.config = source, versions, snapshots, config
        self.checkpoint, self.checkpoint_path = checkpoint, checkpoint_path
        cfgs = checkpoint.configs
        self.configs: Configs = cfgs
        self.batch_size = config.batch_size or cfgs.training.batch_size
        # data-parallel (training/learn_ranks.py): rank 0 alone reads, snapshots and publishes; every
        # rank trains its slice of each batch as `train` does, so the replicas stay identical
        self.ranks, self.leader = ranks, ranks is None or ranks.leader
        self.device = torch.device(device) if ranks is None else ranks.place(torch.device(device))
        check_precision(cfgs.training.precision, self.device)  # the checkpoint's training.precision, as `train`
        self.model = self._new_model(checkpoint.online_state or checkpoint.model_state).train()
        if ranks is not None:
            ranks.replicate(self.model)
            sync_batch_norms(self.model, ranks)  # training batch statistics = the whole batch's
        self.optimizer = make_optimizer(self.model, cfgs.training, config.lr or cfgs.training.lr)
        self.stepper = Stepper(self.optimizer, self.model, 2 if config.replay_ratio > 0 else 1, ranks)
        self.replicas = None if ranks is None else Leader(ranks, self.request_stop)
        self.store = RepresentationStore.for_cache(cfgs.encoder.d_model, cfgs.cache, self.device)
        self.reservoir = Reservoir(config.reservoir_size, config.seed)
        self.replay_rng = np.random.default_rng([config.seed, 2])
        self.progress = LearnProgress()
        self.parent = self._new_model(checkpoint.model_state)  # what the worker serves until a version lands
        self.guard = _Guard(config.guard_window)
        self.lineage = uuid.uuid4().hex[:16]
        self.published_now: list[str] = []
        self._stop_reason: str | None = None
        self._skip = 0  # events still to skip (start=checkpoint) or to replay without gradients (latest)
        self._warm = False

    def _new_model(self, state: dict[str, torch.Tensor]) -> FELRec:
        ckpt = Checkpoint(model_state=state, configs=self.configs, epoch=0)
        return model_from(ckpt, self.device, self.checkpoint_path).requires_grad_(True)

    def request_stop(self, reason: str = "signal") -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
        self.source.stop()

    @property
    def stopping(self) -> bool:
        return self._stop_reason is not None

    # -- run --

    def run(self) -> LearnResult:
        self.begin()
        try:
            while self._stop_reason is None:
                if self.source.exhausted:
                    self._stop_reason = "end_of_topic"
                    break
                batch = self.source.poll_batch(0.1)
                self._tell("idle" if batch is None else "batch", batch)  # idle: a heartbeat
                if batch is not None:
                    self.feed(batch)
            self._final()
            self._tell("stop", self._stop_reason)
        finally:
            self.close()
        return self.result()

    def begin(self) -> None:
        """Lock the state directory, restore or start, open the source. `run` calls it; an
        in-process driver (benchmarks/bench_online.py) calls it, then polls the source and `feed`s
        batches itself, then `close`s."""
        self.snapshots.acquire()
        try:
            self.versions.clean_partial()
            positions = self._restore_or_start()
            self.source.open(positions)
        except BaseException:
            self.close()  # as run() always did: the source closed, the lock released
            raise
        if self._warm and positions is None:
            # start=latest: what the topic holds now is replayed without gradients (records, so a
            # poison record among them moves the boundary by one event)
            self._skip = sum(self.source.lag().values())
        if self.replicas is not None:
            self._tell("state", self._replica_state())
        log.info("learner_started", events=self.progress.events, trained=self.progress.trained,
                 published=self.progress.published or "checkpoint", batch_size=self.batch_size)

    def close(self) -> None:
        self.source.close()
        self.snapshots.release()

    def _tell(self, kind: str, payload: Any = None) -> None:
        """Rank 0: one message to the followers (training/learn_ranks.py); nothing in one process."""
        if self.replicas is not None:
            self.replicas.send(kind, payload)

    def result(self) -> LearnResult:
        return LearnResult(self.progress.events, self.progress.trained, list(self.published_now),
                           self.progress.refused, self.progress.published, self._stop_reason or "unknown",
                           self.source.stats.poison)

    def feed(self, batch: EventBatch) -> None:
        """One micro-batch of the topic: skip / warm / train, then a decision when one is due."""
        self.progress.events += len(batch)
        if self._skip:
            head = min(self._skip, len(batch))
            self._skip -= head
            if self._warm:
                self._warm_up(batch.take(slice(0, head)))
            batch = batch.take(slice(head, None))
        if len(batch):
            self.train_batch(batch)
        if self.leader:  # the followers' positions are rank 0's (they read no topic)
            self.progress.offsets = dict(self.source.positions())
        if self.progress.trained - self.progress.decided >= self.config.publish_every:
            self.decide()
        elif self.leader:
            self.versions.record_progress(self._position())

    def train_batch(self, batch: EventBatch) -> list[StepStats]:
        """The training job's step (`train_window`) on one live batch, after the guard's prediction
        and the reservoir's replay term."""
        if self.config.guard_window and len(batch) >= 2:
            self.guard.add(self._predict(batch))
        replay = self.reservoir.sample(round(self.config.replay_ratio * len(batch)), self.replay_rng)
        if self.ranks is not None:  # rank r's dropout masks from its own seed (parallel.seed), per batch so
            # that a restart draws what an uninterrupted run draws on every rank
            torch.manual_seed(self.ranks.seed(self.config.seed * 1_000_003 + self.progress.batches))
        if replay is not None:
            self._replay_step(replay)
        steps = train_window(self.model, self.store, self.stepper, batch, len(batch), self.configs.cache,
                             np.random.default_rng([self.config.seed, self.progress.batches]), ranks=self.ranks,
                             precision=self.configs.training.precision)
        self.stepper.flush()
        self.reservoir.add(batch)
        self.progress.trained += len(batch)
        self.progress.batches += 1
        return steps

    def _replay_step(self, replay: EventBatch) -> None:
        """Loss on reservoir events from their entities' current histories; the cache is not written."""
        inputs = prepare_batch(self.store, replay, self.device, self.configs.cache, before=False, ranks=self.ranks)
        rows = np.arange(len(replay))
        users, items = event_sequences(self.store, inputs, rows, self.device, self.configs.cache, self.ranks)
        negatives = draw_negatives(self.store, self.model.config, self.replay_rng, self.device)
        step_rows(self.model, self.store, self.stepper, inputs, rows, users, items, self.ranks, 0, negatives,
                  precision=self.configs.training.precision)

    @torch.no_grad()
    def _predict(self, batch: EventBatch) -> list[tuple[float, float]]:
        """Normalized rank of each event's item among the cached items, the user encoded from its
        history before the event by the current weights and by the parent's (eval mode)."""
        items = self.store.items
        written = np.flatnonzero(items.history.counts[: len(items)] > 0)
        if len(written) < 2:
            return []
        inputs = prepare_batch(self.store, batch, self.device, self.configs.cache)
        known = np.isin(inputs.item_slots, written)
        if not known.any():
            return []
        catalog = torch.nn.functional.normalize(items.vectors.get(torch.from_numpy(written)).float(), dim=-1)
        where = {int(s): n for n, s in enumerate(written)}
        true = torch.as_tensor([where.get(int(s), 0) for s in inputs.item_slots])
        out = []
        for model in (self.model, self.parent):
            mode = model.training
            model.eval()
            u = torch.nn.functional.normalize(encode_sequences(model, inputs.users_before).float(), dim=-1)
            model.train(mode)
            scores = u @ catalog.T  # (B, I)
            mine = scores.gather(1, true.unsqueeze(1))
            higher = (scores > mine).sum(1).float() + 0.5 * ((scores == mine).sum(1).float() - 1)
            out.append((higher / (len(written) - 1))[torch.from_numpy(known)].tolist())
        return list(zip(out[0], out[1]))

    @torch.no_grad()
    def _warm_up(self, batch: EventBatch) -> None:
        """start=latest: apply events to the cache without gradients (as the evaluator replays)."""
        if not len(batch):
            return
        self.model.eval()
        with adapting_norms(self.model):
            infer_batch(self.model, self.store, batch, self.configs.cache, self.ranks)
        self.model.train()

    # -- decisions --

    def decide(self) -> None:
        """Guard -> snapshot (with the decision) -> publish -> progress (the crash-safe order)."""
        p = self.progress
        p.seq += 1
        manifest, why = self._candidate(version_name(p.seq))
        p.decided = p.trained
        if why is None:
            p.published = manifest.name
        else:
            p.refused += 1
            log.warning("version_refused", version=manifest.name, reason=why, **manifest.guard)
        if self.ranks is not None:  # cheap insurance once a decision: the replicas must be bit-identical
            self.ranks.agree({"model": self.model.state_dict(), "store": self.store.state_dict()}, "learner replicas")
        if self.leader:
            self.snapshot(pending=manifest if why is None else None)
            fault_point("learner_snapshot_written")
        if why is None:
            self._publish(manifest)
        if self.leader:
            self.versions.record_progress(self._position())

    def _candidate(self, name: str) -> tuple[VersionManifest, str | None]:
        state = self._served_state()
        figures = self.guard.figures()
        u = self.store.users.vectors.get(torch.arange(len(self.store.users))).float()
        figures["spread"] = round(float(representation_spread(u)), 6)
        manifest = VersionManifest(name, self.progress.seq, self.progress.published or
                                   f"checkpoint:{model_version(self.checkpoint.model_state, self.configs)}",
                                   self._position(), model_version(state, self.configs), shape_digest(self.configs),
                                   figures, self.lineage)
        if figures["spread"] < self.config.min_spread:
            return manifest, f"collapse: spread {figures['spread']} < {self.config.min_spread}"
        if "rank" in figures and figures["rank"] > figures["parent_rank"] + self.config.guard_tolerance:
            return manifest, (f"guard: rank {figures['rank']} on the last {figures['events']} events is worse "
                              f"than the parent's {figures['parent_rank']} by more than {self.config.guard_tolerance}")
        return manifest, None

    def _served_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _publish(self, manifest: VersionManifest, state: dict[str, torch.Tensor] | None = None) -> None:
        state = state if state is not None else self._served_state()
        self.parent.load_state_dict(state)
        self.published_now.append(manifest.name)
        if not self.leader:
            return
        ckpt = Checkpoint(model_state=state, configs=self.configs, epoch=self.checkpoint.epoch)
        self.versions.publish(ckpt, manifest)
        log.info("version_published", version=manifest.name, parent=manifest.parent,
                 trained_through=manifest.trained_through.events, **manifest.guard)
        self.versions.collect(self.config.keep_versions)

    def _position(self) -> Position:
        return Position(self.progress.events, dict(self.progress.offsets))

    # -- snapshots --

    def snapshot(self, pending: VersionManifest | None = None) -> None:
        self.snapshots.write_state(*self._replica_state(pending))

    def _replica_state(self, pending: VersionManifest | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, meta): what a snapshot holds, and what rank 0 sends its followers at start."""
        p = self.progress
        blob = io.BytesIO()
        torch.save({"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, blob)
        state = {"model": self.model.state_dict(), "parent": self.parent.state_dict(),
                 "store": self.store.state_dict(), "reservoir": self.reservoir.state_dict(),
                 "blob": np.frombuffer(blob.getvalue(), dtype=np.uint8).copy(),
                 "guard": np.asarray(self.guard.rows, dtype=np.float64).reshape(-1, 2)}
        meta = {"kind": SNAPSHOT_KIND, "topic": self.config.topic, "lineage": self.lineage,
                "events": p.events, "trained": p.trained, "batches": p.batches, "decided": p.decided,
                "offsets": {str(k): int(v) for k, v in p.offsets.items()}, "published": p.published,
                "refused": p.refused, "seq": p.seq, "skip": self._skip, "warm": self._warm,
                "replay_rng": json.dumps(self.replay_rng.bit_generator.state),
                "pending": None if pending is None else pending.to_dict(),
                "learn": to_dict(self.config), "configs": self.configs.to_dict(),
                "topic_identity": self.source.identity()}
        return state, meta

    def _restore_or_start(self) -> dict[int, int] | None:
        snap = self.snapshots.latest_valid()
        if snap is None:
            return self._start()
        meta, state = snap.meta, snap.state()
        if meta.get("kind") != SNAPSHOT_KIND:
            raise ModelError(f"{snap.path} is not a learner snapshot")
        why = self.source.verify_identity(meta.get("topic_identity") or {})
        if why is not None:
            raise ModelError(f"learner snapshot {snap.path} was made from another topic: {why}")
        if meta["configs"] != self.configs.to_dict():
            raise ModelError(f"learner snapshot {snap.path} was made from another checkpoint's configs; "
                             "use its checkpoint or another --state-dir")
        self.load_replica(state, meta)
        if meta.get("pending"):  # decided (the weights as they were then) and maybe not published: idempotent
            self._publish(VersionManifest.from_dict(meta["pending"]))
        self.versions.record_progress(self._position())
        log.info("learner_restored", seq=snap.seq, events=self.progress.events, published=self.progress.published)
        return dict(self.progress.offsets)

    def load_replica(self, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Everything `_replica_state` wrote (a snapshot, or rank 0's state sent to a follower)."""
        self.model.load_state_dict(state["model"])
        self.parent.load_state_dict(state["parent"])
        self.store.load_state_dict(state["store"])
        self.reservoir.load_state_dict(state["reservoir"])
        blob = torch.load(io.BytesIO(np.asarray(state["blob"]).tobytes()), weights_only=True)
        self.optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["torch_rng"])
        self.guard.rows = [tuple(r) for r in np.asarray(state["guard"]).tolist()]
        self.replay_rng.bit_generator.state = json.loads(meta["replay_rng"])
        self.progress = LearnProgress(int(meta["events"]), int(meta["trained"]), int(meta["batches"]),
                                      {int(k): int(v) for k, v in meta["offsets"].items()}, int(meta["decided"]),
                                      str(meta["published"]), int(meta["refused"]), int(meta["seq"]))
        self._skip, self._warm, self.lineage = int(meta["skip"]), bool(meta["warm"]), str(meta["lineage"])

    def _start(self) -> dict[int, int] | None:
        """The first run: where `learn.start` says (module docstring)."""
        torch.manual_seed(self.config.seed)
        start = self.config.start
        if start == "checkpoint":
            if self.checkpoint.store_state is None:
                raise ModelError("learn.start=checkpoint needs a checkpoint that holds its training cache; "
                                 "use --from earliest or latest")
            self.store.load_state_dict(self.checkpoint.store_state)
            self._skip = int(self.store.users.history.events)
        elif start == "latest":
            self._warm = True  # how many: known once the source is open (`run`)
        return None

    def _final(self) -> None:
        self.snapshot()
        self.versions.record_progress(self._position(), done=self._stop_reason == "end_of_topic")
        log.info("learner_stopped", events=self.progress.events, trained=self.progress.trained,
                 published=self.published_now, refused=self.progress.refused, stopped_by=self._stop_reason)
