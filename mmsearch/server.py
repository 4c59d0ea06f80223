"""HTTP API and web page (`mmsearch serve`): FastAPI over one index, the model loaded once at start-up.

Endpoints are plain `def`s, so FastAPI runs them concurrently in its thread pool. The index is re-opened
(reusing the loaded model) when an ingest publishes new FAISS files or `tune` rewrites the manifest, so a
running server finds new items without a restart.

Nothing in a request names a server file: a query image is an upload or an indexed item ("item:ID", whose
stored vector is used), and /images serves the file recorded in the store for a catalog id.
"""

from __future__ import annotations

import io
import json
import logging
import mimetypes
import threading
import warnings
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Request
from fastapi import Query as Param
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .collection import FAISS_STATE
from .config import MANIFEST_NAME, MODALITIES
from .encoders import Encoder
from .errors import ItemError, MMSearchError, QueryError
from .filters import parse_conditions
from .images import _to_rgb, load_image
from .info import index_info
from .search import Query, QueryPart, Searcher, SearchResult, build_query, query_from_json

try:  # Starlette parses uploads with python-multipart; import it now so a missing extra fails at start-up
    import python_multipart  # noqa: F401
except ImportError:  # releases before 0.0.13 only have the old module name
    import multipart  # noqa: F401

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small text fields around an upload
MAX_UPLOAD_PIXELS = 25_000_000  # a small PNG can decode to gigabytes; camera photos stay under this
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # no exotic decoders (EPS runs Ghostscript)
MAX_K = 500
THUMB_MIN, THUMB_MAX = 16, 1024
THUMB_CACHE = 512  # thumbnails kept in memory (~10-30 kB each)
ITEM_PREFIX = "item:"
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")  # anything else is read as JSON
IMAGE_HEADERS = {"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"}


