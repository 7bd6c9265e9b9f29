"""Ranking metrics of the online evaluation protocol (pure torch, any device).

- `normalized_rank`: position of the true item among *all* catalog items, scaled to [0, 1]
  (0 best, 1 worst); ties count half, so a model that scores everything equally gets 0.5.
- `sampled_hit_rate`: HR@k against `num_negatives` items sampled without replacement (the paper's
  HR@10 against 100 negatives), ties half as well.
- `nearest_neighbour_scores`: the paper's NN variant, which averages the item scores of the user's
  n nearest users instead of using the user's own vector.

NaN scores are rejected (`NaNScoresError`, a ValueError): NaN compares false with everything, so
a diverged model would otherwise get a negative rank and HR@k 1.0 (every comparison a "win").

Everything is memory-bounded: rows are processed in chunks so that B x C (or B x U) temporaries
stay around `MAX_CHUNK_ELEMENTS` elements, whatever the catalog size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from felrec_stream.errors import ModelError

MAX_CHUNK_ELEMENTS = 1 << 22  # ~16 MiB of float32 per temporary


class NaNScoresError(ModelError, ValueError):
    """Scores hold NaN (a diverged model); a FelrecError, so a harness marks the row failed."""


def _reject_nan(scores: torch.Tensor, metric: str) -> None:
    bad_rows = int(torch.isnan(scores).any(dim=1).sum()) if scores.numel() else 0
    if bad_rows:
        raise NaNScoresError(f"{metric}: {bad_rows} of {scores.shape[0]} score rows contain NaN (the model "
                             f"diverged?); NaN compares false with every score, so the rank would come out "
                             f"negative and HR@k 1.0")


def _chunk_len(n_cols: int) -> int:
    return max(1, MAX_CHUNK_ELEMENTS // max(n_cols, 1))


def normalized_rank(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) float: (#items scoring higher than the true item + 0.5 * #other ties) / (C - 1).

    scores: (B, C) higher = better (NaN -> NaNScoresError); target: (B,) catalog index of the true
    item. 0 when C == 1.
    """
    B, C = scores.shape
    _reject_nan(scores, "normalized_rank")
    if C <= 1:
        return torch.zeros(B, device=scores.device)
    true = scores.gather(1, target.view(-1, 1).to(scores.device))  # (B, 1)
    higher = (scores > true).sum(dim=1).float()  # (B,)
    ties = (scores == true).sum(dim=1).float() - 1.0  # (B,) other items tied with the true one
    return (higher + 0.5 * ties) / (C - 1)


def sample_negatives(target: torch.Tensor, n_items: int, num_negatives: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N) catalog indices drawn uniformly without replacement from [0, n_items) minus each
    row's target; N = min(num_negatives, n_items - 1) (all other items when fewer)."""
    B, device = target.shape[0], target.device
    N = min(num_negatives, n_items - 1)
    if N <= 0:
        return torch.empty(B, 0, dtype=torch.long, device=device)
    out = torch.empty(B, N, dtype=torch.long, device=device)
    gen_device = generator.device if generator is not None else device
    step = _chunk_len(n_items)
    for start in range(0, B, step):
        rows = target[start:start + step]  # (b,)
        keys = torch.rand(len(rows), n_items, generator=generator, device=gen_device).to(device)  # (b, C)
        keys.scatter_(1, rows.view(-1, 1), float("inf"))  # the true item is never drawn
        out[start:start + len(rows)] = keys.topk(N, dim=1, largest=False, sorted=False).indices
    return out


def sampled_hit_rate(scores: torch.Tensor, target: torch.Tensor, num_negatives: int = 100, k: int = 10,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) bool: the true item ranks < k among itself and its sampled negatives (ties half).
    NaN scores -> NaNScoresError."""
    B, C = scores.shape
    _reject_nan(scores, "sampled_hit_rate")
    target = target.to(scores.device)
    negatives = sample_negatives(target, C, num_negatives, generator)  # (B, N)
    true = scores.gather(1, target.view(-1, 1))  # (B, 1)
    neg = scores.gather(1, negatives)  # (B, N)
    rank = (neg > true).sum(dim=1).float() + 0.5 * (neg == true).sum(dim=1).float()  # (B,)
    return rank < k


def cosine_scores(u: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """(B, C) cosine similarity of users u (B, D) and items (C, D); zero vectors score 0."""
    return F.normalize(u, dim=-1) @ F.normalize(items, dim=-1).T


def nearest_neighbour_scores(user_vecs: torch.Tensor, all_user_vecs: torch.Tensor, item_vecs: torch.Tensor,
                             n: int = 10, self_index: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C) mean of the item scores of each user's n nearest users (cosine), paper's NN variant.

    user_vecs: (B, D) the querying users; all_user_vecs: (U, D) every cached user; item_vecs: (C, D).
    self_index: (B,) row of each querying user in all_user_vecs (-1 = not there) so that a user is
    never its own neighbour. Zero rows (never-written users) are never neighbours. With fewer than n
    candidates the available ones are averaged; with none, the user's own scores are returned.
    """
    B, U = user_vecs.shape[0], all_user_vecs.shape[0]
    items = F.normalize(item_vecs, dim=-1)  # (C, D)
    neighbours = F.normalize(all_user_vecs, dim=-1)  # (U, D)
    own = cosine_scores(user_vecs, item_vecs)  # (B, C)
    m = min(n, U)
    if m == 0:
        return own
    valid = all_user_vecs.norm(dim=-1) > 0  # (U,)
    out = torch.empty_like(own)
    step = _chunk_len(max(U, m * items.shape[0]))
    for start in range(0, B, step):
        stop = min(start + step, B)
        sims = F.normalize(user_vecs[start:stop], dim=-1) @ neighbours.T  # (b, U)
        sims = sims.masked_fill(~valid, float("-inf"))
        if self_index is not None:
            rows = self_index[start:stop].to(sims.device)
            present = torch.nonzero(rows >= 0).flatten()
            sims[present, rows[present]] = float("-inf")
        top = sims.topk(m, dim=1)  # (b, m)
        usable = torch.isfinite(top.values).float()  # (b, m)
        nn_scores = (neighbours[top.indices] @ items.T) * usable.unsqueeze(-1)  # (b, m, C)
        count = usable.sum(dim=1, keepdim=True)  # (b, 1)
        mean = nn_scores.sum(dim=1) / count.clamp(min=1.0)  # (b, C)
        out[start:stop] = torch.where(count > 0, mean, own[start:stop])
    return out
