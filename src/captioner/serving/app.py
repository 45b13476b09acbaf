"""The REST API and the web page over :class:`captioner.inference.captioner.Captioner` (`captioner serve`).

    POST /v1/captions   multipart, one or more files in the field ``images``; options as form or
                        query fields (:data:`captioner.serving.options.OPTIONS`: beam, n_best, max_len,
                        attention, every other decoding setting)
    GET  /v1/health     200 when the model is loaded
    GET  /v1/models     the model: name, architecture, vocabulary size, encoder, recorded metrics
    GET  /              the web page (src/captioner/serving/web/: plain HTML, CSS and JS, no build step)
    GET  /docs          OpenAPI docs (FastAPI's default paths: /docs, /openapi.json)

Images from concurrent requests are gathered by a :class:`captioner.serving.batcher.Batcher` into one
``Captioner.caption`` call per decoding setting (bounded queue, bounded wait), run in one model thread
off the event loop. The server reads only what is uploaded; it never fetches a URL.

Status codes: 200 captions; 400 a bad option or a malformed request; 413 a file or request over the
size limits; 422 an image that cannot be read (not an image, empty, truncated, too many pixels),
with every image's result or error; 503 (with Retry-After) when the queue is full or the model did
not answer within the request timeout. Every error body is JSON: ``{"error": "what is wrong"}``, plus
``"errors": [{"filename", "error"}]`` for per-file problems.

FastAPI, starlette and pydantic come with the serve extra: only :func:`captioner.serving.server.serve`
imports this module, once it has found them.
"""

# no "from __future__ import annotations": FastAPI reads the handlers' annotations at run time
import asyncio
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from captioner import __version__
from captioner.checks import json_safe
from captioner.inference.captioner import Captioner
from captioner.serving.batcher import Batcher, Busy
from captioner.serving.config import LIMITS, ServeConfig, mb
from captioner.serving.options import OPTIONS, describe, parse_options

WEB_DIR = Path(__file__).parent / "web"
CAPTIONS = "/v1/captions"


class RequestTooLarge(Exception):
    pass


class _BodyLimit:
    """ASGI middleware: the body of a caption request may not exceed ``limit`` bytes (413).
    Refused from Content-Length at once, or while reading when the body is streamed."""

    def __init__(self, app, limit: int, paths: tuple[str, ...]):
        self.app, self.limit, self.paths = app, limit, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = JSONResponse({"error": _too_large(self.limit)}, status_code=413,
                                    headers={"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise RequestTooLarge()
            return message

        await self.app(scope, limited_receive, send)


def _too_large(limit: int) -> str:
    return (f"the request is larger than {mb(limit)}, the limit of this server "
            f"({LIMITS['max_request_bytes'].flag}); send fewer or smaller images per request")


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
        props[name] = {"type": "string", "description": describe(s)}
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": {"type": "object", "required": ["images"], "properties": props}}}},
        "parameters": [{"name": name, "in": "query", "required": False, "schema": {"type": "string"},
                        "description": f"{describe(s)} (or as a form field)"} for name, s in OPTIONS.items()],
    }


# ----------------------------------------------------------------------------- the handlers

async def captions(request: Request):
    cfg: ServeConfig = request.app.state.config
    try:
        form = await request.form(max_files=cfg.max_images * 4, max_fields=4 * len(OPTIONS),
                                  max_part_size=64 * 1024)
    except RequestTooLarge:
        return _error(413, _too_large(cfg.max_request_bytes), headers={"Connection": "close"})
    except HTTPException as e:  # starlette's message for malformed multipart data
        return _error(400, f"bad multipart upload: {e.detail}")
    try:
        return await _captions(request, form)
    finally:
        await form.close()


def _files_and_fields(request: Request, form) -> tuple[list[UploadFile], dict[str, str]] | JSONResponse:
    """The uploaded files and the options (form and query fields) of a request, or its 400."""
    files, fields = [], {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != "images":
                return _error(400, f"file {value.filename!r} was sent in the field {key!r}; send images in the "
                                   "field 'images' (curl -F images=@photo.jpg ...)")
            files.append(value)
        elif key == "images":
            return _error(400, "the field 'images' holds text, not a file; upload the image file itself "
                               "(curl -F images=@photo.jpg ...); this server never fetches URLs")
        elif key in fields:
            return _error(400, f"option {key!r} given twice")
        else:
            fields[key] = value
    for key, value in request.query_params.multi_items():
        if key in fields and fields[key] != value:
            return _error(400, f"option {key!r} given twice with different values ({fields[key]!r} and {value!r})")
        fields[key] = value
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
        future = batcher.submit(images, settings)
    except Busy as e:
        return _error(503, "the server is busy (its queue is full); try again shortly",
                      headers={"Retry-After": str(e.retry_after)})
    try:
        results = await asyncio.wait_for(future, cfg.timeout)
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
            "images": batcher.images}


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
            "encoder": {k: enc.get(k) for k in ("name", "image_size", "grid", "channels", "resize")},
            "decoding": model.settings.to_dict(), "metrics": json_safe(cfg.get("metrics") or {})}


# ----------------------------------------------------------------------------- the app

@asynccontextmanager
async def _lifespan(app: FastAPI):
    batcher: Batcher = app.state.batcher
    if app.state.config.warm_up:  # the encoder is built and both networks run once before the first request
        await batcher.warm_up()
    batcher.start()
    try:
        yield
    finally:
        await batcher.stop()
        batcher.close()


def create_app(model: Captioner, cfg: ServeConfig | None = None, *, name: str | None = None) -> FastAPI:
    """The FastAPI app serving ``model``. ``app.state.batcher`` is its :class:`Batcher`."""
    cfg = (cfg or ServeConfig()).checked()
    app = FastAPI(title="captioner", version=__version__, lifespan=_lifespan,
                  description="Image captions with the words' attention over the photo. Upload images as "
                              "multipart files in the field `images`; the server never fetches URLs.")
    app.state.model = model
    app.state.name = name or model.config.get("name") or "model"
    app.state.config = cfg
    app.state.batcher = Batcher(model, max_batch=cfg.max_batch, max_wait=cfg.max_wait_ms / 1000,
                                max_queue=cfg.max_queue, max_pixels=cfg.max_pixels)
    app.add_middleware(_BodyLimit, limit=cfg.max_request_bytes, paths=(CAPTIONS,))
    answers = {status: {"model": ErrorAnswer} for status in (400, 413, 422, 503)}
    app.add_api_route(CAPTIONS, captions, methods=["POST"], summary="Caption uploaded images",
                      responses={200: {"model": CaptionsAnswer}, **answers}, openapi_extra=_openapi_body(cfg))
    app.add_api_route("/v1/health", health, methods=["GET"],
                      summary="200 when the model is loaded and the server takes requests")
    app.add_api_route("/v1/models", models, methods=["GET"],
                      summary="The model served: architecture, vocabulary, encoder, test metrics")
    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app
