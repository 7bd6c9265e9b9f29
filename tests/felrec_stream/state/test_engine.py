"""The shared batch rules: pre-batch cache reads, in-batch histories, latest write wins."""

import numpy as np
import pytest
import torch

from felrec_stream.config import CacheConfig, EncoderConfig, ModelConfig
from felrec_stream.model.felrec import FELRec
from felrec_stream.state.engine import (cold_vectors, commit_batch, encode, id_seed_vectors, infer_batch,
                                       prepare_batch)
from felrec_stream.state.store import Kind, RepresentationStore
from felrec_stream.stream.events import EventBatch, iter_batches, make_events

TINY = EncoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return FELRec(TINY, ModelConfig(queue_size=64)).eval()


def batch(users, items):
    n = len(users)
    return EventBatch(np.array(users, dtype=object), np.array(items, dtype=object),
                      np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64))


def test_batch_reads_the_cache_as_it_was_before_the_batch():
    store = RepresentationStore(16, 8)
    model = tiny_model()
    infer_batch(model, store, batch(["a"], ["x"]))
    before = store.items.vectors.all().clone()
    inputs = prepare_batch(store, batch(["b", "c"], ["x", "x"]), "cpu")
    # user c's history is empty; item x's users: a (stored) and, for the 2nd event, b (same batch, not yet written)
    x_slot = store.items.ids.lookup(["x"])[0]
    assert inputs.item_plan.event_history[1, -2:].tolist() == [store.users.ids.lookup(["a"])[0],
                                                               store.users.ids.lookup(["b"])[0]]
    b_slot = store.users.ids.lookup(["b"])[0]
    assert store.users.vectors.get(torch.tensor([b_slot])).abs().sum() == 0  # b not written before the batch
    torch.testing.assert_close(store.items.vectors.all(), before)  # prepare never writes
    assert x_slot == 0


def test_latest_event_of_a_duplicated_id_wins():
    store = RepresentationStore(16, 8)
    model = tiny_model()
    inputs = prepare_batch(store, batch(["a", "a", "b"], ["x", "y", "x"]), "cpu")
    u, x = encode(model, inputs)
    commit_batch(store, inputs, u, x)
    a, b = store.users.ids.lookup(["a", "b"])
    torch.testing.assert_close(store.users.vectors.get(torch.tensor([a, b])), u[[1, 2]])
    xs = store.items.ids.lookup(["x"])[0]
    torch.testing.assert_close(store.items.vectors.get(torch.tensor([xs]))[0], x[2])


def test_batching_changes_only_what_the_rules_say():
    """One event per batch == a fully sequential replay; results are deterministic."""
    events = make_events(["a", "b", "a", "c", "b"], ["x", "x", "y", "y", "z"], [0, 1, 2, 3, 4])
    stores = []
    for _ in range(2):
        store, model = RepresentationStore(16, 8), tiny_model()
        for b in iter_batches(events, 1):
            infer_batch(model, store, b)
        stores.append(store)
    torch.testing.assert_close(stores[0].users.vectors.all(), stores[1].users.vectors.all())
    assert stores[0].users.history.counts[:3].tolist() == [2, 2, 1]


def test_sequences_are_trimmed_to_the_longest_history_in_the_batch():
    store = RepresentationStore(16, 64)
    model = tiny_model()
    infer_batch(model, store, batch(["a", "a", "a"], ["x", "y", "z"]))
    inputs = prepare_batch(store, batch(["a", "b"], ["w", "w"]), "cpu", after=True)
    assert inputs.users_before.h.shape[1] == 3  # a has 3 previous items, not 64
    assert inputs.users_before.mask.tolist() == [[True, True, True], [False, False, True]]
    assert inputs.users_before.empty.tolist() == [False, True]
    assert inputs.items_before.h.shape[1] == 1  # w is new: its histories are padded to 1, not to the users'
    assert inputs.users_after.h.shape[1] == 4  # after the batch a has 4 items


