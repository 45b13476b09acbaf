"""The REST API and the web page over :class:`captioner.inference.captioner.Captioner` (`captioner serve`).

    POST /v1/captions   multipart, one or more files in the field ``images``; options as form or
                        query fields (:data:`captioner.serving.options.OPTIONS`: beam, n_best, max_len,
                        attention, every other decoding setting: concepts, mention=bicycle,dog, ...);
                        each result carries the concepts the encoder's classifier sees, when it has one
    GET  /v1/health     200 when the model is loaded
    GET  /v1/health/live   200 while the server answers (liveness)
    GET  /v1/health/ready  200 when the model is loaded, the queue has room and the server is not draining;
                        else 503 with Retry-After (readiness: a load balancer sends requests elsewhere)
    GET  /metrics       Prometheus metrics (:mod:`captioner.serving.metrics`)
    GET  /v1/models     the model: name, architecture, vocabulary size, encoder, decoding defaults, recorded metrics
    GET  /              the web page (src/captioner/serving/web/: plain HTML, CSS and JS, no build step)
    GET  /docs          OpenAPI docs (/docs, /openapi.json); Swagger UI's files come from the
                        swagger-ui-bundle-v2 package, so the docs work with no network

Images from concurrent requests are gathered by a :class:`captioner.serving.batcher.Batcher` into one
``Captioner.caption`` call per decoding setting (bounded queue, bounded wait), run in one model thread
off the event loop. The server reads only what is uploaded; it never fetches a URL.

Status codes: 200 captions; 400 a bad option (a word to mention that the model cannot say, too) or a
malformed request; 404/405 an unknown path or method; 408 a request not received within the read timeout
(a slow or stalled client); 413 a file or request over the size limits; 422 an image that cannot be read
(not an image, empty, truncated, too many pixels), with every image's result or error; 503 (with
Retry-After) when the queue is full, the model did not answer within the request timeout, or the server is
draining after SIGTERM. Every error body is JSON: ``{"error": "what is wrong"}``, plus
``"errors": [{"filename", "error"}]`` for per-file problems.

FastAPI, starlette, pydantic, prometheus_client and Swagger UI come with the serve extra: only :func:`captioner.serving.server.serve`
imports this module, once it has found them.
"""

# no "from __future__ import annotations": FastAPI reads the handlers' annotations at run time
import asyncio
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from swagger_ui_bundle import swagger_ui_path

from captioner import __version__
from captioner.checks import json_safe
from captioner.inference.captioner import Captioner
from captioner.inference.guidance import MentionError
from captioner.serving.batcher import Batcher, Busy, ShuttingDown
from captioner.serving.config import LIMITS, ServeConfig, mb
from captioner.serving.metrics import Metrics, MetricsMiddleware
from captioner.serving.options import OPTIONS, describe, joined, parse_options, schema

WEB_DIR = Path(__file__).parent / "web"
CAPTIONS = "/v1/captions"
DOCS_ASSETS = "/docs/assets"  # Swagger UI's files, from the swagger-ui-bundle-v2 package


class RequestTooLarge(Exception):
    pass


class ReadTimedOut(Exception):
    pass


class _BodyLimit:
    """ASGI middleware: the body of a caption request may not exceed ``limit`` bytes (413), and must have
    arrived within ``read_timeout`` seconds of the request (408: a slow or stalled client does not hold the
    connection and its memory forever). Refused from Content-Length at once, or while reading when the
    body is streamed."""

    def __init__(self, app, limit: int, paths: tuple[str, ...], read_timeout: float):
        self.app, self.limit, self.paths, self.read_timeout = app, limit, paths, read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = JSONResponse({"error": _too_large(self.limit)}, status_code=413,
                                    headers={"Connection": "close"})
            return await response(scope, receive, send)
        seen, received = 0, False
        deadline = asyncio.get_running_loop().time() + self.read_timeout

        async def limited_receive():
            nonlocal seen, received
            if received:  # the whole body is in: what follows (a disconnect) has no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                raise ReadTimedOut() from None
            if message["type"] == "http.request":
                received = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise RequestTooLarge()
            return message

        await self.app(scope, limited_receive, send)


def _too_large(limit: int) -> str:
    return (f"the request is larger than {mb(limit)}, the limit of this server "
            f"({LIMITS['max_request_bytes'].flag}); send fewer or smaller images per request")


