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


def normalized_rank(scores: torch.Tensor, target: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) float: (#items scoring higher than the true item + 0.5 * #other ties) / (C - 1).

    scores: (B, C) higher = better (NaN -> NaNScoresError); target: (B,) catalog index of the true
    item; sizes: (B,) catalog size of each row (only columns < size count; default C). 0 when C == 1.
    """
    B, C = scores.shape
    valid = _valid_columns(B, C, sizes, scores.device)  # (B, C)
    _reject_nan(scores.masked_fill(~valid, 0.0), "normalized_rank")
    n = valid.sum(dim=1).float()  # (B,)
    true = scores.gather(1, target.view(-1, 1).to(scores.device))  # (B, 1)
    higher = ((scores > true) & valid).sum(dim=1).float()  # (B,)
    ties = ((scores == true) & valid).sum(dim=1).float() - 1.0  # (B,) other items tied with the true one
    return torch.where(n > 1, (higher + 0.5 * ties) / (n - 1).clamp(min=1.0), torch.zeros_like(n))


def _valid_columns(B: int, C: int, sizes: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if sizes is None:
        return torch.ones(B, C, dtype=torch.bool, device=device)
    return torch.arange(C, device=device)[None, :] < sizes.to(device).view(-1, 1)


def sample_negatives(target: torch.Tensor, n_items: int, num_negatives: int,
                     generator: torch.Generator | None = None, sizes: torch.Tensor | None = None,
                     excluded: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) catalog indices drawn uniformly without replacement from [0, size) minus each row's
    target (size = sizes[row], default n_items) and minus `excluded` (B, L) indices (-1 = none);
    N = min(num_negatives, n_items - 1). A row with fewer candidates than N gets -1 in its surplus
    places. The random keys do not depend on `excluded`: excluding items only drops candidates."""
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
        if sizes is not None:
            keys.masked_fill_(~_valid_columns(len(rows), n_items, sizes[start:start + step], device), float("inf"))
        keys.scatter_(1, rows.view(-1, 1), float("inf"))  # the true item is never drawn
        if excluded is not None:  # padding (-1) points at the target, which is out already
            chunk = excluded[start:start + step].to(device)
            keys.scatter_(1, torch.where(chunk >= 0, chunk, rows.view(-1, 1)), float("inf"))
        top = keys.topk(N, dim=1, largest=False, sorted=False)
        out[start:start + len(rows)] = top.indices.masked_fill(torch.isinf(top.values), -1)
    return out


def sampled_hit_rate(scores: torch.Tensor, target: torch.Tensor, num_negatives: int = 100, k: int = 10,
                     generator: torch.Generator | None = None, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) bool: the true item ranks < k among itself and its sampled negatives (ties half);
    negatives come from each row's catalog prefix (sizes, as in `normalized_rank`).
    NaN scores -> NaNScoresError."""
    B, C = scores.shape
    negatives = sample_negatives(target.to(scores.device), C, num_negatives, generator, sizes)  # (B, N)
    return hit_rate_against(scores, target, negatives, k)


def hit_rate_against(scores: torch.Tensor, target: torch.Tensor, negatives: torch.Tensor, k: int = 10) -> torch.Tensor:
    """(B,) bool: the true item ranks < k among itself and the given negatives (B, N) (-1 = none;
    ties half). NaN scores of the compared items -> NaNScoresError."""
    target = target.to(scores.device)
    used = negatives >= 0
    true = scores.gather(1, target.view(-1, 1))  # (B, 1)
    neg = scores.gather(1, negatives.clamp(min=0))  # (B, N)
    _reject_nan(torch.cat([true, neg.masked_fill(~used, 0.0)], dim=1), "sampled_hit_rate")
    rank = ((neg > true) & used).sum(dim=1).float() + 0.5 * ((neg == true) & used).sum(dim=1).float()  # (B,)
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
    queries = nearest_neighbour_queries(user_vecs, all_user_vecs, n, self_index)  # (B, D)
    return queries @ F.normalize(item_vecs, dim=-1).T


def nearest_neighbour_queries(user_vecs: torch.Tensor, all_user_vecs: torch.Tensor, n: int = 10,
                              self_index: torch.Tensor | None = None) -> torch.Tensor:
    """(B, D) the mean of the unit vectors of each user's n nearest users (arguments as in
    `nearest_neighbour_scores`): the mean of cosines with an item equals this vector's dot product
    with the item's unit vector. A user without candidates gets its own unit vector."""
    B, U = user_vecs.shape[0], all_user_vecs.shape[0]
    own = F.normalize(user_vecs, dim=-1)  # (B, D)
    m = min(n, U)
    if m == 0:
        return own
    neighbours = F.normalize(all_user_vecs, dim=-1)  # (U, D)
    valid = all_user_vecs.norm(dim=-1) > 0  # (U,)
    out = torch.empty_like(own)
    step = _chunk_len(U)
    for start in range(0, B, step):
        stop = min(start + step, B)
        sims = own[start:stop] @ neighbours.T  # (b, U)
        sims = sims.masked_fill(~valid, float("-inf"))
        if self_index is not None:
            rows = self_index[start:stop].to(sims.device)
            present = torch.nonzero(rows >= 0).flatten()
            sims[present, rows[present]] = float("-inf")
        top = sims.topk(m, dim=1)  # (b, m)
        usable = torch.isfinite(top.values).float().unsqueeze(-1)  # (b, m, 1)
        count = usable.sum(dim=1)  # (b, 1)
        mean = (neighbours[top.indices] * usable).sum(dim=1) / count.clamp(min=1.0)  # (b, D)
        out[start:stop] = torch.where(count > 0, mean, own[start:stop])
    return out
