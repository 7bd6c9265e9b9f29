"""The losses' memory-saving forms compute what their plain forms computed, bit for bit."""

import torch
import torch.nn.functional as F

from felrec_stream.model.losses import info_nce


def _plain_info_nce(q, k, queue, T, total=None, exclude=None):
    """info_nce as it was written before its in-place steps (out-of-place masked_fill and division)."""
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,kc->nk", q, queue)
    if exclude is not None:
        l_neg = l_neg.masked_fill(exclude, float("-inf"))
    logits = torch.cat([l_pos, l_neg], dim=1) / T
    labels = torch.zeros(q.shape[0], dtype=torch.long)
    if total is None:
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits, labels, reduction="sum") / total


def test_info_nce_in_place_equals_plain_form_with_its_gradient():
    torch.manual_seed(0)
    B, K, C = 37, 300, 16
    base = torch.randn(B, C)
    k, queue = F.normalize(torch.randn(B, C), dim=1), F.normalize(torch.randn(K, C), dim=1)
    exclude = torch.rand(B, K) < 0.2
    for kwargs in ({}, {"exclude": exclude}, {"exclude": exclude, "total": 100}):
        results = []
        for loss_fn in (info_nce, _plain_info_nce):
            q = base.clone().requires_grad_()
            loss = loss_fn(F.normalize(q, dim=1), k, queue, 0.07, **kwargs)
            loss.backward()
            results.append((loss.detach(), q.grad))
        assert torch.equal(results[0][0], results[1][0])
        assert torch.equal(results[0][1], results[1][1])
