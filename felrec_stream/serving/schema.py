"""Response shapes of the query API that the server (`serving.app`) and the client share.

Plain frozen dataclasses with no dependencies, so `serving.client` needs neither FastAPI, pydantic
nor torch; FastAPI validates and documents a stdlib dataclass as a response model directly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scored:
    """One result: an entity id and its score: the served score for recommendations (cosine +
    popularity prior, see `serving.ranking`), the cosine similarity in [-1, 1] for similar entities."""

    id: str
    score: float


@dataclass(frozen=True)
class Recommendations:
    """GET /v1/users/{id}/recommendations: the ranked items; `cold_start` is True when the user was
    unknown and ranked with the encoding of an empty history (only where the model is in-process)."""

    results: list[Scored]
    cold_start: bool = False
    snapshot_seq: int | None = None


@dataclass(frozen=True)
class CatalogInfo:
    """GET /v1/catalog: store sizes and layout, and the snapshot the data came from (None: live)."""

    users: int
    items: int
    dim: int
    history_len: int
    index_type: str
    snapshot_seq: int | None
    snapshot_created_at: str | None
    popularity_weight: float = 0.0  # score = cosine + popularity_weight * log(1 + popularity)
    popularity_halflife: float = 0.0  # in events; 0 = plain interaction counts
    exclude_recent: bool = True  # recommendations leave out the user's last-history_len items by default