def _too_slow(seconds: float) -> str:
    return (f"the request did not arrive within {seconds:g} s, the read timeout of this server "
            f"({LIMITS['read_timeout'].flag}); send it again over a faster connection, or fewer images at once")


def _error(status: int, message: str, errors: list[dict] | None = None, headers: dict | None = None, **extra):
    body: dict[str, Any] = {"error": message}
    if errors:
        body["errors"] = errors
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers)


# ----------------------------------------------------------------------------- the answers' shapes (OpenAPI)

class CaptionScore(BaseModel):
    caption: str
    score: float


class Concept(BaseModel):
    word: str
    confidence: float


class ImageResult(BaseModel):
    filename: str
    caption: str | None = None
    score: float | None = None
    n_best: list[CaptionScore] = []
    samples: list[CaptionScore] | None = None
    words: list[str] = []
    grid: list[int] | None = None
    image_size: list[int] | None = None
    attention: list[list[float]] | None = None
    concepts: list[Concept] | None = None
    error: str | None = None


class CaptionsAnswer(BaseModel):
    model: str
    results: list[ImageResult]


class ErrorAnswer(BaseModel):
    error: str
    errors: list[ImageResult] | None = None


def _openapi_body(cfg: ServeConfig) -> dict:
    props: dict[str, Any] = {"images": {"type": "array", "items": {"type": "string", "format": "binary"},
                                        "description": f"one to {cfg.max_images} image files, each at most "
                                                       f"{mb(cfg.max_upload_bytes)}"}}
    for name, s in OPTIONS.items():
        props[name] = {**schema(s), "description": describe(s)}
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": {"type": "object", "required": ["images"], "properties": props}}}},
        "parameters": [{"name": name, "in": "query", "required": False, "schema": schema(s),
                        "description": f"{describe(s)} (or as a form field)"} for name, s in OPTIONS.items()],
    }


# ----------------------------------------------------------------------------- the handlers

async def captions(request: Request):
    cfg: ServeConfig = request.app.state.config
    try:
        form = await request.form(max_files=cfg.max_images + 1, max_fields=4 * len(OPTIONS),
                                  max_part_size=64 * 1024)
    except RequestTooLarge:
        return _error(413, _too_large(cfg.max_request_bytes), headers={"Connection": "close"})
    except ReadTimedOut:
        return _error(408, _too_slow(cfg.read_timeout), headers={"Connection": "close"})
    except HTTPException as e:  # starlette's message for malformed multipart data
        if "too many files" in str(e.detail).lower():  # starlette stops counting at max_files
            return _error(400, f"more than {cfg.max_images + 1} images in one request; this server takes at most "
                               f"{cfg.max_images} ({LIMITS['max_images'].flag}): split them over several requests")
        return _error(400, f"bad multipart upload: {e.detail}")
    try:
        return await _captions(request, form)
    finally:
        await form.close()


