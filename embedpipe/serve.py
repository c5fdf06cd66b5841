"""Image search as a service: an HTTP API and one web page over an index.

::

    GET  /                      the page (self-contained HTML/JS, no CDN)
    POST /api/search?k=&nprobe=&ef_search=   multipart ``image``: search by upload
    GET  /api/search?id=&k=...  search from a row of the index
    GET  /api/thumbnail?id=&size=            a JPEG thumbnail, cached on disk
    GET  /api/info              the index's metadata
    GET  /api/map               the points of ``--map`` (ids, label codes, x, y), built once
    GET  /healthz, /metrics     liveness, Prometheus counters and latency histograms
    GET  /openapi.json          the API's OpenAPI description

The handlers call the Python API the CLI calls (:func:`embedpipe.index.search_images`
and :meth:`Index.search_ids`), with one :class:`~embedpipe.extraction.forward.QueryEmbedder` loaded
at start-up. What a client sends is never a path: images are served by id, looked up
in the index and resolved under ``images_root`` with the real path checked to stay
inside it; uploads are size-capped while they stream in and decoded by the extraction
decoder (format allow-list, pixel cap). Requests naming another Host than the server's
are refused (DNS rebinding). Search-effort parameters are bounded by what the index can
use and go to FAISS per call, so concurrent requests never see each other's settings.

FastAPI, uvicorn and prometheus_client are the optional extra ``embedpipe[serve]``;
nothing else in the package imports this module.
"""


import gzip
import hashlib
import ipaddress
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, NamedTuple

import numpy as np

from .errors import EmbedpipeError, IndexInputError, MissingDependencyError, QueryImagesError
from .files import atomic_write_bytes
from .images.decode import ErrorType
from .images.thumbnails import thumbnail_jpeg
from .index import Index, SearchKnob, search_images
from .provenance import Provenance, WeightsInfo, WeightsKind

try:
    import prometheus_client as prom
    from fastapi import FastAPI, HTTPException, Query, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.datastructures import Headers
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as e:  # pragma: no cover - exercised by test_serve's missing-extra test
    raise MissingDependencyError(
        f"embedpipe serve needs FastAPI, uvicorn and prometheus_client ({e}); install them "
        'with: pip install "embedpipe[serve]"'
    ) from e

log = logging.getLogger("embedpipe.serve")
access_log = logging.getLogger("embedpipe.serve.access")

PAGE = Path(__file__).parent / "static" / "search.html"
#: the page loads nothing from elsewhere and is never framed; uploads show as blob: URLs
CSP = ("default-src 'self'; img-src 'self' blob:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self' 'unsafe-inline'; frame-ancestors 'none'")
#: thumbnails come in these sizes (long side, px); ?size= is rounded up to one, so the disk
#: cache holds at most six files per image however many sizes clients ask for
THUMBNAIL_SIZES = (32, 64, 128, 256, 512, 1024)
MAX_ID_LENGTH = 4096
#: room for the multipart framing around an upload: boundary, part headers, file name
BODY_OVERHEAD = 16 * 1024
#: Host names always served (the bound address and --allowed-host are added)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")

#: decode failures of an upload -> HTTP status (everything else is 400)
_UPLOAD_STATUS = {
    ErrorType.TOO_MANY_PIXELS: 413,
    ErrorType.NOT_AN_IMAGE: 415,
}


@dataclass(frozen=True)
class ServeConfig:
    """What ``embedpipe serve`` was asked to serve, and its limits."""

    index: Path
    images: Path | None = None  # None: the image folder the index records
    max_k: int = 100
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    cache_dir: Path | None = None  # None: <index>/.thumbnails
    allowed_hosts: tuple[str, ...] = ()  # Host names served besides LOCAL_HOSTS
    max_effort: int | None = None  # None: what the index can use (nlist, EF_SEARCH_MAX)
    map: Path | None = None  # what `embedpipe map EMB --out MAP` wrote, of the index's embeddings

    def to_json(self) -> str:
        return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> "ServeConfig":
        d = json.loads(text)
        for key in ("index", "images", "cache_dir", "map"):
            if d.get(key) is not None:
                d[key] = Path(d[key])
        return cls(**{**d, "allowed_hosts": tuple(d["allowed_hosts"])})


