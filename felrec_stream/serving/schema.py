"""Response shapes of the query API that the server (`serving.app`) and the client share.

Plain frozen dataclasses with no dependencies, so `serving.client` needs neither FastAPI, pydantic
nor torch; FastAPI validates and documents a stdlib dataclass as a response model directly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scored:
    """One result: an entity id and its cosine similarity to the query, in [-1, 1]."""

    id: str
    score: float


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
