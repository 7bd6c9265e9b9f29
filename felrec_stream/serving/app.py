"""The HTTP layer of the query service: FastAPI routes, error mapping, limits, Prometheus, servers.

- `create_app(engine_provider)` is the FastAPI app over a `serving.query.QueryEngine`. The
  provider is called once per request, so the standalone server can swap in a new engine (a newer
  snapshot, `serving.snapshots.SnapshotFollower`) by reassigning one reference: a request in
  flight keeps the engine it started with, nothing is ever half-swapped.
- `serve_in_thread` runs uvicorn in a daemon thread (`consume --serve`, tests);
  `run_server` runs it in the main thread (the `serve` command, so SIGTERM stops it cleanly).

Limits (untrusted clients): request bodies above `MAX_BODY_BYTES` and more than `MAX_IDS` ids get
413; ids the topic would reject (empty, control characters, over 256 characters) get 422; error
messages quote at most `MAX_ECHO_CHARS` characters of any id and never echo a body; a connection
that does not send a whole request head within `HEADER_TIMEOUT_S` is closed. HEAD is answered on
every GET route.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Callable, Iterable, Literal

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from pydantic import BaseModel, Field
from uvicorn.protocols.http.h11_impl import H11Protocol

from felrec_stream import __version__
from felrec_stream.errors import ServiceError, StoreError
from felrec_stream.log import get_logger
from felrec_stream.serving.query import (MAX_IDS, MAX_K, FreshnessTracker, InvalidRequest, NotFound, QueryEngine,
                                         TooLarge)
from felrec_stream.serving.schema import CatalogInfo, Scored
from felrec_stream.state.store import Kind

log = get_logger(__name__)

MAX_BODY_BYTES = 1 << 20  # 1000 ids of 256 characters fit several times over
HEADER_TIMEOUT_S = 5.0  # a connection must send a whole request head within this (idle or slow clients)
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class NotReady(ServiceError):
    """No store is loaded yet (HTTP 503)."""


# ---- HTTP API --------------------------------------------------------------------------------

class ScoredOut(BaseModel):
    id: str
    score: float = Field(description="recommendations: cosine + popularity_weight * log(1 + popularity) "
                                     "(see /v1/catalog); similar: cosine similarity in [-1, 1]")


class ResultsOut(BaseModel):
    query_id: str
    kind: Literal["user", "item"] = Field(description="kind of the returned entities")
    k: int
    results: list[ScoredOut]
    snapshot_seq: int | None = None
    cold_start: bool = Field(False, description="recommendations for an unknown user, from the encoding of an "
                                                "empty history (only where the model runs in-process)")


class VectorsIn(BaseModel):
    kind: Kind
    ids: list[str] = Field(min_length=1, description=f"1..{MAX_IDS} ids (more: 413)")


class VectorsOut(BaseModel):
    kind: Kind
    dim: int
    vectors: dict[str, list[float]]


EngineProvider = Callable[[], "QueryEngine | None"]
KParam = Annotated[int, Query(ge=1, le=MAX_K, description=f"number of results, 1..{MAX_K}")]


def create_app(engine_provider: EngineProvider, title: str = "felrec-stream query API") -> FastAPI:
    """The query API; `engine_provider()` is read once per request (see module docstring)."""
    registry = CollectorRegistry()
    latency = Histogram("felrec_http_request_duration_seconds", "HTTP request latency by route template",
                        ["method", "route", "status"], registry=registry, buckets=LATENCY_BUCKETS)
    registry.register(_EngineCollector(engine_provider))
    app = FastAPI(title=title, version=__version__,
                  description="Top-k recommendations and similarities from FELRec representations.")
    app.add_middleware(_LatencyMiddleware, histogram=latency)
    app.add_middleware(_BodyLimitMiddleware, limit=MAX_BODY_BYTES)
    app.add_middleware(_HeadAsGetMiddleware)
    _add_error_handlers(app)
    _add_query_routes(app, engine_provider)
    _add_ops_routes(app, engine_provider, registry)
    return app


def _engine(provider: EngineProvider) -> QueryEngine:
    engine = provider()
    if engine is None:
        raise NotReady("no representation store loaded yet")
    return engine


def _results(engine: QueryEngine, query_id: str, kind: Kind, k: int, results: list[Scored],
             cold_start: bool = False) -> ResultsOut:
    return ResultsOut(query_id=query_id, kind=kind.value, k=k, snapshot_seq=engine.snapshot_seq,
                      results=[ScoredOut(id=r.id, score=r.score) for r in results], cold_start=cold_start)


def _add_query_routes(app: FastAPI, provider: EngineProvider) -> None:
    # {id:path}: ids may contain '/', sent percent-encoded by FelrecClient.
    @app.get("/v1/users/{user_id:path}/recommendations", response_model=ResultsOut, tags=["query"])
    def recommendations(user_id: str, k: KParam = 10, exclude_recent: bool | None = None) -> ResultsOut:
        """Top-k items for a user by the served score (cosine + popularity prior, as evaluated);
        `exclude_recent` drops items in its last-L history (default: the snapshot's
        scoring.exclude_recent, as evaluated). An unknown user is 404, or, where the
        model runs in-process (`consume --serve`), ranked from an empty history with cold_start=true."""
        engine = _engine(provider)
        answer = engine.recommend(user_id, k, exclude_recent)
        return _results(engine, user_id, Kind.ITEM, k, answer.results, answer.cold_start)

    @app.get("/v1/items/{item_id:path}/similar", response_model=ResultsOut, tags=["query"])
    def similar_items(item_id: str, k: KParam = 10) -> ResultsOut:
        """Items most similar to an item (itself excluded)."""
        engine = _engine(provider)
        return _results(engine, item_id, Kind.ITEM, k, engine.similar_items(item_id, k))

    @app.get("/v1/users/{user_id:path}/similar", response_model=ResultsOut, tags=["query"])
    def similar_users(user_id: str, k: KParam = 10) -> ResultsOut:
        """Users most similar to a user (itself excluded)."""
        engine = _engine(provider)
        return _results(engine, user_id, Kind.USER, k, engine.similar_users(user_id, k))

    @app.post("/v1/vectors", response_model=VectorsOut, tags=["query"])
    def vectors(body: VectorsIn) -> VectorsOut:
        """Raw representation vectors; 404 when any id is unknown."""
        engine = _engine(provider)
        return VectorsOut(kind=body.kind, dim=engine.store.dim, vectors=engine.vectors(body.kind, body.ids))

    @app.get("/v1/catalog", response_model=CatalogInfo, tags=["query"])
    def catalog() -> CatalogInfo:
        """Entity counts and the snapshot being served."""
        return _engine(provider).catalog()


def _add_ops_routes(app: FastAPI, provider: EngineProvider, registry: CollectorRegistry) -> None:
    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"description": "no store loaded yet"}})
    def readyz() -> Response:
        """Readiness: a store is loaded and queries can be answered."""
        engine = provider()
        if engine is None:
            return JSONResponse({"status": "not_ready"}, status_code=503)
        return JSONResponse({"status": "ready", "snapshot_seq": engine.snapshot_seq, **engine.sizes()})

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _add_error_handlers(app: FastAPI) -> None:
    # StoreError: the store cannot answer (e.g. a spill file damaged after its snapshot was verified):
    # 503 with the reason, never a 500
    for error, status in ((NotFound, 404), (InvalidRequest, 422), (NotReady, 503), (TooLarge, 413),
                          (StoreError, 503)):
        def handler(request: Request, exc: Exception, status: int = status) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status)
        app.add_exception_handler(error, handler)
    app.add_exception_handler(RequestValidationError, _validation_error)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 with where and what (FastAPI's default also echoes the offending input: not here)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [{"loc": list(e.get("loc", ()))[:5], "msg": str(e.get("msg", ""))[:200], "type": e.get("type")}
              for e in errors[:10]]
    return JSONResponse({"detail": detail}, status_code=422)


class _BodyLimitMiddleware:
    """Pure ASGI: bodies above `limit` bytes get 413 before the app parses anything.

    A declared Content-Length over the limit is refused unread; otherwise the body is read here
    (at most limit + one chunk) and handed to the app in one message.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._refuse(scope, send)
                return
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)

    async def _refuse(self, scope: dict, send: Any) -> None:
        response = JSONResponse({"detail": f"request body larger than {self.limit} bytes"}, status_code=413)
        await response(scope, _never, send)


