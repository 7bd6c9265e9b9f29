"""The evaluator's in-batch helpers: chunked scoring equals the one-pass expression, bit for bit."""

import numpy as np
import torch
import torch.nn.functional as F

from training.in_batch import set_visible_scores, visible_updates


def test_set_visible_scores_in_chunks_is_bit_identical_to_one_pass():
    rng = np.random.default_rng(0)
    B, C, D = 97, 41, 128
    keys = rng.integers(0, 30, B)  # repeated items inside the batch
    columns = torch.from_numpy(rng.integers(0, C, B))
    Q, W = torch.randn(B, D), torch.randn(B, D) * 3
    for inclusive in (False, True):
        i, j = (torch.from_numpy(a) for a in visible_updates(keys, inclusive))
        assert len(i) > 100  # several chunks below
        expected = torch.randn(B, C)
        chunked = expected.clone()
        expected[i, columns[j]] = (Q[i] * F.normalize(W[j], dim=-1)).sum(-1)  # the former one-pass form
        for chunk in (1, 7, 64, len(i)):
            set_visible_scores(chunked, Q, W, i, j, columns, chunk=chunk)
            assert torch.equal(chunked, expected)