def test_cold_start_input_is_a_deterministic_id_seed():
    store = RepresentationStore(16, 8)
    inputs = prepare_batch(store, batch(["new-user"], ["new-item"]), "cpu", CacheConfig(cold_start_input="id_seed"),
                           after=True)
    expected = id_seed_vectors(np.array(["new-user"], dtype=object), Kind.USER, 16)
    torch.testing.assert_close(inputs.users_before.h[0, -1], expected[0])  # an empty history: its own seed
    # after the batch the user's history holds the new item, which has no cached vector: the item's seed
    item_seed = id_seed_vectors(np.array(["new-item"], dtype=object), Kind.ITEM, 16)
    torch.testing.assert_close(inputs.users_after.h[0, -1], item_seed[0])
    zero = prepare_batch(RepresentationStore(16, 8), batch(["new-user"], ["new-item"]), "cpu",
                         CacheConfig(cold_start_input="zero"), after=True)
    assert zero.users_before.h.abs().sum() == 0 and zero.users_after.h.abs().sum() == 0


def test_an_entity_first_met_earlier_in_the_batch_enters_histories_as_its_id_seed():
    store = RepresentationStore(16, 8)
    inputs = prepare_batch(store, batch(["a", "b"], ["x", "x"]), "cpu")  # b's item x has a's event before it
    seed_a = id_seed_vectors(np.array(["a"], dtype=object), Kind.USER, 16)
    torch.testing.assert_close(inputs.items_before.h[1, -1], seed_a[0])  # a has no cached vector yet


def test_distinct_new_entities_get_distinct_first_vectors():
    store = RepresentationStore(16, 8)
    infer_batch(tiny_model(), store, batch(["a", "b"], ["x", "y"]))
    a, b = store.users.vectors.get(torch.from_numpy(store.users.ids.lookup(["a", "b"])))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("variant", ["q", "p"])
def test_gradients_flow_to_encoder_but_never_into_the_cache(variant):
    torch.manual_seed(0)
    model = FELRec(TINY, ModelConfig(variant=variant, queue_size=64)).train()
    store = RepresentationStore(16, 8)
    b = batch(["a", "b", "c", "a"], ["x", "y", "x", "z"])
    inputs = prepare_batch(store, b, "cpu")
    u, x = encode(model, inputs)
    loss = model.loss(u, x)
    loss.backward()
    commit_batch(store, inputs, u, x)
    assert model.encoder.fc.weight.grad is not None and model.encoder.fc.weight.grad.abs().sum() > 0
    assert not store.users.vectors.all().requires_grad


@pytest.mark.parametrize("cold_input, empty_history", [("id_seed", "cold_start"), ("zero", "cold_start"),
                                                       ("id_seed", "learned")])
def test_cold_vectors_are_what_a_new_users_first_event_is_encoded_with(cold_input, empty_history):
    """cold_vectors (the query API's unknown users) = the no-history encoding prepare_batch + encode
    give a user's first event (what the evaluator scores it with), and the store is untouched."""
    torch.manual_seed(0)
    model = FELRec(EncoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0,
                                 empty_history=empty_history), ModelConfig(queue_size=64)).eval()
    cache = CacheConfig(cold_start_input=cold_input)
    store = RepresentationStore(16, 8)
    infer_batch(model, store, batch(["a", "b"], ["x", "y"]), cache)  # a store with other entities
    sizes = (len(store.users), len(store.items))
    cold = cold_vectors(model, Kind.USER, ["new-1", "new-2"], cache)
    assert (len(store.users), len(store.items)) == sizes
    for n, user in enumerate(["new-1", "new-2"]):
        with torch.no_grad():
            inputs = prepare_batch(RepresentationStore(16, 8), batch([user], ["x"]), "cpu", cache)
            u, _ = encode(model, inputs)
        # one id (as the API asks) is bit-identical; several differ only by float reduction order
        torch.testing.assert_close(cold_vectors(model, Kind.USER, [user], cache)[0], u[0], rtol=0, atol=0)
        torch.testing.assert_close(cold[n], u[0], rtol=1e-5, atol=1e-6)
    # per-user vectors only from id seeds; a zero or learned input gives every new user the same one
    assert torch.allclose(cold[0], cold[1]) == (cold_input == "zero" or empty_history == "learned")