def _replay(messages: list[dict], receive: Any) -> Any:
    async def replayed() -> dict:
        return messages.pop(0) if messages else await receive()
    return replayed


async def _never() -> dict:
    return {"type": "http.disconnect"}


class _HeadAsGetMiddleware:
    """Pure ASGI: HEAD runs as GET (HTTP requires HEAD wherever GET is served; FastAPI routes only
    what they declare), the same status and headers, no body."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: dict) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class _LatencyMiddleware:
    """Pure ASGI middleware: latency per route *template* (bounded label set), method and status."""

    def __init__(self, app: Any, histogram: Histogram) -> None:
        self.app, self.histogram = app, histogram

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # the router fills scope["route"]
            self.histogram.labels(scope["method"], route, str(status[0])).observe(time.perf_counter() - start)


class _EngineCollector:
    """Gauges read from the current engine at scrape time (so a swapped engine is reported)."""

    def __init__(self, provider: EngineProvider) -> None:
        self.provider = provider

    def describe(self) -> list:
        return []  # no collect() at registration: the engine may not exist yet

    def collect(self) -> Iterable[Any]:
        engine = self.provider()
        yield GaugeMetricFamily("felrec_ready", "1 when a store is loaded", value=float(engine is not None))
        if engine is None:
            return
        entities = GaugeMetricFamily("felrec_entities", "entities in the store", labels=["kind"])
        for kind, n in engine.sizes().items():
            entities.add_metric([kind], float(n))
        yield entities
        yield from _snapshot_metrics(engine)
        yield from _freshness_metrics(engine.freshness)


def _snapshot_metrics(engine: QueryEngine) -> Iterable[Any]:
    if engine.snapshot_seq is None:
        return
    yield GaugeMetricFamily("felrec_snapshot_seq", "seq of the snapshot being served", value=engine.snapshot_seq)
    try:
        created = datetime.fromisoformat(engine.snapshot_created_at or "").timestamp()
    except ValueError:  # a malformed time must not break the whole scrape
        return
    yield GaugeMetricFamily("felrec_snapshot_age_seconds", "age of the snapshot being served",
                            value=time.time() - created)


def _freshness_metrics(freshness: FreshnessTracker) -> Iterable[Any]:
    buckets, total, n = freshness.histogram()
    if freshness.last_max is not None:
        yield GaugeMetricFamily("felrec_freshness_seconds",
                                "seconds from arrival to queryable of the oldest event of the last applied batch",
                                value=freshness.last_max)
    yield HistogramMetricFamily("felrec_event_freshness_seconds",
                                "seconds from an event's arrival to it being queryable",
                                buckets=buckets, sum_value=total)


# ---- servers ---------------------------------------------------------------------------------

@dataclass
class ServerHandle:
    """A uvicorn server running in a daemon thread; `stop()` shuts it down gracefully."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout)
        log.info("api_stopped", url=self.url)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _bind(host: str, port: int) -> socket.socket:
    """Bind here (not in uvicorn) so errors surface in the caller and port 0 picks a free port."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServiceError(f"cannot bind {host}:{port}: {exc}") from None
    return sock


class _HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol plus a request-head timeout: a connection that has not sent a whole
    request head `HEADER_TIMEOUT_S` after connecting (or after its previous response) is closed.
    uvicorn alone keeps a connection that sends nothing, or half a head, open for ever (its
    keep-alive timeout starts only after a first response), so idle or slow clients pile up."""

    _head_timer: asyncio.TimerHandle | None = None
    _seen_cycle: Any = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._seen_cycle:  # a whole request head arrived
            self._seen_cycle = self.cycle
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def _server(app: FastAPI, log_level: str) -> uvicorn.Server:
    config = uvicorn.Config(app, log_level=log_level, access_log=False, log_config=None, lifespan="off",
                            http=_HeaderTimeoutH11, timeout_keep_alive=KEEP_ALIVE_S)
    return uvicorn.Server(config)


def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 8080, *,
                    startup_timeout: float = 15.0, log_level: str = "warning") -> ServerHandle:
    """Start `app` on host:port (0 = any free port) in a daemon thread; returns once it accepts."""
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    server = _server(app, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"felrec-api-{bound_port}")
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ServiceError(f"query API on {host}:{bound_port} did not start within {startup_timeout}s")
        time.sleep(0.01)
    handle = ServerHandle(server, thread, host, bound_port)
    log.info("api_started", url=handle.url)
    return handle


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8080, log_level: str = "warning") -> None:
    """Serve in the calling (main) thread until SIGINT/SIGTERM; SIGTERM ends with exit status 0.

    uvicorn shuts down gracefully on the signal and then re-raises it against the previous
    handler; the default SIGTERM handler would kill the process (status -15) before our cleanup,
    so a no-op handler is installed for the duration (a container stop is a normal shutdown).
    """
    sock = _bind(host, port)
    log.info("api_started", url=f"http://{host}:{sock.getsockname()[1]}")
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        _server(app, log_level).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("api_stopped", host=host, port=port)
