import numpy as np
import pytest
import torch

from felrec_stream.errors import FelrecError
from felrec_stream.model import metrics
from felrec_stream.model.metrics import (NaNScoresError, cosine_scores, nearest_neighbour_scores, normalized_rank,
                                         sample_negatives, sampled_hit_rate)


def _brute_rank(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    out = []
    for row, t in zip(scores, target):
        C = len(row)
        if C == 1:
            out.append(0.0)
            continue
        higher = sum(1 for j in range(C) if row[j] > row[t])
        ties = sum(1 for j in range(C) if j != t and row[j] == row[t])
        out.append((higher + 0.5 * ties) / (C - 1))
    return np.array(out)


@pytest.mark.parametrize("C", [1, 2, 3, 7, 40])
def test_normalized_rank_matches_brute_force_with_ties(C):
    rng = np.random.default_rng(C)
    scores = rng.integers(0, 4, size=(25, C)).astype(np.float32)  # few values: many ties
    target = rng.integers(0, C, size=25)
    got = normalized_rank(torch.from_numpy(scores), torch.from_numpy(target)).numpy()
    np.testing.assert_allclose(got, _brute_rank(scores, target), atol=1e-6)


def test_normalized_rank_orientation_is_never_flipped():
    scores = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    ranks = normalized_rank(scores, torch.tensor([0, 2, 1]))
    assert ranks.tolist() == [0.0, 1.0, 0.5]  # best, worst, all tied -> 0.5


@pytest.mark.parametrize("where", ["target", "other", "all"])
def test_nan_scores_are_rejected_not_ranked(where):
    """Unchecked, a NaN true score gives higher=0 and ties=-1: rank -0.5/(C-1) and a hit on every event."""
    scores = torch.tensor([[0.3, 0.2, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]])
    target = torch.tensor([2, 0])
    if where == "target":
        scores[1, 0] = float("nan")
    elif where == "other":
        scores[0, 3] = float("nan")
    else:
        scores[:] = float("nan")
    with pytest.raises(ValueError, match=r"normalized_rank: \d of 2 score rows contain NaN"):
        normalized_rank(scores, target)
    with pytest.raises(NaNScoresError, match="sampled_hit_rate"):
        sampled_hit_rate(scores, target, num_negatives=2, k=1, generator=torch.Generator().manual_seed(0))
    assert issubclass(NaNScoresError, FelrecError)  # a harness marks the row failed instead of crashing


def test_infinite_scores_are_still_ranked():
    scores = torch.tensor([[float("-inf"), 1.0, float("-inf")], [float("inf"), 0.0, 1.0]])
    assert normalized_rank(scores, torch.tensor([0, 0])).tolist() == [0.75, 0.0]
    assert sampled_hit_rate(scores, torch.tensor([0, 0]), num_negatives=2, k=1).tolist() == [False, True]
    assert normalized_rank(torch.empty(0, 3), torch.empty(0, dtype=torch.long)).shape == (0,)


def _brute_hits(scores: np.ndarray, target: np.ndarray, negatives: np.ndarray, k: int) -> np.ndarray:
    hits = []
    for row, t, neg in zip(scores, target, negatives):
        rank = sum(1.0 if row[j] > row[t] else 0.5 if row[j] == row[t] else 0.0 for j in neg)
        hits.append(rank < k)
    return np.array(hits)


def test_sampled_hit_rate_uses_all_items_when_catalog_is_small():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(30, 12)).astype(np.float32)
    target = rng.integers(0, 12, size=30)
    others = np.array([[j for j in range(12) if j != t] for t in target])
    got = sampled_hit_rate(torch.from_numpy(scores), torch.from_numpy(target), num_negatives=100, k=3)
    np.testing.assert_array_equal(got.numpy(), _brute_hits(scores, target, others, 3))


def test_sampled_hit_rate_matches_brute_force_on_its_negatives():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, size=(20, 50)).astype(np.float32)
    target = rng.integers(0, 50, size=20)
    negs = sample_negatives(torch.from_numpy(target), 50, 10, torch.Generator().manual_seed(5)).numpy()
    got = sampled_hit_rate(torch.from_numpy(scores), torch.from_numpy(target), 10, 4, torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(got.numpy(), _brute_hits(scores, target, negs, 4))


def test_negatives_are_distinct_exclude_the_target_and_are_uniform(monkeypatch):
    monkeypatch.setattr(metrics, "MAX_CHUNK_ELEMENTS", 16)  # many row chunks
    target = torch.randint(0, 6, (4000,), generator=torch.Generator().manual_seed(0))
    negs = sample_negatives(target, 6, 3, torch.Generator().manual_seed(1))
    assert negs.shape == (4000, 3)
    assert (negs != target[:, None]).all()
    assert (negs.sort(dim=1).values.diff(dim=1) > 0).all()  # without replacement
    share = torch.bincount(negs[target == 0].flatten(), minlength=6)[1:].float()
    assert (share / share.sum() - 0.2).abs().max() < 0.03  # uniform over the 5 other items


def test_sampled_hit_rate_is_memory_bounded_on_a_large_catalog(monkeypatch):
    calls = []
    real_rand = torch.rand

    def spy(*size, **kwargs):
        calls.append(size)
        return real_rand(*size, **kwargs)

    monkeypatch.setattr(torch, "rand", spy)
    scores = torch.randn(200, 100_000)
    sampled_hit_rate(scores, torch.zeros(200, dtype=torch.long), 100, 10)
    assert all(s[0] * s[1] <= metrics.MAX_CHUNK_ELEMENTS for s in calls) and len(calls) > 1


def _brute_nn(u, all_u, items, n, self_index):
    def cos(a, b):
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))

    out = np.zeros((len(u), len(items)))
    for b in range(len(u)):
        cands = [(cos(u[b], all_u[j]), j) for j in range(len(all_u))
                 if j != self_index[b] and np.linalg.norm(all_u[j]) > 0]
        chosen = [j for _, j in sorted(cands, reverse=True)[:n]]
        if not chosen:
            out[b] = [cos(u[b], it) for it in items]
        else:
            out[b] = np.mean([[cos(all_u[j], it) for it in items] for j in chosen], axis=0)
    return out


@pytest.mark.parametrize("n", [1, 3, 50])
def test_nearest_neighbour_scores_match_brute_force(n):
    rng = np.random.default_rng(n)
    all_u = rng.normal(size=(12, 5)).astype(np.float32)
    all_u[4] = 0.0  # never written: never a neighbour
    items = rng.normal(size=(9, 5)).astype(np.float32)
    items[2] = 0.0
    self_index = np.array([0, 3, -1, 11])
    u = all_u[np.maximum(self_index, 0)] + 0.01 * rng.normal(size=(4, 5)).astype(np.float32)
    got = nearest_neighbour_scores(torch.from_numpy(u), torch.from_numpy(all_u), torch.from_numpy(items), n,
                                   self_index=torch.from_numpy(self_index))
    np.testing.assert_allclose(got.numpy(), _brute_nn(u, all_u, items, n, self_index), atol=1e-5)


def test_nearest_neighbours_fall_back_to_own_scores_without_candidates():
    u = torch.tensor([[1.0, 0.0]])
    all_u = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # only the user itself and a zero row
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    got = nearest_neighbour_scores(u, all_u, items, 10, self_index=torch.tensor([0]))
    torch.testing.assert_close(got, cosine_scores(u, items))
    assert got.tolist() == [[1.0, 0.0, 0.0]]  # zero item vector scores 0