@dataclass
class _Metrics:
    registry: prom.CollectorRegistry = field(default_factory=prom.CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = prom.Counter(
            "embedpipe_http_requests", "HTTP requests by route, method and status",
            ["route", "method", "status"], registry=self.registry,
        )
        self.latency = prom.Histogram(
            "embedpipe_http_request_duration_seconds", "Request latency by route", ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry,
        )


class ImageResolver:
    """Ids -> files under one root; never a path that leaves it.

    An id must be a row of the index (so ``../x``, absolute paths, NULs and ids the
    index never held are refused before the file system is touched), and the real path
    of ``root / id`` (symlinks followed) must still lie under the real root.
    """

    def __init__(self, root: Path, index: Index) -> None:
        self.root = Path(os.path.realpath(root))
        self.index = index

    def check_id(self, image_id: str) -> str:
        if not image_id or len(image_id) > MAX_ID_LENGTH or "\x00" in image_id:
            raise HTTPException(400, "an id is 1 to 4096 characters without NUL")
        parts = image_id.replace("\\", "/").split("/")
        if image_id.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise HTTPException(400, "ids are relative paths inside the image folder, without '..'")
        if image_id not in self.index:
            raise HTTPException(404, f"the index holds no id {image_id!r}")
        return image_id

    def path(self, image_id: str) -> Path:
        real = Path(os.path.realpath(self.root / self.check_id(image_id)))
        if not real.is_relative_to(self.root):
            raise HTTPException(403, f"{image_id!r} resolves outside the image folder")
        if not real.is_file():
            raise HTTPException(404, f"the image of {image_id!r} is no longer in the image folder")
        return real


class RequestGuard:
    """Refuses, in pure ASGI before any handler runs, what must never reach one.

    - A Host header not on the allow-list (400): a page on another site that rebinds its
      own name to this server's address (DNS rebinding) still sends its own name as Host.
    - A body over ``max_upload + BODY_OVERHEAD`` bytes (413): at once when Content-Length
      declares it, otherwise counted as it streams in and aborted past the cap, so that
      Starlette's multipart parser, which spools files to disk without a limit, never
      stores more than that (a Content-Length that lies is counted the same way).
    """

    def __init__(self, app: ASGIApp, *, hosts: Iterable[str], max_upload: int) -> None:
        self.app = app
        self.hosts = frozenset(hosts)
        self.max_body = max_upload + BODY_OVERHEAD
        self.too_large = _too_large(max_upload)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = _host_name(headers.get("host", ""))
        if host not in self.hosts:
            detail = (f"this server does not answer to Host {host!r}; if that is its name, "
                      "start it with --allowed-host " + (host or "NAME"))
            await JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            await JSONResponse({"detail": self.too_large}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                # raised into whoever reads the body (FastAPI's form parsing re-raises
                # HTTPExceptions): the request ends with this 413, the rest is never read
                raise HTTPException(413, self.too_large)
            return message

        await self.app(scope, capped_receive, send)


def _host_name(header: str) -> str:
    """A Host header without its port, lower-cased: ``[::1]:8000`` -> ``[::1]``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header.partition("]")[0] + "]"
    return header.partition(":")[0]


def _allowed_host(name: str) -> str:
    """A name to serve as ``_host_name`` writes it: IPv6 addresses in brackets."""
    bare = name.strip().lower().removeprefix("[").removesuffix("]")
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        if not bare or any(c in bare for c in ":/@ "):
            raise IndexInputError(
                f"--allowed-host {name!r} is not a host name or address; give one like "
                "search.example.org or 192.168.1.5, without scheme, port or path"
            ) from None
        return bare
    return f"[{address}]" if address.version == 6 else str(address)


def _too_large(limit: int) -> str:
    return (f"uploads are limited to {limit / 2**20:.3g} MiB; send a smaller image, or start "
            "the server with a larger --max-upload-mb")


class _EffortBound(NamedTuple):
    """The search-effort parameter of an index, the largest value a request may ask
    for, and what sets that bound."""

    knob: SearchKnob
    limit: int
    reason: str


def _effort_bound(index: Index, max_effort: int | None) -> _EffortBound | None:
    """What bounds a request's nprobe (the IVF index's nlist: more lists than it has
    cannot be probed) or efSearch (the tuning ceiling), lowered by ``max_effort``; None
    for an index without a search-time parameter."""
    found = index.search_limit
    if found is None:
        return None
    knob, ceiling = found
    if max_effort is None or max_effort >= ceiling:
        if knob is SearchKnob.NPROBE:
            return _EffortBound(knob, ceiling, f"the {ceiling} inverted lists (nlist) of this index")
        return _EffortBound(knob, ceiling, "the efSearch ceiling of tuning (EF_SEARCH_MAX)")
    tuned = index.info.tuning.value if index.info.tuning else None
    if tuned is not None and tuned > max_effort:
        raise IndexInputError(
            f"--max-effort {max_effort} is below the index's tuned default {knob}={tuned}, "
            f"which requests without {knob} use; pass --max-effort {tuned} or more"
        )
    return _EffortBound(knob, max_effort, "the server's --max-effort")


def create_app(config: ServeConfig) -> FastAPI:
    """The ASGI app serving ``config.index``. Loads the index and the query model once."""
    from .extraction.forward import QueryEmbedder

    index = Index.open(config.index)
    provenance = Provenance.from_json(index.meta)
    images = config.images or (Path(provenance.images) if provenance.images else None)
    if images is None or not images.is_dir():
        raise IndexInputError(
            f"no image folder to serve thumbnails from ({images}); pass --images IMAGES_ROOT"
        )
    embedder = QueryEmbedder(index.meta, max_pixels=config.max_pixels) if provenance.known else None
    resolver = ImageResolver(images, index)
    cache = config.cache_dir or config.index / ".thumbnails"
    cache.mkdir(parents=True, exist_ok=True)
    if not os.access(cache, os.W_OK):  # found now, not as a 500 on the first thumbnail
        raise IndexInputError(f"the thumbnail cache {cache} is not writable; pass --cache-dir")
    bound = _effort_bound(index, config.max_effort)
    points = _MapPayload.load(config.map, index) if config.map is not None else None
    hosts = {*LOCAL_HOSTS, *map(_allowed_host, config.allowed_hosts)}
    metrics = _Metrics()
    info = {  # no server paths: clients learn what is searchable, not where it lives
        "count": index.info.count,
        "dim": index.info.dim,
        "metric": str(index.info.metric),
        "factory": index.info.factory,
        "kind": index.info.kind,
        "search_parameter": str(bound.knob) if bound else None,
        "search_parameter_default": index.info.tuning.value if index.info.tuning else None,
        "search_parameter_max": bound.limit if bound else None,
        "max_k": config.max_k,
        "can_search_images": embedder is not None,
        "backbone": provenance.backbone,
        "weights": _public_weights(provenance.weights),
        "layer": provenance.layer,
        "labels": sorted({str(x) for x in index.labels if x is not None}),
        "map": points.etag if points else None,  # the page asks for api/map?v=<this>
    }

    # no Swagger UI: its assets come from a CDN, which the CSP rightly blocks; /openapi.json stays
    app = FastAPI(title="embedpipe search", version="1", docs_url=None, redoc_url=None)
    # added before `observe`, so inside it: refusals are logged, counted and get its headers
    app.add_middleware(RequestGuard, hosts=hosts, max_upload=config.max_upload_bytes)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        t = time.perf_counter()
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Content-Security-Policy", CSP)
        seconds = time.perf_counter() - t
        route = request.scope.get("route")
        name = route.path if route is not None else "unmatched"
        metrics.requests.labels(name, request.method, str(response.status_code)).inc()
        metrics.latency.labels(name).observe(seconds)
        access_log.info(json.dumps({
            "method": request.method, "path": request.url.path, "route": name,
            "status": response.status_code, "ms": round(seconds * 1000, 2),
            "client": request.client.host if request.client else None,
        }))
        return response

    @app.exception_handler(EmbedpipeError)
    async def bad_request(request: Request, exc: EmbedpipeError):
        # the library's typed errors reaching a handler are the request's fault
        return JSONResponse({"detail": str(exc)}, status_code=400)

    K = Annotated[int, Query(ge=1, le=config.max_k, description="neighbours to return")]
    Effort = Annotated[int | None, Query(ge=1, le=1_000_000)]

    def effort(nprobe: int | None, ef_search: int | None) -> dict:
        params = {"nprobe": nprobe, "ef_search": ef_search}
        asked = params[bound.knob] if bound else None
        if asked is not None and asked > bound.limit:  # not clamped: params echo what was searched
            raise HTTPException(
                422, f"{bound.knob}={asked} is more than this index can use: at most "
                     f"{bound.limit}, {bound.reason}; ask for 1 to {bound.limit}",
            )
        return params

    def answer(results, query_id: str, k: int, params: dict) -> dict:
        frame = results.to_frame()
        frame["query_id"] = query_id
        return {
            "query_id": query_id,
            "k": k,
            "params": {key: v for key, v in params.items() if v is not None},
            "results": json.loads(frame.to_json(orient="records")),
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)  # no icon, and no 404 in every browser's console

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "count": index.info.count}

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(prom.generate_latest(metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    @app.get("/api/info")
    def api_info() -> dict:
        return info

    @app.get("/api/map")
    def api_map(request: Request) -> Response:
        """Every point of the map: ``{"ids", "labels" (codes into "label_names"), "x", "y",
        "label_names"}``, coordinates rounded to 4 decimals; the same bytes every time."""
        if points is None:
            raise HTTPException(404, "this server has no map; start it with --map MAP_DIR, "
                                     "what `embedpipe map EMBEDDINGS --out MAP_DIR` writes")
        headers = {"ETag": points.etag, "Cache-Control": "public, max-age=86400", "Vary": "Accept-Encoding"}
        if points.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        if "gzip" in request.headers.get("accept-encoding", ""):
            return Response(points.gzipped, media_type="application/json",
                            headers={**headers, "Content-Encoding": "gzip"})
        return Response(points.body, media_type="application/json", headers=headers)

    @app.get("/api/search")
    def search_by_id(
        id: Annotated[str, Query(description="an id of the index")],
        k: K = 10,
        nprobe: Effort = None,
        ef_search: Effort = None,
    ) -> dict:
        image_id = resolver.check_id(id)
        params = effort(nprobe, ef_search)
        results = index.search_ids([image_id], k, **params)
        return answer(results, image_id, k, params)

    @app.post("/api/search")
    def search_by_upload(
        image: UploadFile,
        k: K = 10,
        nprobe: Effort = None,
        ef_search: Effort = None,
    ) -> dict:
        if embedder is None:
            raise HTTPException(400, "this index records no backbone: it cannot embed images")
        params = effort(nprobe, ef_search)
        with tempfile.TemporaryDirectory(prefix="embedpipe-upload-") as tmp:
            path = Path(tmp) / "upload"
            _save_capped(image, path, config.max_upload_bytes)
            try:
                results, _ = search_images(index, [path], k, embedder=embedder, **params)
            except QueryImagesError as e:  # the upload itself could not be embedded: say why
                failure = e.failures[0]
                raise HTTPException(
                    _UPLOAD_STATUS.get(ErrorType(failure.error_type), 400),
                    f"the upload cannot be embedded: {failure.error_type}: {failure.message}",
                ) from None
        return answer(results, image.filename or "upload", k, params)

    @app.get("/api/thumbnail")
    def thumbnail(
        id: Annotated[str, Query()],
        size: Annotated[int, Query(ge=1, le=THUMBNAIL_SIZES[-1])] = 256,
    ) -> Response:
        path = resolver.path(id)
        st = path.stat()
        key = hashlib.blake2b(f"{id}\0{st.st_size}\0{st.st_mtime_ns}".encode(), digest_size=16).hexdigest()
        size = next(s for s in THUMBNAIL_SIZES if s >= size)
        cached = cache / f"{key}-{size}.jpg"
        if not cached.is_file():
            atomic_write_bytes(_thumbnail_jpeg(path, size, config.max_pixels), cached)
        return Response(
            cached.read_bytes(), media_type="image/jpeg",
            headers={"Cache-Control": "public, max-age=3600"},
        )

    return app


class _MapPayload(NamedTuple):
    """The JSON of ``/api/map``, built once at start-up, gzipped once, and its ETag."""

    body: bytes
    gzipped: bytes
    etag: str

    @classmethod
    def load(cls, map_dir: Path, index: Index) -> "_MapPayload":
        from .maps import read_map

        m = read_map(map_dir)
        ids = [str(i) for i in m.ids]
        missing = [i for i in ids if i not in index]
        if missing:
            raise IndexInputError(
                f"the map {map_dir} is not of this index: {len(missing)} of its {len(ids)} ids are "
                f"not in the index (e.g. {missing[0]!r}); map the embeddings the index was built "
                "from: embedpipe map EMBEDDINGS --out MAP_DIR"
            )
        labels = [None if x is None else str(x) for x in m.labels]
        names = sorted({x for x in labels if x is not None})
        if None in labels:
            names.append(None)
        code = {name: c for c, name in enumerate(names)}
        xy = m.xy.astype(np.float64).round(4)
        body = json.dumps({"ids": ids, "labels": [code[x] for x in labels], "x": xy[:, 0].tolist(),
                           "y": xy[:, 1].tolist(), "label_names": names},
                          separators=(",", ":")).encode()
        etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
        return cls(body, gzip.compress(body, 6, mtime=0), etag)


def _public_weights(weights: WeightsInfo | None) -> dict | None:
    """The weights record with a checkpoint's path cut to its file name."""
    if weights is None:
        return None
    if weights.kind != WeightsKind.CHECKPOINT:
        return weights.to_dict()
    return {**weights.to_dict(), "name": Path(weights.name).name}


def _save_capped(upload: UploadFile, path: Path, limit: int) -> None:
    """Stream an upload to ``path``, refusing it (413) past ``limit`` bytes."""
    size = 0
    with open(path, "wb") as f:
        while chunk := upload.file.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, _too_large(limit))
            f.write(chunk)
    if size == 0:
        raise HTTPException(400, "the upload is empty")


