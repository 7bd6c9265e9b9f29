"""Query service over real HTTP: correctness vs brute force, error paths, freshness, snapshot swaps."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from felrec_stream.config import CacheConfig, EncoderConfig, ModelConfig, ScoringConfig
from felrec_stream.data.synthetic import SyntheticConfig, generate
from felrec_stream.errors import ServiceError
from felrec_stream.model.felrec import FELRec
from felrec_stream.serving.app import create_app, serve_in_thread
from felrec_stream.serving.query import MAX_K, ColdStartEncoder, NotFound, QueryEngine
from felrec_stream.serving.snapshots import SnapshotFollower, load_store_from_snapshot, snapshot_state
from felrec_stream.serving.client import FelrecClient, InvalidRequestError, NotFoundError, ServiceUnavailableError
from felrec_stream.state.engine import cold_vectors, commit_batch, infer_batch, prepare_batch
from felrec_stream.state.faiss_store import make_store
from felrec_stream.state.snapshot import SnapshotManager
from felrec_stream.state.store import Kind, RepresentationStore
from felrec_stream.stream.events import EventBatch, make_events
from tests.waiting import wait_for

D = 16
ROOT = Path(__file__).resolve().parents[3]


# ---- helpers (also used by test_export.py) -------------------------------------------------------

def tiny_model(seed: int = 0) -> FELRec:
    torch.manual_seed(seed)
    model = FELRec(EncoderConfig(d_model=D, n_layers=1, n_heads=2, d_ff=32, dropout=0.0), ModelConfig(queue_size=64))
    return model.eval()


def synthetic_batches(n_events: int = 1500, batch_size: int = 128, seed: int = 0) -> list[EventBatch]:
    data = generate(SyntheticConfig(n_users=60, n_items=80, n_events=n_events, n_clusters=4, seed=seed))
    events = EventBatch.from_table(data.events)
    return [events.take(slice(lo, lo + batch_size)) for lo in range(0, len(events), batch_size)]


def filled_store(model: FELRec, batches: list[EventBatch], store: RepresentationStore | None = None,
                 cache: CacheConfig | None = None) -> RepresentationStore:
    """A store written only by engine.infer_batch, as the streaming worker writes it."""
    store = store if store is not None else make_store(D, cache or CacheConfig(history_len=8, shards=2))
    for batch in batches:
        infer_batch(model, store, batch)
    return store


def brute_force(store: RepresentationStore, kind: Kind, query: np.ndarray, exclude: set[int]) -> dict[int, float]:
    """Cosine of every non-excluded slot of `kind` against `query` (zero vectors score 0)."""
    x = store.tables[kind].vectors.all().numpy().astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    q = query.astype(np.float64) / max(np.linalg.norm(query), 1e-30)
    scores = (x @ q) / np.where(norms > 0, norms, 1.0)
    return {slot: float(s) for slot, s in enumerate(scores) if slot not in exclude}


def assert_top_k(results, store: RepresentationStore, kind: Kind, query: np.ndarray, k: int, exclude: set[int]) -> None:
    """Results are the k best by cosine: every score is its id's true cosine and the score sequence is
    the brute-force one (ids may only differ inside float-noise ties)."""
    truth = brute_force(store, kind, query, exclude)
    expected = sorted(truth.values(), reverse=True)[:k]
    slots = store.tables[kind].ids.lookup([r.id for r in results])
    assert len(results) == len(expected)
    assert not set(slots.tolist()) & exclude
    np.testing.assert_allclose([truth[int(s)] for s in slots], [r.score for r in results], atol=1e-5)
    np.testing.assert_allclose([r.score for r in results], expected, atol=1e-5)


@pytest.fixture(scope="module")
def model() -> FELRec:
    return tiny_model()


@pytest.fixture(scope="module")
def store(model) -> RepresentationStore:
    return filled_store(model, synthetic_batches())


@pytest.fixture(scope="module")
def served(store):
    engine = QueryEngine(store)
    handle = serve_in_thread(create_app(lambda: engine), "127.0.0.1", 0)
    client = FelrecClient(handle.url)
    yield engine, client
    client.close()
    handle.stop()


# ---- correctness -----------------------------------------------------------------------------

@pytest.mark.parametrize("exclude_recent", [True, False])
def test_recommendations_equal_brute_force_cosine(served, store, exclude_recent):
    _, client = served
    for user in ["u0", "u7", "u33", "u59"]:
        slot = int(store.users.ids.lookup([user])[0])
        query = store.users.vectors.get(torch.tensor([slot])).numpy()[0]
        history = store.users.history
        recent = set(history.rows[slot, history.length - history.lengths[slot]:].tolist()) if exclude_recent else set()
        assert not exclude_recent or recent, "test users must have histories"
        results = client.recommendations(user, k=10, exclude_recent=exclude_recent)
        assert_top_k(results, store, Kind.ITEM, query, 10, recent)


def test_similar_items_and_users_equal_brute_force_and_exclude_self(served, store):
    _, client = served
    for kind, external, call in ((Kind.ITEM, "i3", client.similar_items), (Kind.USER, "u5", client.similar_users)):
        slot = int(store.tables[kind].ids.lookup([external])[0])
        query = store.tables[kind].vectors.get(torch.tensor([slot])).numpy()[0]
        assert_top_k(call(external, k=7), store, kind, query, 7, {slot})


def test_exact_backend_matches_faiss_backend(model, store):
    """A TensorVectors store (training/eval) gives the same answers through the exact scan."""
    tensor_store = filled_store(model, synthetic_batches(), RepresentationStore(D, history_len=8))
    faiss_engine, tensor_engine = QueryEngine(store), QueryEngine(tensor_store)
    for user in ["u1", "u20"]:
        a, b = faiss_engine.top_k_items(user, 15), tensor_engine.top_k_items(user, 15)
        np.testing.assert_allclose([r.score for r in a], [r.score for r in b], atol=1e-5)
        slot = int(tensor_store.users.ids.lookup([user])[0])
        query = tensor_store.users.vectors.get(torch.tensor([slot])).numpy()[0]
        history = tensor_store.users.history
        recent = set(history.rows[slot, history.length - history.lengths[slot]:].tolist())
        assert_top_k(b, tensor_store, Kind.ITEM, query, 15, recent)


def test_k_larger_than_catalog_returns_every_candidate(served, store):
    _, client = served
    assert len(client.similar_items("i0", k=MAX_K)) == len(store.items) - 1


def test_vectors_round_trip_raw_store_vectors(served, store):
    _, client = served
    got = client.vectors("item", ["i2", "i9"])
    want = store.items.vectors.get(torch.from_numpy(store.items.ids.lookup(["i2", "i9"]))).numpy()
    np.testing.assert_allclose(np.asarray([got["i2"], got["i9"]]), want, rtol=1e-6)


# ---- the served score: cosine + popularity prior, as the evaluator scores ---------------------------

SCORED_CACHE = CacheConfig(history_len=8, shards=2, popularity_halflife=150.0)


def brute_force_served(store: RepresentationStore, query: np.ndarray, weight: float, exclude: set[int],
                       k: int) -> list[tuple[str, float]]:
    """Every item scored by cos + weight * log(1 + popularity), (score desc, slot asc), top k."""
    cosine = brute_force(store, Kind.ITEM, query, set())
    slots = np.arange(len(store.items))
    scores = np.asarray([cosine[s] for s in slots]) + weight * np.log1p(store.items.history.popularity(slots))
    order = [s for s in np.lexsort((slots, -scores)) if s not in exclude][:k]
    return [(store.items.ids.ids()[s], float(scores[s])) for s in order]


@pytest.fixture(scope="module")
def scored_store(model) -> RepresentationStore:
    return filled_store(model, synthetic_batches(), cache=SCORED_CACHE)


@pytest.mark.parametrize("weight", [0.1, 1.0, 5.0])
def test_recommendations_rank_by_the_served_score_exactly_with_a_flat_index(model, scored_store, weight):
    engine = QueryEngine(scored_store, scoring=ScoringConfig(popularity_weight=weight))
    handle = serve_in_thread(create_app(lambda: engine), "127.0.0.1", 0)
    try:
        with FelrecClient(handle.url) as client:
            for user in ["u0", "u7", "u33", "u59"]:
                slot = int(scored_store.users.ids.lookup([user])[0])
                query = scored_store.users.vectors.get(torch.tensor([slot])).numpy()[0]
                history = scored_store.users.history
                recent = set(history.rows[slot, history.length - history.lengths[slot]:].tolist())
                for k, exclude in ((10, recent), (25, set())):
                    answer = client.recommend(user, k=k, exclude_recent=bool(exclude))
                    expected = brute_force_served(scored_store, query, weight, exclude, k)
                    assert not answer.cold_start
                    assert [r.id for r in answer.results] == [i for i, _ in expected]
                    np.testing.assert_allclose([r.score for r in answer.results], [s for _, s in expected],
                                               rtol=1e-6, atol=1e-6)
            assert client.catalog().popularity_weight == weight
    finally:
        handle.stop()


def test_the_prior_changes_the_ranking_and_similar_items_stay_cosine(model, scored_store):
    """Not vacuous: the weight reorders recommendations; similar items ignore it."""
    plain, scored = QueryEngine(scored_store), QueryEngine(scored_store, scoring=ScoringConfig(popularity_weight=1.0))
    assert [r.id for r in plain.top_k_items("u7", 10)] != [r.id for r in scored.top_k_items("u7", 10)]
    assert scored.similar_items("i3", 10) == plain.similar_items("i3", 10)


def clustered_store(n_items: int, index_type: str, seed: int = 0, **options) -> RepresentationStore:
    """Items around 40 centres with Zipf-like decayed popularity, 50 users; vectors written directly."""
    rng = np.random.default_rng(seed)
    dim, centres = 16, rng.standard_normal((40, 16)).astype(np.float32)
    cache = CacheConfig(history_len=4, popularity_halflife=2000.0, index_type=index_type)
    store = make_store(dim, cache, **options)
    items = centres[rng.integers(0, 40, n_items)] + 0.6 * rng.standard_normal((n_items, dim)).astype(np.float32)
    users = centres[rng.integers(0, 40, 50)] + 0.6 * rng.standard_normal((50, dim)).astype(np.float32)
    item_slots = store.items.slots(np.asarray([f"i{n}" for n in range(n_items)], dtype=object))
    user_slots = store.users.slots(np.asarray([f"u{n}" for n in range(50)], dtype=object))
    store.users.vectors.put(torch.from_numpy(user_slots), torch.from_numpy(users))
    store.items.vectors.put(torch.from_numpy(item_slots), torch.from_numpy(items))
    weights = 1.0 / np.arange(1, n_items + 1) ** 0.8
    events = rng.choice(n_items, 20_000, p=weights / weights.sum())
    history = store.items.history
    for lo in range(0, len(events), 1000):
        chunk = events[lo:lo + 1000]
        history.apply(history.plan(chunk, np.zeros(len(chunk), dtype=np.int64)), slots=chunk)
    return store


def test_ann_recommendations_recall_the_exact_served_ranking():
    """IVF cosine candidates + the popular list, re-ranked exactly: recall@10 of the served ranking
    against the flat index's exact one (bench_query.py measures it at 1M items)."""
    scoring = ScoringConfig(popularity_weight=0.3)
    exact = QueryEngine(clustered_store(6000, "flat"), scoring=scoring)
    ann = QueryEngine(clustered_store(6000, "ivf", ivf_nlist=64, ivf_nprobe=4, ivf_train_size=2560), scoring=scoring)
    assert ann.store.items.vectors.shards[0].ann.ready()  # the IVF index answers, not the exact fallback
    recalls = []
    for user in [f"u{n}" for n in range(50)]:
        want = {r.id for r in exact.top_k_items(user, 10, exclude_recent=False)}
        got = [r.id for r in ann.top_k_items(user, 10, exclude_recent=False)]
        recalls.append(len(want & set(got)) / 10)
    assert np.mean(recalls) >= 0.9, recalls


