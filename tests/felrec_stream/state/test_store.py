"""The representation store: id maps, growth, history in-batch rule, latest-write-wins."""

import numpy as np
import pytest
import torch

from felrec_stream.errors import StoreError
from felrec_stream.state.store import HistoryBuffer, IdMap, Kind, RepresentationStore, TensorVectors, last_occurrence


def brute_force_histories(slots, others, L, stored=None):
    """Per-event history by a plain Python loop: every earlier interaction, at most the last L."""
    past = {s: list(v) for s, v in (stored or {}).items()}
    out = []
    for s, o in zip(slots, others):
        hist = past.get(s, [])[-L:]
        out.append([-1] * (L - len(hist)) + hist)
        past.setdefault(s, []).append(o)
    return np.array(out), past


def test_id_map_assigns_slots_in_order_of_first_appearance():
    ids = IdMap()
    assert ids.lookup(["b", "a", "b"], create=True).tolist() == [0, 1, 0]
    assert ids.lookup(["a", "zz"]).tolist() == [1, -1]
    assert ids.external(np.array([1, 0])).tolist() == ["a", "b"]
    assert len(ids) == 2 and "zz" not in ids


@pytest.mark.parametrize("L", [1, 3, 8])
def test_history_plan_matches_brute_force_over_many_batches(L):
    rng = np.random.default_rng(L)
    buf = HistoryBuffer(L, capacity=2)
    slots_all = rng.integers(0, 7, 200)
    others_all = rng.integers(0, 50, 200)
    expected, _ = brute_force_histories(slots_all, others_all, L)
    got = []
    for start in range(0, 200, 13):
        s, o = slots_all[start:start + 13], others_all[start:start + 13]
        buf.ensure(int(s.max()) + 1)
        plan = buf.plan(s, o)
        got.append(plan.event_history)
        lengths = (plan.event_history >= 0).sum(1)
        assert plan.event_length.tolist() == lengths.tolist()
        buf.apply(plan)
    np.testing.assert_array_equal(np.concatenate(got), expected)
    assert buf.counts[:7].tolist() == np.bincount(slots_all, minlength=7).tolist()


def test_history_never_contains_the_event_itself():
    buf = HistoryBuffer(4)
    buf.ensure(1)
    plan = buf.plan(np.array([0]), np.array([42]))
    assert (plan.event_history == -1).all() and plan.event_length.tolist() == [0]


def test_last_occurrence_is_the_latest_event_per_slot():
    unique, last = last_occurrence(np.array([3, 1, 3, 2, 1, 3]))
    assert dict(zip(unique.tolist(), last.tolist())) == {1: 4, 2: 3, 3: 5}


def test_tensor_vectors_grow_and_read_missing_as_zero():
    v = TensorVectors(3, capacity=1)
    v.ensure(5, np.array(list("abcde"), dtype=object))
    v.put(torch.tensor([4]), torch.ones(1, 3))
    got = v.get(torch.tensor([[4, -1], [0, 4]]))
    assert got.shape == (2, 2, 3)
    assert got[0, 0].tolist() == [1, 1, 1] and got[0, 1].abs().sum() == 0 and got[1, 0].abs().sum() == 0
    v.reset()
    assert v.all().abs().sum() == 0 and v.all().shape == (5, 3)


def test_store_state_round_trip_and_shape_check():
    store = RepresentationStore(dim=4, history_len=3)
    slots = store.users.slots(np.array(["u1", "u2"], dtype=object))
    store.users.vectors.put(torch.from_numpy(slots), torch.randn(2, 4))
    plan = store.users.history.plan(slots, np.array([0, 1]))
    store.users.history.apply(plan, np.array([10, 11]))
    clone = RepresentationStore(dim=4, history_len=3)
    clone.load_state_dict(store.state_dict())
    assert clone.users.ids.ids() == ["u1", "u2"]
    torch.testing.assert_close(clone.users.vectors.all(), store.users.vectors.all())
    np.testing.assert_array_equal(clone.users.history.rows[:2], store.users.history.rows[:2])
    with pytest.raises(StoreError):
        RepresentationStore(dim=5, history_len=3).load_state_dict(store.state_dict())


def test_kind_other():
    assert Kind.USER.other is Kind.ITEM and Kind.ITEM.other is Kind.USER
