"""Spilling tables (cache.max_entities): a capped store ends in exactly the state of an uncapped one
(vectors, histories, counts, times and decayed popularity, under both cache_update rules), evicted
entities come back bit for bit, spill files are immutable, verified, collected and compacted."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from felrec_stream.config import CacheConfig, replace
from felrec_stream.errors import ConfigError, StoreError
from felrec_stream.state.store import exact_top_k
from felrec_stream.state.faiss_store import make_store
from felrec_stream.state.codec import flatten_state, unflatten_state
from felrec_stream.state.spill_files import SpillError
from felrec_stream.state.store import RepresentationStore
from pipelines.model import load_model
from pipelines.worker import store_fingerprint
from tests.pipelines import assert_same_store, offline_replay, synthetic_events, write_tiny_checkpoint

N_EVENTS, BATCH, CAP = 900, 32, 24
HALFLIFE = 40.0  # events: popularity decays over the run, so a lost or stale pop_at shows in the sums
BACKENDS = ["tensor", "faiss", "faiss-hnsw-2-shards"]
UPDATES = ["pre_event", "post_event"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """A tiny model per cache_update rule, its cache with a popularity half-life."""
    out = {}
    for update in UPDATES:
        plain = load_model(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", cache_update=update))
        out[update] = replace(plain, cache=replace(plain.cache, popularity_halflife=HALFLIFE))
    return out


@pytest.fixture(scope="module")
def bundle(bundles):
    return bundles["pre_event"]


@pytest.fixture(scope="module")
def table():
    return synthetic_events(N_EVENTS, n_users=150, n_items=90, seed=5)


def _store(bundle, backend: str, cap: int, spill_dir=None) -> RepresentationStore:
    cache = replace(bundle.cache, max_entities=cap)
    if backend == "tensor":
        return RepresentationStore(bundle.dim, cache.history_len, max_entities=cap, spill_dir=spill_dir,
                                   popularity_halflife=cache.popularity_halflife)
    if backend == "faiss-hnsw-2-shards":
        cache = replace(cache, index_type="hnsw", shards=2)
    return make_store(bundle.dim, cache, spill_dir=spill_dir)


def _replay(bundle, events, store):
    return offline_replay(bundle.model, events, BATCH, bundle.cache, store)


@pytest.fixture(scope="module")
def uncapped_stores(bundles, table):
    """(cache_update, backend) -> the uncapped store after the whole table (replayed on first use)."""
    memo = {}

    def get(update: str, backend: str) -> RepresentationStore:
        if (update, backend) not in memo:
            memo[update, backend] = _replay(bundles[update], table, _store(bundles[update], backend, 0))
        return memo[update, backend]
    return get


@pytest.fixture(scope="module")
def uncapped(uncapped_stores):
    """backend -> fingerprint of the uncapped pre_event store."""
    return {backend: store_fingerprint(uncapped_stores("pre_event", backend)) for backend in BACKENDS}


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_capped_store_ends_in_the_same_state_as_an_uncapped_one(bundles, table, uncapped_stores, backend, update):
    capped = _replay(bundles[update], table, _store(bundles[update], backend, CAP))
    reference = uncapped_stores(update, backend)
    # every vector, history, count, time, popularity (pop, pop_at) and event index
    assert_same_store(store_fingerprint(capped), store_fingerprint(reference))
    for t in capped.tables.values():
        assert len(t) > 3 * CAP and t.evicted > len(t) and t.restored > len(t) / 2  # real spill traffic
    capped.enforce_cap()
    assert all(t.resident <= CAP for t in capped.tables.values())
    # the popularity prior of evicted items: exact, and still decaying with the events applied since
    items = capped.items
    evicted = np.flatnonzero(items.row_of[: len(items)] < 0)
    assert len(evicted) > len(items) / 2
    for at in (items.history.events, items.history.events + 500):
        popularity = items.history.popularity(evicted, at)
        assert popularity.min() > 0
        np.testing.assert_array_equal(popularity, reference.items.history.popularity(evicted, at))
    assert (items.history.popularity(evicted) < items.history.counts[evicted]).all()  # the half-life acts


@pytest.mark.parametrize("backend", ["tensor", "faiss"])
def test_an_evicted_entity_comes_back_bit_for_bit(bundle, table, backend):
    store = _replay(bundle, table.slice(0, 320), _store(bundle, backend, 10**6))  # nothing evicted yet
    users = store.users
    slot = 3
    external = users.ids.names([slot])[0]
    before = users.read(np.asarray([slot]))
    held = users.vectors.rows_state(np.asarray([slot]))  # exactly what the backend holds (unit + norm for FAISS)
    users.evict(np.asarray([slot]))
    assert users.row_of[slot] < 0 and slot not in users.resident_slots()
    assert np.array_equal(users.read(np.asarray([slot])).raw(), before.raw())  # served from the spill...
    as_history = users.vectors.get(torch.tensor([[slot, -1]])).numpy()[0]  # how the engine reads it
    assert as_history[0].tobytes() == before.raw()[0].tobytes() and not as_history[1].any()
    assert users.row_of[slot] < 0  # ...without restoring it

    (name,) = users.spill_names()
    record = pq.read_table(store.spill.directory / name).to_pylist()[0]  # plain pyarrow reads a record
    assert (record["slot"], record["id"]) == (slot, external)
    assert record["history"] == before.rows[0].tolist()
    assert (record["history_length"], record["interaction_count"], record["last_update_time"]) == \
        (before.lengths[0], before.counts[0], before.last_time[0])
    assert (record["popularity"], record["popularity_at"]) == (before.pop[0], before.pop_at[0])
    assert before.pop[0] > 0 and before.pop_at[0] > 0

    assert users.slots(np.asarray([external], dtype=object)).tolist() == [slot]  # the id appears again
    assert users.row_of[slot] >= 0
    for key, value in users.vectors.rows_state(np.asarray([slot])).items():
        assert value.tobytes() == held[key].tobytes(), key
    after = users.read(np.asarray([slot]))
    for field in ("rows", "lengths", "counts", "last_time", "pop", "pop_at"):
        np.testing.assert_array_equal(getattr(after, field), getattr(before, field), err_msg=field)


@pytest.mark.parametrize("update", UPDATES)
def test_state_dict_with_spill_restores_and_continues_like_an_uninterrupted_run(bundles, table, uncapped_stores,
                                                                                update, tmp_path):
    bundle = bundles[update]
    first, rest = table.slice(0, 448), table.slice(448)
    running = _replay(bundle, first, _store(bundle, "faiss", CAP, tmp_path / "spill"))
    state = running.state_dict()
    assert state["users"]["spill"]["files"], "the state must refer to spill files"
    arrays, spec = flatten_state(state)  # what a snapshot persists
    restored = _store(bundle, "faiss", CAP, tmp_path / "spill")
    restored.load_state_dict(unflatten_state(arrays, spec))
    assert_same_store(store_fingerprint(restored), store_fingerprint(running))
    assert restored.users.resident == len(state["users"]["resident"]["slots"]) < len(restored.users)
    assert restored.items.history.events == 448 and restored.items.history.pop[: len(restored.items)].min() > 0
    for store in (running, restored):
        _replay(bundle, rest, store)
        assert_same_store(store_fingerprint(store), store_fingerprint(uncapped_stores(update, "faiss")))


def test_a_cap_can_be_switched_on_but_not_off_without_the_spill(bundle, table, uncapped):
    plain = _replay(bundle, table, _store(bundle, "faiss", 0))
    capped = _store(bundle, "faiss", CAP)
    capped.load_state_dict(plain.state_dict())  # every entity loaded once, then evicted to the cap
    assert capped.users.resident <= CAP and capped.items.resident <= CAP
    assert_same_store(store_fingerprint(capped), uncapped["faiss"])
    with pytest.raises(StoreError, match="max_entities"):
        _store(bundle, "faiss", 0).load_state_dict(capped.state_dict())


def test_a_corrupt_or_missing_spill_file_is_an_error_not_wrong_data(bundle, table, tmp_path):
    store = _replay(bundle, table.slice(0, 480), _store(bundle, "faiss", CAP, tmp_path / "spill"))
    state = store.state_dict()
    slot = int(np.flatnonzero(store.users.row_of[: len(store.users)] < 0)[0])
    name = store.users.files[store.users.loc_file[slot]]
    path = tmp_path / "spill" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = _store(bundle, "faiss", CAP, tmp_path / "spill")  # a new process: nothing verified yet
    fresh.load_state_dict(state)
    with pytest.raises(SpillError, match="corrupt"):
        fresh.users.read(np.asarray([slot]))
    path.unlink()
    with pytest.raises(SpillError, match="missing"):
        fresh.users.read(np.asarray([slot]))


def test_collect_spill_deletes_only_files_nobody_refers_to(bundle, table, tmp_path):
    spill_dir = tmp_path / "spill"
    store = _replay(bundle, table, _store(bundle, "tensor", CAP, spill_dir))
    live = set(store.spill_refs())
    on_disk = {p.name for p in spill_dir.iterdir()}
    dead = sorted(on_disk - live)
    assert live and dead, "a shared directory keeps dead files until collected"
    (spill_dir / ".user-crashed.parquet.tmp").write_bytes(b"half a file")
    deleted = store.collect_spill(protected={dead[0]})  # e.g. a kept snapshot still refers to it
    assert {p.name for p in spill_dir.iterdir()} == live | {dead[0]}
    assert set(deleted) == set(dead[1:]) | {".user-crashed.parquet.tmp"}
    for name, info in store.spill_refs().items():
        assert info["size"] == (spill_dir / name).stat().st_size and name.endswith(f"{info['sha256']}.parquet")


def test_private_spill_holds_only_live_files_and_compaction_bounds_them(bundle):
    events = synthetic_events(4000, n_users=400, n_items=200, seed=7)
    store = offline_replay(bundle.model, events, 64, bundle.cache, _store(bundle, "tensor", 40))
    for t in store.tables.values():
        names = t.spill_names()
        assert {p.name for p in store.spill.directory.iterdir() if p.name.startswith(t.kind.value)} == names
        records = int((t.loc_file[: len(t)] >= 0).sum())
        on_disk = sum(pq.ParquetFile(store.spill.directory / name).metadata.num_rows for name in names)
        assert records <= on_disk <= 2 * records, (t.kind, records, on_disk)  # ~6x without compaction


def test_reset_with_a_cap_matches_reset_without(bundle, table):
    stores = [_store(bundle, "tensor", cap) for cap in (0, CAP)]
    for store in stores:
        _replay(bundle, table.slice(0, 400), store)
        store.reset()  # epoch restart: every vector and history zero, slots kept
        _replay(bundle, table.slice(0, 400), store)
    assert_same_store(store_fingerprint(stores[1]), store_fingerprint(stores[0]))


def test_faiss_search_ranks_the_resident_entities_only(bundle, table):
    store = _replay(bundle, table, _store(bundle, "faiss", CAP))
    items = store.items
    query = store.users.read(np.asarray([0])).raw()[0]
    scores, slots = items.vectors.search(query[None, :], k=len(items))
    found = slots[0][slots[0] >= 0]
    resident = items.resident_slots()
    assert sorted(found.tolist()) == resident.tolist()
    exact_scores, positions = exact_top_k(store.items.vectors.all()[resident], query, len(resident),
                                          np.zeros(0, np.int64))
    assert found.tolist() == resident[positions].tolist()
    np.testing.assert_allclose(scores[0][: len(found)], exact_scores, rtol=0, atol=1e-5)


def test_cap_must_not_be_negative():
    with pytest.raises(ConfigError, match="max_entities"):
        CacheConfig(max_entities=-1)


def test_batches_larger_than_the_cap_still_apply_exactly(bundle, table, uncapped):
    store = _replay(bundle, table, _store(bundle, "faiss", 2))  # below the users of one batch: kept whole
    assert_same_store(store_fingerprint(store), uncapped["faiss"])
    assert store.users.resident <= BATCH


@pytest.mark.parametrize("damage", ["resident_rows", "location", "resident_slot", "popularity"])
def test_a_damaged_capped_state_is_refused_before_anything_loads(bundle, table, damage):
    state = _replay(bundle, table.slice(0, 320), _store(bundle, "faiss", CAP)).state_dict()
    items = state["items"]
    if damage == "resident_rows":
        items["resident"]["rows"] = items["resident"]["rows"][:, :3]
    elif damage == "popularity":
        items["history"]["pop_at"] = items["history"]["pop_at"][:-1]
    elif damage == "location":
        items["spill"]["file"] = np.full_like(items["spill"]["file"], len(items["spill"]["files"]))
    else:
        items["resident"]["slots"] = items["resident"]["slots"] + len(items["ids"])
    fresh = _store(bundle, "faiss", CAP)
    with pytest.raises(StoreError, match="item"):
        fresh.load_state_dict(state)
    assert len(fresh.users) == 0  # checked first: the users' (valid) part was not loaded either