def test_unknown_users_get_cold_start_recommendations_when_the_model_is_in_process(model, scored_store):
    """The query is the encoding of an empty history (what the evaluator scores a new user's first
    event with), ranked by the same served score; without the model the API keeps answering 404."""
    cache, scoring = SCORED_CACHE, ScoringConfig(popularity_weight=0.5)
    engine = QueryEngine(scored_store, scoring=scoring, cold_start=ColdStartEncoder(model, cache))
    handle = serve_in_thread(create_app(lambda: engine), "127.0.0.1", 0)
    try:
        with FelrecClient(handle.url) as client:
            answer = client.recommend("someone-new", k=10)
            assert answer.cold_start and len(answer.results) == 10
            query = cold_vectors(model, Kind.USER, ["someone-new"], cache)[0].numpy()
            expected = brute_force_served(scored_store, query, 0.5, set(), 10)
            assert [r.id for r in answer.results] == [i for i, _ in expected]
            assert not client.recommend("u7").cold_start  # known users: their stored vector
            with pytest.raises(NotFoundError):
                client.similar_users("someone-new")  # similarities need a stored vector
    finally:
        handle.stop()
    assert "someone-new" not in scored_store.users.ids  # nothing written


def test_ids_registered_by_a_batch_still_encoding_are_not_served(model):
    """The worker registers a batch's new ids before encoding it without the lock; until its commit
    (committed_sizes) they are unknown, never returned, and not counted."""
    store = filled_store(model, synthetic_batches()[:3])
    committed = {Kind.USER: len(store.users), Kind.ITEM: len(store.items)}
    engine = QueryEngine(store, committed_sizes=lambda: committed)
    store.users.slots(np.asarray(["pending-user"], dtype=object))  # what the worker's step 1 does
    store.items.slots(np.asarray([f"pending-{n}" for n in range(20)], dtype=object))
    with pytest.raises(NotFound):
        engine.top_k_items("pending-user")
    with pytest.raises(NotFound):
        engine.vectors("item", ["pending-3"])
    returned = {r.id for r in engine.similar_items("i1", k=MAX_K)} | {r.id for r in engine.top_k_items("u1", MAX_K)}
    assert not {i for i in returned if i.startswith("pending")} and len(returned) >= len(store.items) - 21
    assert engine.sizes() == {"users": committed[Kind.USER], "items": committed[Kind.ITEM]}


