"""One micro-batch of FELRec against a representation store: read, encode, write back.

Shared by the training job, the online evaluator and the streaming worker so that all three apply
the same batching rules (see DEVELOPERS.md):

- every event of the batch reads the cache as it was *before* the batch;
- a history holds the earlier interactions of the entity, including earlier events of the same
  batch (never the event itself);
- after the batch, each user/item touched by it gets one vector (deterministic), and every event is
  appended to the histories.

What the cache holds (`ModelConfig.cache_update`):
- "pre_event" (the paper): the encoding computed for the entity's latest event, from its history
  *before* that event. What is served therefore lags one interaction behind.
- "post_event": the encoding of the entity's history *after* the batch, i.e. including its latest
  event. Served vectors include every applied event; an item's first interaction already gives it
  a vector that knows its first user.

Cold start. An element of a history that has no cached vector yet (an entity first seen in this
batch) reads `cache.cold_start_input`: "id_seed" = a fixed pseudo-random vector derived from a
hash of its external id (no parameters, defined for ids never seen before, identical across runs),
"zero" = the paper's zero vector. An empty history reads the entity's own cold-start input, or a
learned vector per kind (`encoder.empty_history = "learned"`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from felrec_stream.config import CacheConfig
from felrec_stream.model.felrec import ITEM, USER, ActivationBudget, FELRec
from felrec_stream.parallel import Ranks
from felrec_stream.state.store import HistoryPlan, Kind, RepresentationStore, last_occurrence
from felrec_stream.state.vectors import StagedPut
from felrec_stream.stream.events import EventBatch

DEFAULT_CACHE = CacheConfig()  # frozen: safe as a default argument

_MODEL_KIND = {Kind.USER: USER, Kind.ITEM: ITEM}


@dataclass
class Sequences:
    """Encoder inputs of R histories of one kind of entity."""

    kind: Kind  # kind of the encoded entities (their elements are of kind.other)
    h: torch.Tensor  # (R, N, D) cached vectors of the elements, right-aligned (newest last)
    mask: torch.Tensor  # (R, N) True where valid
    empty: torch.Tensor  # (R,) True where the history has no element

    def __len__(self) -> int:
        return self.h.shape[0]


@dataclass
class BatchInputs:
    """Encoder inputs of one batch plus what is needed to commit it to the store."""

    batch: EventBatch
    user_slots: np.ndarray  # (B,)
    item_slots: np.ndarray  # (B,)
    user_plan: HistoryPlan  # users' item histories
    item_plan: HistoryPlan  # items' user histories
    users_before: Sequences | None  # (B) each event's user, history before the event (None: not prepared)
    items_before: Sequences | None  # (B) each event's item, history before the event
    users_after: Sequences | None  # (G_u) each touched user, history after the batch (post_event)
    items_after: Sequences | None  # (G_x)


def prepare_batch(store: RepresentationStore, batch: EventBatch, device: torch.device | str,
                  cache: CacheConfig = DEFAULT_CACHE, after: bool = False, before: bool = True,
                  ranks: Ranks | None = None) -> BatchInputs:
    """Register new ids, build the batch's histories and gather their (pre-batch) cached vectors.

    before: the histories before each event (training loss, scoring); after: the histories after
    the batch of every touched entity (what "post_event" writes). With data-parallel `ranks` the
    ids and plans are the whole batch's but the sequences only this rank's rows (`Ranks.span`):
    `whole_batch`/`whole_after` reassemble the encodings."""
    user_slots = store.users.slots(batch.user, create=True)
    item_slots = store.items.slots(batch.item, create=True)
    user_plan = store.users.history.plan(user_slots, item_slots)
    item_plan = store.items.history.plan(item_slots, user_slots)
    inputs = BatchInputs(batch, user_slots, item_slots, user_plan, item_plan, None, None, None, None)
    if before:
        users, items = event_sequences(store, inputs, np.arange(len(batch)), device, cache, ranks)
        inputs = dataclasses.replace(inputs, users_before=users, items_before=items)
    return with_after(store, inputs, device, cache, ranks) if after else inputs


def with_after(store: RepresentationStore, inputs: BatchInputs, device: torch.device | str,
               cache: CacheConfig = DEFAULT_CACHE, ranks: Ranks | None = None) -> BatchInputs:
    """`inputs` with the after-batch sequences of every touched entity (what "post_event" writes)."""
    def gather(kind: Kind, plan: HistoryPlan) -> Sequences:
        rows = slice(None) if ranks is None else ranks.span(len(plan.unique_slots))
        return _sequences(store, kind, plan.new_rows[rows], plan.new_lengths[rows], plan.unique_slots[rows],
                          device, cache)
    return dataclasses.replace(inputs, users_after=gather(Kind.USER, inputs.user_plan),
                               items_after=gather(Kind.ITEM, inputs.item_plan))


def stored_sequences(store: RepresentationStore, kind: Kind, slots: np.ndarray, device: torch.device | str,
                     cache: CacheConfig = DEFAULT_CACHE) -> Sequences:
    """The sequences of entities `slots` of `kind` from their stored histories (what re-encoding
    them now would read)."""
    data = store.tables[kind].read(slots)
    return _sequences(store, kind, data.rows, data.lengths, slots, device, cache)


def event_sequences(store: RepresentationStore, inputs: BatchInputs, rows: np.ndarray, device: torch.device | str,
                    cache: CacheConfig = DEFAULT_CACHE, ranks: Ranks | None = None) -> tuple[Sequences, Sequences]:
    """The before-event sequences (users', items') of the batch's events `rows` (with data-parallel
    `ranks`: this rank's `span` of them), from the cache as it was before the batch: what a
    training step over a subset of a window's events encodes (`prepare_batch` for all rows)."""
    rows = rows if ranks is None else rows[ranks.span(len(rows))]
    up, ip = inputs.user_plan, inputs.item_plan
    return (_sequences(store, Kind.USER, up.event_history[rows], up.event_length[rows], inputs.user_slots[rows],
                       device, cache),
            _sequences(store, Kind.ITEM, ip.event_history[rows], ip.event_length[rows], inputs.item_slots[rows],
                       device, cache))