class ApiError(Exception):
    """A request problem with its HTTP status; rendered as {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class UploadPart(QueryPart):
    """An image query part decoded from the request body; `value` is only a label ("upload:NAME")."""

    picture: Image.Image | None = field(default=None, repr=False, compare=False)


def decode_upload(data: bytes) -> Image.Image:
    """Decode uploaded bytes to RGB with images.load_image's guards, plus a pixel cap for untrusted input."""
    if not data:
        raise ApiError(400, "the uploaded image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as img:
                _check_pixels(*img.size)  # before decoding: the header alone gives the size
                img.seek(0)
                img.load()
                return _to_rgb(ImageOps.exif_transpose(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError(413, f"uploaded image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ApiError(400, f"the upload is not an image ({', '.join(UPLOAD_FORMATS)} accepted)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ApiError(400, f"unreadable or truncated image: {exc}") from exc


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_UPLOAD_PIXELS:
        raise ApiError(413, f"uploaded image has {width}x{height} pixels; the limit is {MAX_UPLOAD_PIXELS:,}")


class ServerSearcher(Searcher):
    """A Searcher whose query images come from the request (uploads) or from the index, never from a path."""

    def __init__(self, index_dir: Path, encoder: Encoder | None, encode_lock: threading.Lock, text_encoder=None,
                 image_encoder=None):
        super().__init__(index_dir, encoder, text_encoder, image_encoder)
        self.encode_lock = encode_lock
        for modality in MODALITIES:  # load FAISS now rather than racing to load it in concurrent requests
            self.collection.vector_index(modality)

    def encode_parts(self, parts: list[QueryPart]) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.stack([self._encode_part(p) for p in parts]).astype(np.float32)
        return vectors, np.array([p.weight for p in parts], dtype=np.float64)

    def _encode_part(self, part: QueryPart) -> np.ndarray:
        # One forward pass at a time: torch already spreads each pass over every core, and concurrent
        # passes on a shared module are not guaranteed safe by torch or the tokenizer.
        if part.kind == "text":
            with self.encode_lock:
                return self.text_encoder.encode_texts([part.value])[0]
        if isinstance(part, UploadPart) and part.picture is not None:
            with self.encode_lock:
                return self.image_encoder.encode_images([part.picture])[0]
        if part.value.startswith(ITEM_PREFIX):
            return self.item_vector(part.value[len(ITEM_PREFIX):])
        raise QueryError("a query image must be an upload (multipart field 'image') or an indexed item 'item:ID'")

    def item_vector(self, key: str) -> np.ndarray:
        """The item's stored image vector (its caption's when it has no image): exact and free to reuse."""
        item = self.collection.store.item_by_key(key)
        if item is None:
            raise QueryError(f"query image 'item:{key}': no such item in the index")
        for modality in MODALITIES:
            vec = self.collection.store.vectors([item.id], modality, self.manifest.dim).get(item.id)
            if vec is not None:
                return vec
        raise QueryError(f"item {key!r} has no stored vector")


def _stamp(index_dir: Path) -> tuple:
    """What changes when an ingest or tune finishes: both files are replaced atomically (new inode)."""
    out = []
    for name in (FAISS_STATE, MANIFEST_NAME):
        try:
            st = (index_dir / name).stat()
        except FileNotFoundError:
            out.append(None)
            continue
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


class IndexHolder:
    """The current Searcher; replaced by a fresh one (same model) when the index on disk has changed."""

    def __init__(self, index_dir: Path, encoder: Encoder | None = None):
        self.index_dir = Path(index_dir)
        self._encode_lock = threading.Lock()
        self._swap_lock = threading.Lock()
        self._stamp = _stamp(self.index_dir)
        self._searcher = ServerSearcher(self.index_dir, encoder, self._encode_lock)
        self.encoder = encoder  # the caller's, else None: a re-opened Searcher gets the two below
        # Loaded at start-up, not in the first request: the ONNX exports unless given an encoder, the torch
        # model where one is missing (a server on exported towers never builds it: less memory, faster start)
        self.image_encoder = self._searcher.image_encoder
        self.text_encoder = self._searcher.text_encoder

    def current(self) -> ServerSearcher:
        stamp = _stamp(self.index_dir)  # two stat() calls: cheap enough for every request
        # Non-blocking: while one request re-opens the index, the others keep using the previous snapshot.
        if stamp != self._stamp and self._swap_lock.acquire(blocking=False):
            try:
                if stamp != self._stamp:
                    self._reopen(stamp)
            finally:
                self._swap_lock.release()
        return self._searcher

    def _reopen(self, stamp: tuple) -> None:
        try:
            fresh = ServerSearcher(self.index_dir, self.encoder, self._encode_lock, self.text_encoder,
                                   self.image_encoder)
        except MMSearchError as exc:  # caught mid-rewrite: keep serving the old snapshot, retry next request
            log.warning("cannot re-open index %s yet: %s", self.index_dir, exc)
            return
        old, self._searcher, self._stamp = self._searcher, fresh, stamp
        # Safe under in-flight requests: SQLAlchemy's dispose() leaves checked-out connections working.
        old.close()
        log.info("index %s changed on disk: re-opened", self.index_dir)

    def close(self) -> None:
        self._searcher.close()


# -- app ------------------------------------------------------------------------------------------

def create_app(index_dir: Path, encoder: Encoder | None = None) -> FastAPI:
    """The API and web page for one index. Loads the index and the model now (errors surface at start-up)."""
    holder = IndexHolder(index_dir, encoder)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        holder.close()

    app = FastAPI(title="mmsearch", summary="Multimodal product search: words, pictures, or both.",
                  version=_version(), lifespan=lifespan)
    app.state.index = holder
    _add_error_handlers(app)
    _add_search_routes(app, holder)
    _add_item_routes(app, holder)
    _add_web_routes(app)
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmsearch")
    except PackageNotFoundError:
        return "dev"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_request, exc: ApiError):
        return _error(exc.status, str(exc))

    async def query_error(_request, exc: QueryError):
        return _error(400, str(exc))

    async def mmsearch_error(_request, exc: MMSearchError):
        return _error(500, str(exc))

    async def http_error(_request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    async def validation_error(_request, exc: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()]
        return _error(400, "; ".join(problems) or "invalid request")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(QueryError, query_error)
    app.add_exception_handler(MMSearchError, mmsearch_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


# -- search -----------------------------------------------------------------------------------------

POST_SEARCH_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "example": {
        "parts": [{"text": "red dress", "weight": 1.0}, {"image": "item:dress-7", "weight": 0.5}],
        "target": "item", "fusion": "attention", "where": ["price<50"], "k": 10, "explain": True}}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "string", "format": "binary"}, "text": {"type": "string"},
        "image_weight": {"type": "number", "default": 1.0}, "text_weight": {"type": "number", "default": 1.0},
        "k": {"type": "integer", "default": 10}, "target": {"type": "string"}, "fusion": {"type": "string"},
        "where": {"type": "array", "items": {"type": "string"}}, "explain": {"type": "boolean"}}}},
}}}