def _thumbnail_jpeg(path: Path, size: int, max_pixels: int) -> bytes:
    """The shared thumbnail (upright, RGB, ``size`` px on its long side) as a JPEG; an
    image that cannot be shown is a 422."""
    try:
        return thumbnail_jpeg(path, size, max_pixels=max_pixels)
    except EmbedpipeError as e:
        raise HTTPException(422, f"the image cannot be shown: {e}") from None


def log_access_to_stderr() -> None:
    """One JSON line per request on stderr, whatever the root logger's level (the CLI's
    default is warnings only); for processes that run the server."""
    if not access_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False


def app_from_environment() -> FastAPI:
    """The app factory uvicorn's worker processes call (``--workers`` > 1)."""
    log_access_to_stderr()
    return create_app(ServeConfig.from_json(os.environ["EMBEDPIPE_SERVE_CONFIG"]))


def run(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
        log_level: str = "info", announce: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted. Several workers each load the index and the model. The
    bound ``host`` is one of the Host names served. ``announce`` hears the address once
    the app has loaded (an index or image folder that cannot be served fails before)."""
    import uvicorn

    log_access_to_stderr()
    config = replace(config, allowed_hosts=(*config.allowed_hosts, host))
    app = create_app(config)  # with several workers too: refuse here, not in each worker
    if announce is not None:
        announce(f"serving {config.index} on http://{host}:{port}/")
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
        return
    del app
    os.environ["EMBEDPIPE_SERVE_CONFIG"] = config.to_json()
    uvicorn.run("embedpipe.serve:app_from_environment", factory=True, host=host, port=port,
                workers=workers, log_level=log_level, access_log=False)