def test_a_snapshot_is_served_with_its_scoring_config(tmp_path, model, scored_store):
    state, meta = snapshot_state(scored_store, SCORED_CACHE)
    SnapshotManager(tmp_path).write_state(state, {**meta, "configs": {"scoring": {"popularity_weight": 0.7}}})
    follower = SnapshotFollower(tmp_path)
    assert follower.poll_once()
    replica, live = follower.current(), QueryEngine(scored_store, scoring=ScoringConfig(popularity_weight=0.7))
    assert replica.scoring.popularity_weight == 0.7
    assert replica.store.items.history.halflife == SCORED_CACHE.popularity_halflife
    assert replica.top_k_items("u5", 10) == live.top_k_items("u5", 10)
    with pytest.raises(NotFound):
        replica.top_k_items("someone-new")  # a read replica has no model: 404, never a guess


# ---- error paths -----------------------------------------------------------------------------

def test_unknown_ids_are_404_with_the_id_in_the_message(served):
    _, client = served
    calls = [lambda: client.recommendations("nobody"), lambda: client.similar_items("no-item"),
             lambda: client.similar_users("nobody"), lambda: client.vectors("user", ["u1", "ghost"])]
    for call, missing in zip(calls, ["nobody", "no-item", "nobody", "ghost"]):
        with pytest.raises(NotFoundError, match=missing) as info:
            call()
        assert info.value.status_code == 404