def _add_search_routes(app: FastAPI, holder: IndexHolder) -> None:
    @app.get("/api/search", summary="Search by words")
    def search_get(q: str = Param("", description="Query words; '2:red' weights, '-1:striped' pushes away"),
                   k: int = Param(10, ge=1, le=MAX_K), target: str | None = Param(None, description="image|text|item"),
                   fusion: str | None = Param(None, description="attention|sum"),
                   where: list[str] = Param([], description="Filters: FIELD=V, FIELD<N, FIELD~TEXT (repeat)"),
                   explain: bool = False, min_score: float | None = None):
        query = build_query(texts=[q], target=target, k=k, fusion_name=fusion, where=where, explain=explain,
                            min_score=min_score)
        return _search(holder, query)

    @app.post("/api/search", summary="Search by a JSON query or an uploaded image", openapi_extra=POST_SEARCH_DOC)
    async def search_post(request: Request):
        _check_length(request)
        if request.headers.get("content-type", "").startswith(FORM_TYPES):
            query = await _query_from_form(request)
        else:
            query = _query_from_json_body(await request.body())
        return await run_in_threadpool(_search, holder, query)

    @app.get("/api/similar/{item_id:path}", summary="Items that look like an indexed item")
    def similar(item_id: str, k: int = Param(10, ge=1, le=MAX_K), target: str | None = None,
                fusion: str | None = None, where: list[str] = Param([]), explain: bool = False):
        searcher = holder.current()
        if searcher.collection.store.item_by_key(item_id) is None:
            raise ApiError(404, f"unknown item {item_id!r}")
        query = Query(parts=[QueryPart("image", ITEM_PREFIX + item_id)], target=target, k=k + 1, fusion=fusion,
                      where=parse_conditions(where), explain=explain)
        result = searcher.search(query)
        query.k = k
        return JSONResponse(_without_item(result, item_id, k).to_dict())


def _search(holder: IndexHolder, query: Query) -> JSONResponse:
    if not query.parts:
        raise ApiError(400, "empty query: give words (q or text), an image, or both")
    if query.k > MAX_K:
        raise ApiError(400, f"k must be at most {MAX_K}")
    if query.min_score is not None and not isinstance(query.min_score, (int, float)):
        raise ApiError(400, "min_score must be a number")
    return JSONResponse(holder.current().search(query).to_dict())


def _without_item(result: SearchResult, item_id: str, k: int) -> SearchResult:
    """Drop the query item from its own similar list. Its "match" judged that self-hit (always a good
    match), so it says nothing about the remaining hits and is left out."""
    result.results = [h for h in result.results if h.id != item_id][:k]
    result.match = None
    return result