def _files_and_fields(request: Request, form) -> tuple[list[UploadFile], dict[str, str]] | JSONResponse:
    """The uploaded files and the options (form and query fields) of a request, or its 400. An option is
    sent once, in the form or the query or both with the same value; a list of words (``mention``) may be
    sent as several fields too, each holding one or more words."""
    files, sent = [], {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != "images":
                return _error(400, f"file {value.filename!r} was sent in the field {key!r}; send images in the "
                                   "field 'images' (curl -F images=@photo.jpg ...)")
            files.append(value)
        elif key == "images":
            return _error(400, "the field 'images' holds text, not a file; upload the image file itself "
                               "(curl -F images=@photo.jpg ...); this server never fetches URLs")
        else:
            sent.setdefault(key, []).append(value)
    queried: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        queried.setdefault(key, []).append(value)
    fields: dict[str, str] = {}
    for where, values in (("form", sent), ("query", queried)):
        for key, texts in values.items():
            text = joined(OPTIONS.get(key), texts)
            if text is None:
                return _error(400, f"option {key!r} given twice with different values in the {where} "
                                   f"({', '.join(map(repr, texts))})")
            if key in fields and fields[key] != text:
                return _error(400, f"option {key!r} given twice with different values ({fields[key]!r} and "
                                   f"{text!r})")
            fields[key] = text
    return files, fields


def _refuse_files(files: list[UploadFile], names: list[str], cfg: ServeConfig) -> JSONResponse | None:
    """The 400 or 413 for too few, too many or too large files; None if they may be captioned."""
    if not files:
        return _error(400, "no image: send one or more image files in the multipart field 'images' "
                           "(curl -F images=@photo.jpg http://HOST/v1/captions)")
    if len(files) > cfg.max_images:
        return _error(400, f"{len(files)} images in one request; this server takes at most {cfg.max_images} "
                           f"({LIMITS['max_images'].flag}): split them over several requests")
    too_big = [{"filename": n, "error": f"{n}: {mb(f.size)} is larger than the limit of "
                                        f"{mb(cfg.max_upload_bytes)} a file ({LIMITS['max_upload_bytes'].flag})"}
               for n, f in zip(names, files) if f.size is not None and f.size > cfg.max_upload_bytes]
    if too_big:
        return _error(413, too_big[0]["error"] if len(too_big) == 1 else
                      f"{len(too_big)} files are larger than {mb(cfg.max_upload_bytes)}", too_big)
    return None


async def _captions(request: Request, form):
    state = request.app.state
    cfg: ServeConfig = state.config
    batcher: Batcher = state.batcher
    parsed = _files_and_fields(request, form)
    if isinstance(parsed, JSONResponse):
        return parsed
    files, fields = parsed
    names = [(f.filename or "").strip()[:255] or f"image {k + 1}" for k, f in enumerate(files)]
    refused = _refuse_files(files, names, cfg)
    if refused is not None:
        return refused
    try:
        overrides, attention = parse_options(fields, cfg)
        settings = state.model.decoding_settings(**overrides)
    except ValueError as e:
        return _error(400, f"bad option: {e}")
    images = [await f.read() for f in files]
    try:
        results = await asyncio.wait_for(batcher.submit(images, settings), cfg.timeout)
    except ShuttingDown as e:
        return _error(503, "the server is shutting down (SIGTERM) and takes no new work; send the request again "
                           "(to another replica)", headers={"Retry-After": str(e.retry_after), "Connection": "close"})
    except Busy as e:
        return _error(503, "the server is busy (its queue is full); try again shortly",
                      headers={"Retry-After": str(e.retry_after)})
    except MentionError as e:  # a word the model cannot say: the requests asking for it, and only those
        return _error(400, f"bad option: {e}")
    except asyncio.TimeoutError:
        return _error(503, f"no answer from the model within {cfg.timeout:g} s (the server is overloaded); "
                           "try again shortly, or with fewer images", headers={"Retry-After":
                                                                               str(batcher.retry_after())})
    out = [r.to_dict("filename", n, attention=attention, attention_digits=5) for r, n in zip(results, names)]
    bad = [o for o in out if "error" in o]
    if bad:
        message = bad[0]["error"] if len(bad) == 1 else f"{len(bad)} of {len(out)} images could not be read"
        return _error(422, message, bad, model=state.name, results=out)
    return JSONResponse({"model": state.name, "results": out})


async def health(request: Request):
    batcher: Batcher = request.app.state.batcher
    return {"status": "ok", "model": request.app.state.name, "queued": batcher.queued, "batches": batcher.batches,
            "images": batcher.images, "running": batcher.running, "process": os.getpid()}


async def live():
    return {"status": "alive"}


def not_ready(state) -> str | None:
    """Why the server should get no traffic now (None: ready)."""
    batcher: Batcher = state.batcher
    if batcher.draining:
        return "the server is shutting down (SIGTERM)"
    if not state.ready:
        return "the model is not loaded yet"
    if batcher.queued >= batcher.max_queue:
        return f"the queue is full ({batcher.queued} images waiting, {LIMITS['max_queue'].flag} {batcher.max_queue})"
    return None


async def ready(request: Request):
    state = request.app.state
    why = not_ready(state)
    if why is not None:
        return _error(503, f"not ready: {why}", headers={"Retry-After": str(state.batcher.retry_after())},
                      state="not ready")
    return {"status": "ready", "model": state.name, "queued": state.batcher.queued}


async def metrics(request: Request):
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


async def docs(request: Request):
    return get_swagger_ui_html(openapi_url=request.app.openapi_url, title=f"{request.app.title} API",
                               swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                               swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                               swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")


async def http_error(request: Request, e: HTTPException):
    """404, 405 and starlette's other HTTP errors as every answer of this API: ``{"error": ...}``."""
    if e.status_code == 404:
        message = (f"no such path: {request.url.path}; this server answers POST {CAPTIONS}, GET /v1/health, "
                   "GET /v1/models, GET /metrics, the web page at / and the API docs at /docs")
    elif e.status_code == 405:
        allowed = (e.headers or {}).get("allow") or (e.headers or {}).get("Allow") or ""
        message = f"{request.method} is not allowed on {request.url.path}" + (f"; use {allowed}" if allowed else "")
    else:
        message = str(e.detail)
    return _error(e.status_code, message, headers=e.headers)


async def models(request: Request):
    state = request.app.state
    cfg: ServeConfig = state.config
    return {"models": [model_info(state.model, state.name)],
            "limits": {"max_upload_bytes": cfg.max_upload_bytes, "max_images": cfg.max_images,
                       "max_pixels": cfg.max_pixels, "max_beam": cfg.max_beam, "max_len": cfg.max_len}}


async def page():
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")


def model_info(model: Captioner, name: str) -> dict:
    cfg = model.config
    enc = cfg.get("encoder") or {}
    return {"name": name, "architecture": cfg.get("arch"), "vocabulary_size": len(model.vocab),
            "attention": bool(model.decoder.has_attention),
            "concepts": model.guide.head is not None,  # its encoder's classifier names what it sees
            "encoder": {k: enc.get(k) for k in ("name", "image_size", "grid", "channels", "resize")},
            "decoding": model.settings.to_dict(), "metrics": json_safe(cfg.get("metrics") or {})}


# ----------------------------------------------------------------------------- the app

@asynccontextmanager
async def _lifespan(app: FastAPI):
    batcher: Batcher = app.state.batcher
    if app.state.config.warm_up:  # the encoder is built and both networks run once before the first request
        await batcher.warm_up()
    batcher.start()
    app.state.ready = True
    try:
        yield
    finally:
        await batcher.stop()
        batcher.close()


def create_app(model: Captioner, cfg: ServeConfig | None = None, *, name: str | None = None) -> FastAPI:
    """The FastAPI app serving ``model``. ``app.state.batcher`` is its :class:`Batcher`."""
    cfg = (cfg or ServeConfig()).checked()
    app = FastAPI(title="captioner", version=__version__, lifespan=_lifespan, docs_url=None, redoc_url=None,
                  description="Image captions with the words' attention over the photo. Upload images as "
                              "multipart files in the field `images`; the server never fetches URLs.")
    app.state.model = model
    app.state.name = name or model.config.get("name") or "model"
    app.state.config = cfg
    app.state.ready = False  # until the lifespan's start-up (the warm-up) is done
    app.state.batcher = Batcher(model, max_batch=cfg.max_batch, max_wait=cfg.max_wait_ms / 1000,
                                max_queue=cfg.max_queue, max_pixels=cfg.max_pixels)
    app.state.metrics = Metrics(app.state.batcher)
    app.add_middleware(_BodyLimit, limit=cfg.max_request_bytes, paths=(CAPTIONS,), read_timeout=cfg.read_timeout)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: sees every answer, 413s too
    app.add_exception_handler(HTTPException, http_error)
    answers = {status: {"model": ErrorAnswer} for status in (400, 408, 413, 422, 503)}
    app.add_api_route(CAPTIONS, captions, methods=["POST"], summary="Caption uploaded images",
                      responses={200: {"model": CaptionsAnswer}, **answers}, openapi_extra=_openapi_body(cfg))
    app.add_api_route("/v1/health", health, methods=["GET"],
                      summary="200 when the model is loaded and the server takes requests")
    app.add_api_route("/v1/health/live", live, methods=["GET"], summary="Liveness: 200 while the server answers")
    app.add_api_route("/v1/health/ready", ready, methods=["GET"], responses={503: {"model": ErrorAnswer}},
                      summary="Readiness: 200 when the model is loaded and the queue has room; else 503")
    app.add_api_route("/v1/models", models, methods=["GET"],
                      summary="The model served: architecture, vocabulary, encoder, test metrics")
    app.add_api_route("/metrics", metrics, methods=["GET"], summary="Prometheus metrics (text format)")
    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app