def test_ids_with_slashes_and_spaces_are_routed(model):
    store = filled_store(model, [EventBatch.from_table(make_events(["a/b c", "x"], ["i/1", "i 2"], [1, 2]))])
    handle = serve_in_thread(create_app(lambda: QueryEngine(store)), "127.0.0.1", 0)
    try:
        with FelrecClient(handle.url) as client:
            assert [r.id for r in client.recommendations("a/b c", k=5, exclude_recent=False)][0] in {"i/1", "i 2"}
            assert [r.id for r in client.similar_items("i/1")] == ["i 2"]
    finally:
        handle.stop()


@pytest.mark.parametrize("k", [0, -1, MAX_K + 1])
def test_k_outside_limits_is_422(served, k):
    _, client = served
    for call in (client.recommendations, client.similar_items, client.similar_users):
        with pytest.raises(InvalidRequestError, match="k") as info:
            call("u1" if call is not client.similar_items else "i1", k=k)
        assert info.value.status_code == 422


def test_vectors_request_limits_are_413_and_422(served):
    _, client = served
    with pytest.raises(InvalidRequestError) as info:
        client.vectors("user", [f"u{i}" for i in range(1001)])
    assert info.value.status_code == 413
    with pytest.raises(InvalidRequestError):
        client.vectors("user", [])
    with pytest.raises(InvalidRequestError):
        client.vectors("movie", ["u1"])  # type: ignore[arg-type]


def test_engine_raises_typed_errors_in_process(store):
    engine = QueryEngine(store)
    with pytest.raises(ServiceError, match="unknown user id"):
        engine.top_k_items("nobody")
    with pytest.raises(ServiceError, match="k must be"):
        engine.similar_items("i1", k=MAX_K + 1)


def test_not_ready_until_an_engine_exists():
    holder: list[QueryEngine | None] = [None]
    handle = serve_in_thread(create_app(lambda: holder[0]), "127.0.0.1", 0)
    try:
        with FelrecClient(handle.url) as client:
            assert client.healthz() and not client.readyz()
            with pytest.raises(ServiceUnavailableError):
                client.recommendations("u1")
            assert "felrec_ready 0.0" in client.metrics()
            holder[0] = QueryEngine(RepresentationStore(D))
            assert client.readyz() and client.catalog().users == 0
    finally:
        handle.stop()


def test_bind_conflict_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServiceError, match="cannot bind"):
            serve_in_thread(create_app(lambda: None), "127.0.0.1", taken.getsockname()[1])


# ---- freshness, metrics, OpenAPI ----------------------------------------------------------------

def test_new_item_with_x_co_interactors_is_most_similar_to_x(model):
    """Users u1..u4 interact with X, then with brand-new item N, in one micro-batch.

    Why it must hold: with history_len L=3, X's latest event (u4, X) and N's latest event (u4, N)
    both see the history [u1, u2, u3] (the in-batch rule) read from the same pre-batch cache, so
    the encoder gets identical inputs and x_N == x_X: cosine 1, N is X's nearest item. Background
    traffic before makes X an established item with an older history of other users.
    """
    store = make_store(D, CacheConfig(history_len=3, shards=2))
    filled_store(model, synthetic_batches(n_events=600), store)
    engine = QueryEngine(store)
    handle = serve_in_thread(create_app(lambda: engine), "127.0.0.1", 0)
    try:
        users, x = ["u1", "u2", "u3", "u4"], "i5"
        arrived = time.time()
        batch = EventBatch.from_table(make_events(users + users, [x] * 4 + ["brand-new"] * 4,
                                                  [2_000_000_000] * 8, np.arange(10**6, 10**6 + 8)))
        with engine.lock:  # the worker's contract: apply under the engine's lock, then report
            infer_batch(model, store, batch)
        freshness = engine.note_batch_applied([arrived] * len(batch))
        engine.note_snapshot(7, "2026-01-01T00:00:00+00:00")  # the worker's other hook
        with FelrecClient(handle.url) as client:
            similar = client.similar_items(x, k=5)
            metrics = client.metrics()
            assert client.catalog().snapshot_seq == 7
        assert similar[0].id == "brand-new" and similar[0].score > 0.999
        assert freshness.max() < 5.0
        assert "felrec_freshness_seconds " in metrics and "felrec_event_freshness_seconds_count 8.0" in metrics
    finally:
        handle.stop()