def _sequences(store: RepresentationStore, kind: Kind, history: np.ndarray, length: np.ndarray,
               owners: np.ndarray, device: torch.device | str, cache: CacheConfig) -> Sequences:
    """Right-aligned (R, N, D) vectors of the history elements, trimmed to the longest history."""
    elements = store.tables[kind.other]
    L = history.shape[1]
    N = max(int(length.max(initial=0)), 1)  # trim padding; an empty history is one input vector
    slots = history[:, L - N:]  # (R, N), -1 = padding
    mask = np.arange(N)[None, :] >= (N - np.maximum(length, 1))[:, None]  # (R, N)
    h = elements.vectors.get(torch.from_numpy(slots)).to(torch.float32)  # (R, N, D), zeros for -1
    empty = length == 0
    if cache.cold_start_input == "id_seed":
        cold = (slots >= 0) & (elements.history.counts[np.maximum(slots, 0)] == 0)  # no cached vector yet
        if cold.any():
            rows, cols = np.nonzero(cold)
            h[torch.from_numpy(rows), torch.from_numpy(cols)] = id_seed_vectors(
                np.asarray(elements.ids.names(slots[rows, cols]), dtype=object), kind.other, h.shape[-1])
        if empty.any():
            rows = np.flatnonzero(empty)
            own = store.tables[kind].ids.names(owners[rows])
            h[torch.from_numpy(rows), -1] = id_seed_vectors(np.asarray(own, dtype=object), kind, h.shape[-1])
    return Sequences(kind, h.to(device, non_blocking=True), torch.from_numpy(mask).to(device),
                     torch.from_numpy(empty).to(device))


def id_seed_vectors(ids: np.ndarray, kind: Kind, dim: int) -> torch.Tensor:
    """(n, dim) standard-normal vectors, each a pure function of (kind, external id)."""
    out = np.empty((len(ids), dim), dtype=np.float32)
    for n, external in enumerate(ids):
        digest = hashlib.blake2b(f"{kind.value}:{external}".encode(), digest_size=8).digest()
        out[n] = np.random.default_rng(int.from_bytes(digest, "little")).standard_normal(dim)
    return torch.from_numpy(out)


def encode_sequences(model: FELRec, seqs: Sequences | None, budget: ActivationBudget | None = None) -> torch.Tensor:
    """(R, D) representations of the sequences' entities (prepared: `prepare_batch(before/after=True)`)."""
    assert seqs is not None, "these sequences were not prepared (prepare_batch before/after)"
    return model.encode_kind(seqs.h, seqs.mask, _MODEL_KIND[seqs.kind], seqs.empty, budget)


@torch.no_grad()
def cold_vectors(model: FELRec, kind: Kind, ids: list[str] | np.ndarray,
                 cache: CacheConfig = DEFAULT_CACHE) -> torch.Tensor:
    """(n, D) encodings of `ids` with an empty history, without touching any store: the input
    `_sequences` builds for an entity never seen before (one position, its own cold-start input),
    i.e. what a brand-new user is served with before its first event is applied."""
    dim, device = model.encoder_config.d_model, next(model.parameters()).device
    h = torch.zeros(len(ids), 1, dim)
    if cache.cold_start_input == "id_seed":
        h[:, -1] = id_seed_vectors(np.asarray(ids, dtype=object), kind, dim)
    mask = torch.ones(len(ids), 1, dtype=torch.bool)
    empty = torch.ones(len(ids), dtype=torch.bool)
    return encode_sequences(model, Sequences(kind, h.to(device), mask.to(device), empty.to(device)))