def _check_length(request: Request) -> None:
    """Refuse an oversized body from its header, before anything is read or spooled to disk."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_UPLOAD_BYTES + FORM_OVERHEAD:
        raise ApiError(413, f"request too large: uploads are limited to {MAX_UPLOAD_BYTES // 2**20} MB")


def _query_from_json_body(body: bytes) -> Query:
    try:
        query = query_from_json(json.loads(body or b"{}"))
    except QueryError:
        raise
    except (ValueError, TypeError) as exc:
        raise ApiError(400, f'the body must be a JSON query like {{"text": "red dress", "k": 10}}: {exc}') from exc
    return query


async def _query_from_form(request: Request) -> Query:
    form = await request.form(max_files=1, max_fields=32)
    parts = []
    upload = form.get("image")
    if upload is not None and not isinstance(upload, str):
        data = await upload.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise ApiError(413, f"uploaded image is over {MAX_UPLOAD_BYTES // 2**20} MB")
        picture = await run_in_threadpool(decode_upload, data)
        label = "upload:" + (Path(upload.filename or "").name[:80] or "image")
        parts.append(UploadPart("image", label, _number(form, "image_weight", 1.0), picture=picture))
    elif isinstance(upload, str) and upload.strip():  # an indexed item given as 'item:ID'
        parts.append(QueryPart("image", upload.strip(), _number(form, "image_weight", 1.0)))
    text = form.get("text")
    if isinstance(text, str) and text.strip():
        parts.append(QueryPart("text", text.strip(), _number(form, "text_weight", 1.0)))
    return Query(parts=parts, target=_text(form, "target"), k=_integer(form, "k", 10),
                 fusion=_text(form, "fusion"), where=parse_conditions([w for w in form.getlist("where") if w]),
                 explain=_text(form, "explain") in ("1", "true", "on", "yes"),
                 min_score=_number(form, "min_score", None))


def _text(form, name: str) -> str | None:
    value = form.get(name)
    return (value.strip() or None) if isinstance(value, str) else None


def _number(form, name: str, default):
    value = _text(form, name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError as exc:
        raise ApiError(400, f"{name} must be a number, got {value!r}") from exc


def _integer(form, name: str, default: int) -> int:
    value = _number(form, name, default)
    if not float(value).is_integer():  # NaN and infinities are not whole numbers either
        raise ApiError(400, f"{name} must be a whole number")
    return int(value)


# -- items and images ---------------------------------------------------------------------------------

def _add_item_routes(app: FastAPI, holder: IndexHolder) -> None:
    @app.get("/api/items/{item_id:path}", summary="One indexed item by its catalog id")
    def item(item_id: str):
        row = _item_or_404(holder, item_id)
        return {"id": row.key, "caption": row.caption, "image": row.image, "metadata": dict(row.meta or {}),
                "image_url": f"/images/{quote(row.key, safe='')}" if row.image else None, "updated": row.updated}

    @app.get("/api/info", summary="What the index holds: counts, model, metadata fields")
    def info():
        return {**index_info(holder.index_dir), "limits": {"max_k": MAX_K, "max_upload_bytes": MAX_UPLOAD_BYTES,
                                                           "max_upload_pixels": MAX_UPLOAD_PIXELS}}

    @app.get("/healthz", summary="Liveness")
    def healthz():
        holder.current()
        return {"status": "ok"}

    @app.get("/images/{item_id:path}", summary="An indexed item's image, or a thumbnail with ?size=N")
    def image(item_id: str, size: int | None = Param(None, ge=THUMB_MIN, le=THUMB_MAX,
                                                     description="Longest side of a JPEG thumbnail")):
        path = _image_path(_item_or_404(holder, item_id))
        if size is None:
            media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            return FileResponse(path, media_type=media, headers=IMAGE_HEADERS)
        try:
            data = _thumbnail(str(path), path.stat().st_mtime_ns, size)
        except ItemError as exc:
            raise ApiError(404, f"image of {item_id!r} is no longer readable: {exc.reason}") from exc
        return Response(data, media_type="image/jpeg", headers=IMAGE_HEADERS)


def _item_or_404(holder: IndexHolder, key: str):
    row = holder.current().collection.store.item_by_key(key)
    if row is None:
        raise ApiError(404, f"unknown item {key!r}")
    return row


def _image_path(row) -> Path:
    """The file recorded at ingest for this item; the request only ever chooses the catalog id."""
    path = Path(row.image) if row.image else None
    if path is None or not path.is_file():
        raise ApiError(404, f"item {row.key!r} has no image file")
    return path


@lru_cache(maxsize=THUMB_CACHE)
def _thumbnail(path: str, mtime_ns: int, size: int) -> bytes:
    """JPEG whose longest side is `size`. mtime_ns is part of the cache key: a re-ingested file is not stale."""
    img = ImageOps.contain(load_image(path), (size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


# -- web page -----------------------------------------------------------------------------------------

def _add_web_routes(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})
