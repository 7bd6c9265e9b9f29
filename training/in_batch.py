"""What each event of a batch sees and leaves, exact per event: the online evaluator's in-batch rules.

The engine (felrec_stream/state/engine.py) writes one vector per entity per batch; the evaluator
(`training/felrec_online.py`) also needs, for every event, the vector the store held for an entity
just before (or, under protocol "paper", just after) that event. These helpers give it that without
replaying the batch event by event. Evaluator-only: nothing that serves uses them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from felrec_stream.state.engine import BatchInputs

# Pairs per chunk in `set_visible_scores`: its (P, D) temporaries stay at 8 MB each (D = 128)
# instead of ~130 MB for the ~250k pairs of a paper-size batch (1,024 events x distinct items).
PAIR_CHUNK = 16384


def previous_same(keys: np.ndarray) -> np.ndarray:
    """(B,) position of the previous event with the same key in the batch, -1 for none."""
    order = np.argsort(keys, kind="stable")
    prev = np.full(len(keys), -1, dtype=np.int64)
    same = keys[order][1:] == keys[order][:-1]
    prev[order[1:][same]] = order[:-1][same]
    return prev


def next_same(keys: np.ndarray) -> np.ndarray:
    """(B,) position of the next event with the same key in the batch, B for none."""
    order = np.argsort(keys, kind="stable")
    nxt = np.full(len(keys), len(keys), dtype=np.int64)
    same = keys[order][1:] == keys[order][:-1]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


def visible_updates(keys: np.ndarray, inclusive: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) where event j is the latest event of its entity strictly before event i
    (inclusive: at or before it). Event i must see what event j wrote, and nothing later."""
    B = len(keys)
    i, j = np.arange(B)[:, None], np.arange(B)[None, :]
    nxt = next_same(keys)[None, :]
    visible = (j <= i) & (nxt > i) if inclusive else (j < i) & (nxt >= i)
    rows, cols = np.nonzero(visible)
    return rows, cols


def set_visible_scores(similarity: torch.Tensor, Q: torch.Tensor, W: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
                       columns: torch.Tensor, chunk: int = PAIR_CHUNK) -> None:
    """similarity[i, columns[j]] = <Q[i], W[j] / |W[j]|> for every pair (i, j) of `visible_updates`, in
    chunks of `chunk` pairs. The same expression per pair as one vectorised pass (rows are reduced
    independently: bit-identical), without its three (P, D) temporaries for P ~ B x distinct items."""
    for first in range(0, len(i), chunk):
        a, b = i[first:first + chunk], j[first:first + chunk]
        similarity[a, columns[b]] = (Q[a] * F.normalize(W[b], dim=-1)).sum(-1)


def written_vectors(inputs: BatchInputs, u: torch.Tensor, x: torch.Tensor,
                    after: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D) each: the vector each event leaves in the store for its user and its item.

    pre_event (after is None): the event's own encodings u, x. post_event: the encoding of the
    history including the event, which is the "before" encoding of the entity's next event in the
    batch (same elements, same pre-batch vectors) or, for its last event, the post-batch encoding."""
    if after is None:
        return u, x
    out = []
    for slots, plan, before, last_vectors in ((inputs.user_slots, inputs.user_plan, u, after[0]),
                                              (inputs.item_slots, inputs.item_plan, x, after[1])):
        nxt = torch.from_numpy(next_same(slots)).to(before.device)
        group = torch.from_numpy(np.searchsorted(plan.unique_slots, slots)).to(before.device)
        is_last = (nxt >= len(slots)).unsqueeze(1)
        out.append(torch.where(is_last, last_vectors[group], before[nxt.clamp(max=len(slots) - 1)]))
    return out[0], out[1]
