"""FELRec training objectives as small pure functions (paper section 3.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float,
             total: int | None = None, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE of MoCo: q (B, C) and its positive k (B, C) against the negatives in queue (K, C).

    All inputs are L2-normalised; k and queue carry no gradient (stop-gradient on the other branch).
    exclude: (B, K) True where a queued key is no negative of the row (e.g. the row's own entity).
    Mean over the B rows; with `total`, the sum over them / total (a slice's share of a larger batch).
    """
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # (B, 1)
    l_neg = torch.einsum("nc,kc->nk", q, queue)  # (B, K)
    # In place where autograd allows it (the einsum's and cat's backward do not read their outputs):
    # the same values as out-of-place, without two more (B, K) temporaries (32 MB each at paper size).
    if exclude is not None:
        l_neg.masked_fill_(exclude, float("-inf"))
    logits = torch.cat([l_pos, l_neg], dim=1).div_(T)  # (B, 1 + K)
    del l_neg
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # the positive is column 0
    if total is None:
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits, labels, reduction="sum") / total


def info_nce_chance(K: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """The InfoNCE of a model that cannot tell the positive from its negatives (all logits equal):
    the mean over rows of ln(1 + negatives left), exclude (B, K) as in `info_nce`."""
    if exclude is None:
        return torch.tensor(math.log(1 + K))
    if exclude.shape[0] == 0:  # no rows (a data-parallel rank's empty slice): nothing to average
        return torch.zeros(())
    return torch.log1p((K - exclude.sum(dim=1)).double()).mean().float()


def byol_loss(p: torch.Tensor, z: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """BYOL's 2 - 2 cos(p, z), averaged over the batch (with `total`: summed / total); z carries no gradient."""
    p = F.normalize(p, dim=-1)
    z = F.normalize(z, dim=-1)
    per_row = 2 - 2 * (p * z).sum(dim=-1)  # (B,)
    return per_row.mean() if total is None else per_row.sum() / total


def representation_spread(v: torch.Tensor) -> torch.Tensor:
    """1 - |mean of the L2-normalised rows|: 0 when all vectors point the same way (collapse),
    close to 1 for vectors spread over the sphere. Zero rows (never-written entries) are ignored."""
    v = v[v.norm(dim=-1) > 0]
    if v.shape[0] < 2:
        return torch.zeros((), device=v.device)
    return 1 - F.normalize(v, dim=-1).mean(dim=0).norm()