def encode(model: FELRec, inputs: BatchInputs,
           budget: ActivationBudget | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query representations u (B, D) and x (B, D) of each event's user and item, from their
    histories before the event (the paper's positive pair); budget: see ActivationBudget."""
    return encode_sequences(model, inputs.users_before, budget), encode_sequences(model, inputs.items_before, budget)


def encode_after(model: FELRec, inputs: BatchInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(G_u, D), (G_x, D) representations of the touched users/items after the batch."""
    return encode_sequences(model, inputs.users_after), encode_sequences(model, inputs.items_after)


def whole_batch(ranks: Ranks | None, inputs: BatchInputs, u: torch.Tensor,
                x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D) each: the encodings of every event, from the ranks' slices (as is in one process)."""
    return whole_rows(ranks, u, x, len(inputs.batch))


def whole_rows(ranks: Ranks | None, u: torch.Tensor, x: torch.Tensor,
               n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, D) each: the encodings of n rows (`ranks.span(n)` per rank) from the ranks' slices."""
    if ranks is None:
        return u, x
    both = ranks.gather_rows(torch.cat([u, x], dim=1), n)  # one collective for both
    return both[:, : u.shape[1]], both[:, u.shape[1]:]


def whole_after(ranks: Ranks | None, inputs: BatchInputs,
                after: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(G_u, D), (G_x, D): the post-batch encodings of every touched entity, from the ranks' slices."""
    if ranks is None:
        return after
    return (ranks.gather_rows(after[0], len(inputs.user_plan.unique_slots)),
            ranks.gather_rows(after[1], len(inputs.item_plan.unique_slots)))


def commit_batch(store: RepresentationStore, inputs: BatchInputs, u: torch.Tensor | None, x: torch.Tensor | None,
                 after: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Write one vector per touched user/item (never through autograd) and append the histories.

    after = (users, items) post-batch encodings aligned with the plans' unique slots ("post_event");
    without it the vector of each entity's latest event in the batch is written ("pre_event")."""
    apply_commit(store, stage_commit(store, inputs, u, x, after))


@dataclass(frozen=True)
class StagedCommit:
    """`commit_batch` in two halves: `stage_commit` computes the vector writes' read-only part (e.g.
    the IVF list assignment) and changes nothing; `apply_commit` writes. The streaming worker holds
    the query lock only for the second."""

    inputs: BatchInputs
    users: StagedPut
    items: StagedPut


def stage_commit(store: RepresentationStore, inputs: BatchInputs, u: torch.Tensor | None, x: torch.Tensor | None,
                 after: tuple[torch.Tensor, torch.Tensor] | None = None) -> StagedCommit:
    plans = ((Kind.USER, inputs.user_plan, inputs.user_slots, u), (Kind.ITEM, inputs.item_plan, inputs.item_slots, x))
    staged = []
    for n, (kind, plan, slots, vectors) in enumerate(plans):
        if after is not None:
            staged.append(store.tables[kind].vectors.stage(torch.from_numpy(plan.unique_slots), after[n].detach()))
        else:
            unique, last = last_occurrence(slots)
            assert vectors is not None, "pre_event commits need the events' encodings u, x"
            staged.append(store.tables[kind].vectors.stage(
                torch.from_numpy(unique), vectors.detach()[torch.from_numpy(last).to(vectors.device)]))
    return StagedCommit(inputs, staged[0], staged[1])


def apply_commit(store: RepresentationStore, staged: StagedCommit) -> None:
    store.users.vectors.put_staged(staged.users)
    store.items.vectors.put_staged(staged.items)
    inputs, ts = staged.inputs, staged.inputs.batch.timestamp
    store.users.history.apply(inputs.user_plan, ts[last_occurrence(inputs.user_slots)[1]], inputs.user_slots)
    store.items.history.apply(inputs.item_plan, ts[last_occurrence(inputs.item_slots)[1]], inputs.item_slots)


@torch.no_grad()
def infer_encodings(model: FELRec, store: RepresentationStore, batch: EventBatch,
                    cache: CacheConfig = DEFAULT_CACHE, ranks: Ranks | None = None
                    ) -> tuple[BatchInputs, torch.Tensor | None, torch.Tensor | None,
                               tuple[torch.Tensor, torch.Tensor] | None]:
    """The reading half of `infer_batch`: prepare and encode what the cache needs, changing nothing
    once the batch's ids are registered. Returns (inputs, u, x, after) for `commit_batch`: u, x
    (B, D) under pre_event, after (G_u, D), (G_x, D) under post_event; with data-parallel `ranks`
    each rank encodes its slice and the whole batch is gathered."""
    device = next(model.parameters()).device
    post = model.config.cache_update == "post_event"
    inputs = prepare_batch(store, batch, device, cache, after=post, before=not post, ranks=ranks)
    if post:
        return inputs, None, None, whole_after(ranks, inputs, encode_after(model, inputs))
    u, x = whole_batch(ranks, inputs, *encode(model, inputs))
    return inputs, u, x, None


def infer_batch(model: FELRec, store: RepresentationStore, batch: EventBatch,
                cache: CacheConfig = DEFAULT_CACHE, ranks: Ranks | None = None) -> BatchInputs:
    """Inference step (streaming worker): prepare, encode what the cache needs, commit."""
    inputs, u, x, after = infer_encodings(model, store, batch, cache, ranks)
    commit_batch(store, inputs, u, x, after)
    return inputs
