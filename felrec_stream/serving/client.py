"""Typed HTTP client of the query API (`felrec_stream.serving.app`), for downstream services and tests.

Deliberately light: httpx, the error classes and `serving.schema` only (no FastAPI/torch/faiss),
so a downstream service can depend on it without the model stack. Ids are percent-encoded (the
API accepts '/' inside ids). HTTP errors become exceptions carrying the server's message:
404 -> `NotFoundError`, 422 -> `InvalidRequestError`, 503 -> `ServiceUnavailableError`, anything
else -> `ClientError`.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence
from urllib.parse import quote

import httpx

from felrec_stream.errors import ServiceError
from felrec_stream.serving.schema import CatalogInfo, Recommendations, Scored


class ClientError(ServiceError):
    """The query API answered with an error status (or could not be reached)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class NotFoundError(ClientError):
    """404: an unknown user/item id."""


class InvalidRequestError(ClientError):
    """422: a parameter outside the API's limits (k, kind); 413: too many ids or too large a body."""


class ServiceUnavailableError(ClientError):
    """503: the service has no store loaded yet."""


_ERRORS: dict[int, type[ClientError]] = {404: NotFoundError, 413: InvalidRequestError, 422: InvalidRequestError,
                                         503: ServiceUnavailableError}


class FelrecClient:
    """One keep-alive connection pool to a query API at `base_url` (e.g. http://127.0.0.1:8080)."""

    def __init__(self, base_url: str, timeout: float = 10.0, transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, transport=transport)

    def recommendations(self, user_id: str, k: int = 10, exclude_recent: bool | None = None) -> list[Scored]:
        """Top-k items for `user_id` by the served score; `exclude_recent` leaves out items in its
        history (None: the server's `scoring.exclude_recent`)."""
        return self.recommend(user_id, k, exclude_recent).results

    def recommend(self, user_id: str, k: int = 10, exclude_recent: bool | None = None) -> Recommendations:
        """`recommendations` with the answer's flags (`cold_start`: the user was unknown to the store)."""
        params: dict[str, Any] = {"k": k}
        if exclude_recent is not None:
            params["exclude_recent"] = str(exclude_recent).lower()
        body = self._get(f"/v1/users/{_seg(user_id)}/recommendations", params)
        return Recommendations(_scored(body), bool(body.get("cold_start", False)), body.get("snapshot_seq"))

    def similar_items(self, item_id: str, k: int = 10) -> list[Scored]:
        return _scored(self._get(f"/v1/items/{_seg(item_id)}/similar", {"k": k}))

    def similar_users(self, user_id: str, k: int = 10) -> list[Scored]:
        return _scored(self._get(f"/v1/users/{_seg(user_id)}/similar", {"k": k}))

    def vectors(self, kind: Literal["user", "item"], ids: Sequence[str]) -> dict[str, list[float]]:
        """Raw representation vectors by id (every id must exist, else NotFoundError)."""
        return self._request("POST", "/v1/vectors", json={"kind": kind, "ids": list(ids)})["vectors"]

    def catalog(self) -> CatalogInfo:
        return CatalogInfo(**self._get("/v1/catalog"))

    def healthz(self) -> bool:
        return self._get("/healthz").get("status") == "ok"

    def readyz(self) -> bool:
        """True when the service has a store loaded (503 -> False, not an exception)."""
        try:
            return self._get("/readyz").get("status") == "ready"
        except ServiceUnavailableError:
            return False

    def metrics(self) -> str:
        """Prometheus text exposition."""
        return self._send("GET", "/metrics").text

    def openapi(self) -> dict[str, Any]:
        return self._get("/openapi.json")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "FelrecClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self._request("GET", path, params=params)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise _ERRORS.get(response.status_code, ClientError)(
                f"{method} {path} -> {response.status_code}: {_detail(response)}", response.status_code)
        return response


def _seg(external_id: str) -> str:
    """One path segment: every reserved character (including '/') percent-encoded."""
    return quote(external_id, safe="")


def _scored(body: dict[str, Any]) -> list[Scored]:
    return [Scored(r["id"], float(r["score"])) for r in body["results"]]


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        return response.text[:500]
    if isinstance(detail, list):  # FastAPI validation errors: [{"loc": [...], "msg": ...}, ...]
        return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    return str(detail)