def test_metrics_latency_per_route_template_and_openapi(served):
    _, client = served
    client.recommendations("u1", k=3)
    with pytest.raises(NotFoundError):
        client.similar_users("nobody")
    text = client.metrics()
    assert 'route="/v1/users/{user_id:path}/recommendations",status="200"' in text
    assert 'route="/v1/users/{user_id:path}/similar",status="404"' in text
    assert 'felrec_entities{kind="items"}' in text
    paths = client.openapi()["paths"]
    for path in ["/v1/users/{user_id}/recommendations", "/v1/items/{item_id}/similar", "/v1/users/{user_id}/similar",
                 "/v1/vectors", "/v1/catalog", "/healthz", "/readyz"]:
        assert path in paths, sorted(paths)


# ---- concurrency -------------------------------------------------------------------------------

def test_reads_under_the_writer_lock_are_never_torn(store):
    """A writer rewrites the user and then every item to one shared direction per batch, in two
    separate puts, holding the lock; a reader must always see cosine 1 (both from the same batch)."""
    lone = make_store(D, CacheConfig(history_len=4))
    user_slot = lone.users.slots(np.asarray(["u"], dtype=object))
    item_slots = lone.items.slots(np.asarray([f"i{n}" for n in range(50)], dtype=object))
    engine, stop, bad = QueryEngine(lone), threading.Event(), []

    def write() -> None:
        rng = np.random.default_rng(0)
        while not stop.is_set():
            v = torch.from_numpy(rng.standard_normal(D).astype(np.float32))
            with engine.lock:
                lone.users.vectors.put(torch.from_numpy(user_slot), v[None])
                time.sleep(0.0005)  # widen the window a torn read would fall into
                lone.items.vectors.put(torch.from_numpy(item_slots), v.repeat(50, 1))

    with engine.lock:
        lone.users.vectors.put(torch.from_numpy(user_slot), torch.ones(1, D))
        lone.items.vectors.put(torch.from_numpy(item_slots), torch.ones(50, D))
    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(300):
            scores = [r.score for r in engine.top_k_items("u", k=3, exclude_recent=False)]
            bad += [s for s in scores if abs(s - 1.0) > 1e-4]
    finally:
        stop.set()
        writer.join()
    assert not bad


