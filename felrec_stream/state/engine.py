"""One micro-batch of FELRec against a representation store: read, encode, write back.

Shared by the training job, the online evaluator and the streaming worker so that all three apply
the same batching rules (see DEVELOPERS.md):

- every event of the batch reads the cache as it was *before* the batch;
- a history holds the earlier interactions of the entity, including earlier events of the same
  batch (never the event itself); an empty history is one zero vector;
- after encoding, each user/item touched by the batch gets the vector of its *latest* event in
  the batch (deterministic, unlike a scatter with duplicate indices on GPU), and every event is
  appended to the histories.

Cold start. The cache starts empty (all zero) at every epoch, and the encoder is a shared
function of cached vectors: with zero inputs every entity gets the same vector, and the encoder
applied to its own outputs drifts to one fixed point (measured: loss stuck at 2 ln(K+1), spread
0). With `cache.cold_start_input="id_seed"` (default) the single input of an entity's *first* encoding
is a fixed pseudo-random vector derived from a hash of its external id instead of the zero vector:
no parameters, no table, defined for ids never seen before, identical across runs and restarts.
`"zero"` keeps the paper's behaviour.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from felrec_stream.config import CacheConfig
from felrec_stream.model.felrec import FELRec
from felrec_stream.state.store import HistoryPlan, Kind, RepresentationStore, last_occurrence
from felrec_stream.stream.events import EventBatch

DEFAULT_CACHE = CacheConfig()  # frozen: safe as a default argument


@dataclass
class BatchInputs:
    """Encoder inputs of one batch plus what is needed to commit it to the store."""

    batch: EventBatch
    user_slots: np.ndarray  # (B,)
    item_slots: np.ndarray  # (B,)
    user_plan: HistoryPlan  # users' item histories
    item_plan: HistoryPlan  # items' user histories
    item_seq: torch.Tensor  # (B, Nu, D) cached vectors of each user's previous items
    item_mask: torch.Tensor  # (B, Nu) True where valid
    user_seq: torch.Tensor  # (B, Ni, D) cached vectors of each item's previous users
    user_mask: torch.Tensor  # (B, Ni)


def prepare_batch(store: RepresentationStore, batch: EventBatch, device: torch.device | str,
                  cache: CacheConfig = DEFAULT_CACHE) -> BatchInputs:
    """Register new ids, build the batch's histories and gather their (pre-batch) cached vectors."""
    user_slots = store.users.slots(batch.user, create=True)
    item_slots = store.items.slots(batch.item, create=True)
    user_plan = store.users.history.plan(user_slots, item_slots)
    item_plan = store.items.history.plan(item_slots, user_slots)
    item_seq, item_mask = _gather_sequences(store, Kind.ITEM, user_plan, device)
    user_seq, user_mask = _gather_sequences(store, Kind.USER, item_plan, device)
    if cache.cold_start_input == "id_seed":
        _seed_empty_histories(item_seq, user_plan, batch.user, Kind.USER)
        _seed_empty_histories(user_seq, item_plan, batch.item, Kind.ITEM)
    return BatchInputs(batch, user_slots, item_slots, user_plan, item_plan, item_seq, item_mask, user_seq, user_mask)


def _gather_sequences(store: RepresentationStore, element_kind: Kind, plan: HistoryPlan,
                      device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-aligned (B, N, D) vectors of the history elements, trimmed to the batch's longest."""
    L = plan.event_history.shape[1]
    N = max(int(plan.event_length.max(initial=0)), 1)  # trim padding; empty history -> 1 zero vector
    slots = plan.event_history[:, L - N:]  # (B, N), -1 = padding/missing
    positions = np.arange(N)[None, :]
    mask = positions >= (N - np.maximum(plan.event_length, 1))[:, None]  # (B, N)
    seq = store.tables[element_kind].vectors.get(torch.from_numpy(slots))  # (B, N, D), zeros for -1
    return seq.to(device, non_blocking=True), torch.from_numpy(mask).to(device)


def _seed_empty_histories(seq: torch.Tensor, plan: HistoryPlan, ids: np.ndarray, kind: Kind) -> None:
    """Replace the zero input of first encodings by the entity's id seed (in place)."""
    empty = np.flatnonzero(plan.event_length == 0)
    if len(empty):
        seeds = id_seed_vectors(ids[empty], kind, seq.shape[-1])
        seq[torch.from_numpy(empty), -1] = seeds.to(seq.device)


def id_seed_vectors(ids: np.ndarray, kind: Kind, dim: int) -> torch.Tensor:
    """(n, dim) standard-normal vectors, each a pure function of (kind, external id)."""
    out = np.empty((len(ids), dim), dtype=np.float32)
    for n, external in enumerate(ids):
        digest = hashlib.blake2b(f"{kind.value}:{external}".encode(), digest_size=8).digest()
        out[n] = np.random.default_rng(int.from_bytes(digest, "little")).standard_normal(dim)
    return torch.from_numpy(out)


def encode(model: FELRec, inputs: BatchInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """New representations u (B, D) of the users and x (B, D) of the items of the batch."""
    return model.encode(inputs.item_seq, inputs.item_mask, inputs.user_seq, inputs.user_mask)


def commit_batch(store: RepresentationStore, inputs: BatchInputs, u: torch.Tensor, x: torch.Tensor) -> None:
    """Write the latest vector per user/item (never through autograd) and append the histories."""
    for kind, slots, vectors in ((Kind.USER, inputs.user_slots, u), (Kind.ITEM, inputs.item_slots, x)):
        unique, last = last_occurrence(slots)
        table = store.tables[kind]
        table.vectors.put(torch.from_numpy(unique), vectors.detach()[torch.from_numpy(last).to(vectors.device)])
    ts = inputs.batch.timestamp
    store.users.history.apply(inputs.user_plan, ts[last_occurrence(inputs.user_slots)[1]])
    store.items.history.apply(inputs.item_plan, ts[last_occurrence(inputs.item_slots)[1]])


@torch.no_grad()
def infer_batch(model: FELRec, store: RepresentationStore, batch: EventBatch,
                cache: CacheConfig = DEFAULT_CACHE) -> tuple[BatchInputs, torch.Tensor, torch.Tensor]:
    """Inference step (evaluation, streaming worker): prepare, encode without MLPs, commit."""
    device = next(model.parameters()).device
    inputs = prepare_batch(store, batch, device, cache)
    u, x = encode(model, inputs)
    commit_batch(store, inputs, u, x)
    return inputs, u, x