def test_snapshot_swaps_under_concurrent_requests_never_fail(tmp_path, model):
    """Five snapshots swapped in while three threads query: zero failed requests, seqs only grow."""
    batches = synthetic_batches(n_events=1500)
    live = make_store(D, CacheConfig(history_len=8, shards=2))
    manager, cache = SnapshotManager(tmp_path, keep=3), CacheConfig(history_len=8, shards=2)
    filled_store(model, batches[:4], live)
    user, item = live.users.ids.ids()[0], live.items.ids.ids()[0]  # present in every snapshot
    manager.write_state(*snapshot_state(live, cache))
    follower = SnapshotFollower(tmp_path, poll_seconds=0.02)
    assert follower.poll_once()
    handle = serve_in_thread(create_app(follower.current), "127.0.0.1", 0)
    follower.start()
    stop, errors, seen = threading.Event(), [], {}

    def query(name: str) -> None:
        seqs = seen.setdefault(name, [])
        with FelrecClient(handle.url) as client:
            while not stop.is_set():
                try:
                    client.recommendations(user, k=5)
                    client.similar_items(item, k=5)
                    seqs.append(client.catalog().snapshot_seq)
                except Exception as exc:  # any failure is the bug under test
                    errors.append(repr(exc))

    threads = [threading.Thread(target=query, args=(f"t{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    swapped_in = []
    try:
        for lo in range(4, 9):
            filled_store(model, batches[lo:lo + 1], live)
            seq = int(manager.write_state(*snapshot_state(live, cache)).name.split("-")[1])
            swapped_in.append(seq)
            wait_for(lambda seq=seq: follower.seq == seq, 20, f"the follower swapped in snapshot {seq}")
            # every thread has answered from the new engine before the next swap
            wait_for(lambda seq=seq: len(seen) == len(threads) and all(s and s[-1] == seq for s in seen.values()),
                     20, f"every query thread saw snapshot {seq}")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        follower.stop()
        handle.stop()
    assert not errors, errors[:5]
    assert follower.swaps == 6
    for seqs in seen.values():
        assert set(swapped_in) <= set(seqs) and seqs == sorted(seqs), seqs
    assert max(max(s) for s in seen.values()) == follower.seq


def test_follower_keeps_serving_when_a_newer_snapshot_cannot_be_loaded(tmp_path, model):
    manager, cache = SnapshotManager(tmp_path), CacheConfig(history_len=8)
    manager.write_state(*snapshot_state(filled_store(model, synthetic_batches()[:2]), cache))
    follower = SnapshotFollower(tmp_path)
    assert follower.poll_once()
    first = follower.current()
    manager.write_state({"something": np.zeros(3)}, {"cache": {}})  # not a store state
    assert not follower.poll_once()
    assert follower.current() is first



def test_follower_starts_on_the_newest_snapshot_that_loads(tmp_path, model):
    manager, cache = SnapshotManager(tmp_path), CacheConfig(history_len=8)
    manager.write_state(*snapshot_state(filled_store(model, synthetic_batches()[:2]), cache))
    state, meta = snapshot_state(filled_store(model, synthetic_batches()[:3]), cache)
    state["store"]["items"]["vectors"]["norms"] = state["store"]["items"]["vectors"]["norms"][:-2]  # inconsistent
    manager.write_state(state, meta)  # verifies (checksums are of what was written), does not load
    follower = SnapshotFollower(tmp_path)
    assert follower.poll_once() and follower.seq == 1  # ready on the previous one, not 503 forever
    assert not follower.poll_once()  # and the broken one is not rebuilt at every poll


def test_follower_follows_a_directory_that_was_reset(tmp_path, model):
    cache = CacheConfig(history_len=8)
    manager = SnapshotManager(tmp_path)
    for n in range(1, 4):
        state, meta = snapshot_state(filled_store(model, synthetic_batches()[:n]), cache)
        manager.write_state(state, {**meta, "lineage": "first"})
    follower = SnapshotFollower(tmp_path)
    assert follower.poll_once() and follower.seq == 3
    manager.discard_all()  # the worker started over (--reset-state, or the directory was wiped)
    state, meta = snapshot_state(filled_store(model, synthetic_batches()[:1]), cache)
    manager.write_state(state, {**meta, "lineage": "second"})  # seq 1 again
    assert follower.poll_once() and follower.seq == 1
    assert follower.current().sizes() == {"users": len(state["store"]["users"]["ids"]),
                                          "items": len(state["store"]["items"]["ids"])}
    state, meta = snapshot_state(filled_store(model, synthetic_batches()[:2]), cache)
    manager.write_state(state, {**meta, "lineage": "second"})
    assert follower.poll_once() and follower.seq == 2


# ---- limits against untrusted clients ------------------------------------------------------------

def test_large_bodies_are_413_before_parsing_and_errors_never_echo_input(served):
    _, client = served
    http = client._http
    huge = b'{"kind": "user", "ids": ["' + b"x" * (20 << 20) + b'"]}'
    response = http.post("/v1/vectors", content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 413 and len(response.content) < 200

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(40):
            yield b" " * (64 << 10)

    response = http.post("/v1/vectors", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and len(response.content) < 200

    long_id = "z" * 200_000  # fits the body limit; longer than any id of the topic -> 422 that quotes nothing
    response = http.post("/v1/vectors", json={"kind": "user", "ids": [long_id]})
    assert response.status_code == 422 and len(response.content) < 300 and "200000 characters" in response.text
    response = http.post("/v1/vectors", json={"kind": "user", "ids": "w" * 500_000})  # not a list: 422
    assert response.status_code == 422 and len(response.content) < 1000 and "www" not in response.text
    response = http.get(f"/v1/users/{'q' * 6000}/recommendations")
    assert response.status_code == 422 and len(response.content) < 300
    assert client.healthz()


@pytest.mark.parametrize("bad", ["", "   ", "a\x00b", "tab\there", "x" * 257, "y" * 30_000])
def test_ids_the_topic_would_reject_are_422_in_a_short_message(model, scored_store, bad):
    """Empty, control characters, more than 256 characters: never a (cold-start) answer that echoes the id."""
    from urllib.parse import quote

    engine = QueryEngine(scored_store, cold_start=ColdStartEncoder(model, SCORED_CACHE))
    handle = serve_in_thread(create_app(lambda: engine), "127.0.0.1", 0)
    try:
        with FelrecClient(handle.url) as client:
            http = client._http
            for path in (f"/v1/users/{quote(bad, safe='')}/recommendations", f"/v1/users/{quote(bad, safe='')}/similar",
                         f"/v1/items/{quote(bad, safe='')}/similar"):
                response = http.get(path)
                assert response.status_code == 422 and len(response.content) < 300, (path[:40], response.text[:300])
                assert "id" in response.json()["detail"]
            response = http.post("/v1/vectors", json={"kind": "item", "ids": ["i1", bad]})
            assert response.status_code == 422 and len(response.content) < 300
    finally:
        handle.stop()


def test_head_is_answered_on_every_get_route(served):
    _, client = served
    http = client._http
    for path in ("/healthz", "/readyz", "/v1/catalog", "/v1/users/u1/recommendations", "/v1/items/i1/similar",
                 "/metrics"):
        get, head = http.get(path), http.head(path)
        assert (head.status_code, head.content) == (get.status_code, b""), path
        assert get.status_code == 200, path
    assert http.head("/v1/users/nobody/recommendations").status_code == 404


def test_a_connection_that_never_finishes_its_request_head_is_closed(monkeypatch):
    from felrec_stream.serving import app as app_module

    monkeypatch.setattr(app_module, "HEADER_TIMEOUT_S", 0.5, raising=False)
    handle = serve_in_thread(create_app(lambda: None), "127.0.0.1", 0)
    try:
        with socket.create_connection((handle.host, handle.port), timeout=20) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # half a request head, then nothing
            assert sock.recv(1024) == b""  # closed by the server (socket timeout: a failure, not a hang)
        with socket.create_connection((handle.host, handle.port), timeout=20) as sock:  # an idle one too
            assert sock.recv(1024) == b""
        with socket.create_connection((handle.host, handle.port), timeout=20) as sock:  # a whole request is answered
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    finally:
        handle.stop()


# ---- the standalone command ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command_serves_snapshots_and_stops_on_sigterm(tmp_path, model):
    store = filled_store(model, synthetic_batches()[:3])
    SnapshotManager(tmp_path).write_state(*snapshot_state(store, CacheConfig(history_len=8)))
    port = _free_port()
    cmd = [sys.executable, "-c", "from felrec_stream.cli import main; main()", "serve",
           "--snapshot-dir", str(tmp_path), "--port", str(port), "--poll-seconds", "0.2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FELREC_LOG_JSON": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with FelrecClient(f"http://127.0.0.1:{port}", timeout=2.0) as client:
            wait_for(lambda: proc.poll() is not None or client.readyz(), 60, "`serve` is ready (or exited)")
            assert client.catalog().snapshot_seq == 1
            assert len(client.recommendations(store.users.ids.ids()[0], k=3)) == 3
            metrics = client.metrics()
            assert "felrec_snapshot_seq 1.0" in metrics and "felrec_snapshot_age_seconds " in metrics
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output
    assert "snapshot_swapped" in output and "api_stopped" in output


# ---- capped stores (cache.max_entities) ----------------------------------------------------------

CAPPED = CacheConfig(history_len=8, shards=2, max_entities=20)


def _capped_store(model, spill_dir=None, tensor: bool = False) -> RepresentationStore:
    if tensor:
        return filled_store(model, synthetic_batches(), RepresentationStore(D, 8, max_entities=20))
    return filled_store(model, synthetic_batches(), make_store(D, CAPPED, spill_dir=spill_dir))


def _evicted_users(store: RepresentationStore) -> list[str]:
    slots = np.flatnonzero(store.users.row_of[: len(store.users)] < 0)
    return store.users.ids.names(slots[:5])


def test_capped_store_serves_spilled_entities_and_ranks_resident_ones(model, store):
    capped = _capped_store(model)
    engine, full = QueryEngine(capped), QueryEngine(store)  # `store`: the same batches without a cap
    users = _evicted_users(capped)
    assert len(users) == 5
    assert engine.vectors("user", users) == full.vectors("user", users)  # read from the spill files
    resident = capped.items.resident_slots()
    for user in users:
        slot = int(store.users.ids.lookup([user])[0])
        query = store.users.vectors.get(torch.tensor([slot])).numpy()[0]
        history = store.users.history
        recent = set(history.rows[slot, history.length - history.lengths[slot]:].tolist())
        results = engine.top_k_items(user, k=10)
        got = capped.items.ids.lookup([r.id for r in results])
        assert set(got.tolist()) <= set(resident.tolist()) and not set(got.tolist()) & recent
        candidates = [s for s in resident.tolist() if s not in recent]
        truth = brute_force(store, Kind.ITEM, query, set(range(len(store.items))) - set(candidates))
        np.testing.assert_allclose([r.score for r in results], sorted(truth.values(), reverse=True)[:10], atol=1e-5)
        assert capped.users.row_of[slot] < 0  # answering did not bring the user back into memory


def test_capped_exact_scan_matches_the_capped_faiss_search(model):
    faiss_engine, tensor_engine = QueryEngine(_capped_store(model)), QueryEngine(_capped_store(model, tensor=True))
    for user in ["u1", "u20", "u41"]:
        a, b = faiss_engine.top_k_items(user, 12), tensor_engine.top_k_items(user, 12)
        assert [r.id for r in a] == [r.id for r in b]
        np.testing.assert_allclose([r.score for r in a], [r.score for r in b], atol=1e-5)


def test_read_replica_of_a_capped_snapshot_reads_the_spill_in_place(model, tmp_path):
    root = tmp_path / "snap"
    live = _capped_store(model, spill_dir=root / "spill")
    state, meta = snapshot_state(live, CAPPED)
    SnapshotManager(root).write_state(state, meta, refs={f"spill/{n}": i for n, i in live.spill_refs().items()})
    before = sorted(p.name for p in (root / "spill").iterdir())
    follower = SnapshotFollower(root)
    assert follower.poll_once()
    replica, engine = follower.current(), QueryEngine(live)
    users = _evicted_users(live)
    assert replica.vectors("user", users) == engine.vectors("user", users)
    for user in users:
        assert replica.top_k_items(user, 10) == engine.top_k_items(user, 10)
    assert replica.store.users.resident == live.users.resident  # memory bounded like the worker's
    assert sorted(p.name for p in (root / "spill").iterdir()) == before  # read-only: nothing written


@pytest.mark.parametrize("backend", ["tensor", "tensor_capped", "faiss"])
@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_recent_items_stay_excluded_with_the_prior_on_every_backend(backend, weight):
    """A catalog smaller than k: the exact scan must not hand back the excluded (recent) items,
    which the popularity prior would then score as candidates."""
    D = 4
    store = {"tensor": lambda: RepresentationStore(D, 8),
             "tensor_capped": lambda: RepresentationStore(D, 8, max_entities=20),
             "faiss": lambda: make_store(D, CacheConfig(history_len=8))}[backend]()
    users = np.array(["u0", "u0", "u1", "u1", "u2"], dtype=object)
    items = np.array(["i0", "i1", "i0", "i2", "i0"], dtype=object)
    batch = EventBatch(users, items, np.arange(5, dtype=np.int64), np.arange(5, dtype=np.int64))
    g = torch.Generator().manual_seed(0)
    u, x = torch.randn(5, D, generator=g), torch.randn(5, D, generator=g)
    commit_batch(store, prepare_batch(store, batch, "cpu"), u, x)
    engine = QueryEngine(store, scoring=ScoringConfig(popularity_weight=weight))
    assert [r.id for r in engine.top_k_items("u0", k=10)] == ["i2"]  # u0 met i0 and i1


def test_a_replica_keeps_serving_the_spill_files_of_its_snapshot_after_the_writer_pruned_them(model, tmp_path):
    """With --keep-snapshots 1 the worker deletes the spill files only the previous snapshot used as
    soon as it commits the next one: a replica still serving the previous one must not fail (500)."""
    root = tmp_path / "snap"
    live = _capped_store(model, spill_dir=root / "spill")
    state, meta = snapshot_state(live, CAPPED)
    SnapshotManager(root).write_state(state, meta, refs={f"spill/{n}": i for n, i in live.spill_refs().items()})
    follower = SnapshotFollower(root)
    assert follower.poll_once()
    users = _evicted_users(live)
    expected = QueryEngine(live).vectors("user", users)
    for path in (root / "spill").iterdir():  # pruned by the writer after a newer commit
        path.unlink()
    assert follower.current().vectors("user", users) == expected  # read through the pinned files


def _flip_bytes(path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_spill_file_is_verified_at_load_and_the_previous_snapshot_served(model, tmp_path):
    root = tmp_path / "snap"
    live = _capped_store(model, spill_dir=root / "spill")
    state, meta = snapshot_state(live, CAPPED)
    refs = {f"spill/{n}": i for n, i in live.spill_refs().items()}
    manager = SnapshotManager(root)
    manager.write_state(state, meta, refs=refs)
    first = set(refs)
    filled_store(model, synthetic_batches(n_events=300, seed=1), live)  # more events: more spill files
    state, meta = snapshot_state(live, CAPPED)
    refs = {f"spill/{n}": i for n, i in live.spill_refs().items()}
    manager.write_state(state, meta, refs=refs)
    _flip_bytes(root / sorted(set(refs) - first)[0])  # a file only the newest snapshot needs
    follower = SnapshotFollower(root)
    assert follower.poll_once() and follower.seq == 1


def test_a_spill_file_that_breaks_while_served_is_503_with_a_reason(model, tmp_path):
    """Damage after the snapshot was verified: an answer that needs the file is 503, never 500."""
    root = tmp_path / "snap"
    live = _capped_store(model, spill_dir=root / "spill")
    state, meta = snapshot_state(live, CAPPED)
    SnapshotManager(root).write_state(state, meta, refs={f"spill/{n}": i for n, i in live.spill_refs().items()})
    store = load_store_from_snapshot(SnapshotManager(root).latest_valid())
    store.spill._verified.clear()  # as if verified by another process: the next read checks again
    for path in (root / "spill").iterdir():
        _flip_bytes(path)
    handle = serve_in_thread(create_app(lambda: QueryEngine(store)), "127.0.0.1", 0)
    try:
        with FelrecClient(handle.url) as client:
            response = client._http.get(f"/v1/users/{_evicted_users(live)[0]}/recommendations")
            assert response.status_code == 503 and "spill file" in response.json()["detail"]
    finally:
        handle.stop()
