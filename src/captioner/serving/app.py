"""`captioner serve`: a REST API and a web page over :class:`captioner.inference.captioner.Captioner`.

    POST /v1/captions   multipart, one or more files in the field ``images``; options as form or
                        query fields (beam, n_best, max_len, attention, sample, num_captions,
                        temperature, top_k, top_p, seed)
    GET  /v1/health     200 when the model is loaded
    GET  /v1/models     the model: name, architecture, vocabulary size, encoder, recorded metrics
    GET  /              the web page (src/captioner/web/: plain HTML, CSS and JS, no build step)
    GET  /docs          OpenAPI docs (FastAPI's default paths: /docs, /openapi.json)

Images from concurrent requests are gathered by a :class:`Batcher` into one ``Captioner.caption``
call per decoding setting (bounded queue, bounded wait), run in one model thread off the event
loop. The server reads only what is uploaded; it never fetches a URL.

Status codes: 200 captions; 400 a bad option or a malformed request; 413 a file or request over the
size limits; 422 an image that cannot be read (not an image, empty, truncated, too many pixels),
with every image's result or error; 503 (with Retry-After) when the queue is full or the model did
not answer within the request timeout. Every error body is JSON: ``{"error": "what is wrong"}``, plus
``"errors": [{"filename", "error"}]`` for per-file problems.
"""

# no "from __future__ import annotations": FastAPI reads the handlers' annotations at run time
import asyncio
import collections
import dataclasses
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from captioner.inference.captioner import Captioner, CaptionResult, DecodingSettings

log = logging.getLogger("captioner.serving.app")

WEB_DIR = Path(__file__).parent / "web"


@dataclass(frozen=True)
class ServeConfig:
    """The server's limits. Every one can be set on the command line (`captioner serve --help`)."""

    max_upload_bytes: int = 10 * 2**20  # one file
    max_request_bytes: int = 64 * 2**20  # the whole request body
    max_images: int = 16  # files per request
    max_pixels: int = 40_000_000  # per image, checked from its header before decoding
    max_beam: int = 10  # bounds beam, n_best and num_captions
    max_len: int = 50  # longest caption a client may ask for (words)
    timeout: float = 30.0  # seconds a request may wait for its captions
    max_batch: int = 16  # images in one model call (1: no batching); 16: the CPU's best (bench/README.md)
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for others
    max_queue: int = 256  # images waiting for the model; beyond: 503
    warm_up: bool = True  # caption one image at start-up so the first request is not slow

    def checked(self) -> "ServeConfig":
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "warm_up":
                continue
            if f.name == "max_wait_ms":
                if not 0 <= v <= 1000:
                    raise ValueError(f"--max-wait-ms {v}: must be from 0 to 1000")
            elif not (v > 0 and math.isfinite(v)):
                raise ValueError(f"--{f.name.replace('_', '-')} {v}: must be > 0")
        if self.max_images > self.max_queue:
            raise ValueError(f"--max-images {self.max_images} is more than the queue holds (--max-queue "
                             f"{self.max_queue} images): such a request could never be taken")
        if self.max_upload_bytes > self.max_request_bytes:
            raise ValueError(f"the upload limit per file ({self.max_upload_bytes} bytes) is larger than the request "
                             f"limit ({self.max_request_bytes} bytes); raise the request limit too")
        return self


class Busy(Exception):
    """The queue is full: the client should retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class _Job:
    images: list[bytes]
    settings: DecodingSettings
    future: asyncio.Future
    group: object | None  # None: may share a model call with other requests; else a call of its own


class Batcher:
    """Gathers the images of concurrent requests into batches for one model thread.

    One asyncio task takes the first waiting request, then more for up to ``max_wait`` seconds or
    until ``max_batch`` images are gathered, groups them by decoding settings and runs one
    ``Captioner.caption`` call per group in the model thread. Requests that arrive while the model is
    busy wait in the queue and form the next batch, so the batches grow with the load.
    Seeded sampling runs in a call of its own, so that its captions do not depend on other requests.

    ``batch_sizes`` keeps the number of images of each batch the model ran (the last 10000)."""

    def __init__(self, model: Captioner, *, max_batch: int = 16, max_wait: float = 0.005, max_queue: int = 256,
                 max_pixels: int | None = None):
        self.model, self.max_batch, self.max_wait, self.max_queue = model, max_batch, max_wait, max_queue
        self.max_pixels = max_pixels
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=10_000)
        self.batches = 0
        self.images = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captioner-model")
        self._seconds_per_image: collections.deque[float] = collections.deque(maxlen=50)
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting = 0  # images in the queue
        self.running = 0  # images in the model call under way (or waiting for the model thread)

    # -- event-loop side

    def start(self) -> None:
        """Start the batching task on the running event loop (again if that loop changed)."""
        loop = asyncio.get_running_loop()
        if self._task is not None and self._loop is loop and not self._task.done():
            return
        self._loop = loop
        self._queue = asyncio.Queue(self.max_queue)  # bounded in requests; and in images by submit()
        self._waiting = 0
        self._task = loop.create_task(self._run(), name="captioner-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def queued(self) -> int:
        """Images waiting for the model (not counting the call under way)."""
        return self._waiting if self._queue is not None else 0

    def retry_after(self) -> int:
        """Seconds after which the queue has probably room again (at least 1)."""
        per_image = (sum(self._seconds_per_image) / len(self._seconds_per_image)) if self._seconds_per_image else 0.1
        return max(1, math.ceil(per_image * (self.queued + self.running)))

    def submit(self, images: list[bytes], settings: DecodingSettings) -> asyncio.Future:
        """Queue one request's images; its future gets one CaptionResult per image, in order.
        Raises :class:`Busy` when the queue is full."""
        self.start()
        future = asyncio.get_running_loop().create_future()
        job = _Job(images, settings, future, object() if settings.sample and settings.seed is not None else None)
        if self._waiting + len(images) > self.max_queue:
            raise Busy(self.retry_after())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Busy(self.retry_after()) from None
        self._waiting += len(images)
        return future

    def _took(self, job: _Job) -> _Job:
        self._waiting -= len(job.images)
        return job

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            jobs = [self._took(await queue.get())]
            n = len(jobs[0].images)
            deadline = loop.time() + self.max_wait
            while n < self.max_batch:  # more requests: those already waiting, then those arriving in time
                try:
                    job = self._took(queue.get_nowait())
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        job = self._took(await asyncio.wait_for(queue.get(), remaining))
                    except asyncio.TimeoutError:
                        break
                jobs.append(job)
                n += len(job.images)
            try:
                await self._process(jobs)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug: fail these requests, keep serving the others
                log.exception("batch failed")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)

    async def _process(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        groups: dict[tuple, list[_Job]] = {}
        for j in jobs:
            if not j.future.done():  # a request that timed out while waiting is not run
                groups.setdefault((j.settings, j.group), []).append(j)
        for (settings, _), group in groups.items():
            images = [im for j in group for im in j.images]
            self.running = len(images)
            try:
                results = await loop.run_in_executor(self.executor, self._caption, images, settings)
            except Exception as e:  # not a bad image (those are in the results): a bug
                log.exception("model call failed")
                for j in group:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            finally:
                self.running = 0
            k = 0
            for j in group:
                part, k = results[k:k + len(j.images)], k + len(j.images)
                if not j.future.done():
                    j.future.set_result(part)

    # -- model-thread side

    def _caption(self, images: list[bytes], settings: DecodingSettings) -> list[CaptionResult]:
        start = time.perf_counter()
        results = self.model.caption(images, settings, return_attention=True, max_pixels=self.max_pixels,
                                     batch_size=self.max_batch, workers=0)
        seconds = time.perf_counter() - start
        for i in range(0, len(images), self.max_batch):  # caption() runs the model max_batch images at a time
            self.batch_sizes.append(len(images[i:i + self.max_batch]))
            self.batches += 1
        self.images += len(images)
        self._seconds_per_image.append(seconds / len(images))
        return results


# ----------------------------------------------------------------------------- options

class OptionError(ValueError):
    pass


def _as_bool(name: str, text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise OptionError(f"{name}: expected true or false, got {text!r}")


def _as_int(name: str, text: str, low: int, high: int, why: str = "") -> int:
    try:
        v = int(text.strip())
    except ValueError:
        raise OptionError(f"{name}: expected a whole number, got {text!r}") from None
    if not low <= v <= high:
        raise OptionError(f"{name} {v}: must be from {low} to {high}{why}")
    return v


def _as_float(name: str, text: str) -> float:
    try:
        v = float(text.strip())
    except ValueError:
        raise OptionError(f"{name}: expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise OptionError(f"{name}: expected a finite number, got {text!r}")
    return v


OPTIONS = {  # name: (DecodingSettings field or None, description for the docs)
    "beam": ("beam_size", "beam size (default: the model's)"),
    "n_best": ("n_best", "list the N best captions with their scores"),
    "max_len": ("max_len", "longest caption, in words (default: the model's)"),
    "attention": (None, "true: each result carries its words' attention over the grid"),
    "sample": ("sample", "true: draw captions from the model instead of a beam search"),
    "num_captions": ("num_captions", "with sample: captions drawn per image"),
    "temperature": ("temperature", "with sample: below 1 safer, above 1 more varied"),
    "top_k": ("top_k", "with sample: draw only from the K most likely words (0: all)"),
    "top_p": ("top_p", "with sample: nucleus sampling, in (0, 1]"),
    "seed": ("seed", "with sample: the same seed gives the same captions"),
}


def parse_options(values: Mapping[str, str], cfg: ServeConfig) -> tuple[dict[str, Any], bool]:
    """Decoding overrides and the attention flag from a request's fields (raw strings);
    OptionError for an unknown option or a bad value."""
    overrides: dict[str, Any] = {}
    attention = False
    limit = f" on this server (--max-beam {cfg.max_beam})"
    for name, text in values.items():
        if name not in OPTIONS:
            raise OptionError(f"unknown option {name!r}; options: {', '.join(OPTIONS)}")
        if name == "attention":
            attention = _as_bool(name, text)
        elif name == "sample":
            overrides["sample"] = _as_bool(name, text) or None
        elif name in ("beam", "n_best", "num_captions"):
            overrides[OPTIONS[name][0]] = _as_int(name, text, 1, cfg.max_beam, limit)
        elif name == "max_len":
            overrides["max_len"] = _as_int(name, text, 1, cfg.max_len, f" on this server (--max-len {cfg.max_len})")
        elif name == "top_k":
            overrides["top_k"] = _as_int(name, text, 0, 1_000_000)
        elif name == "seed":
            overrides["seed"] = _as_int(name, text, 0, 2**63 - 1)
        else:
            overrides[OPTIONS[name][0]] = _as_float(name, text)
    return overrides, attention


# ----------------------------------------------------------------------------- the app

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
            from fastapi.responses import JSONResponse

            response = JSONResponse(_too_large_body(self.limit), status_code=413, headers={"Connection": "close"})
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


def _too_large_body(limit: int) -> dict:
    return {"error": f"the request is larger than {_mb(limit)}, the limit of this server (--max-request-mb); "
                     "send fewer or smaller images per request"}


def _mb(n: int) -> str:
    return f"{n / 2**20:g} MB"


def _error(status: int, message: str, errors: list[dict] | None = None, headers: dict | None = None, **extra):
    from fastapi.responses import JSONResponse

    body: dict[str, Any] = {"error": message}
    if errors:
        body["errors"] = errors
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def result_json(r: CaptionResult, filename: str, attention: bool) -> dict:
    """One image's answer: its CaptionResult as JSON, named by the uploaded file's name."""
    if not r.ok:
        reason = r.error[len(r.source) + 2:] if r.error.startswith(f"{r.source}: ") else r.error
        return {"filename": filename, "error": f"{filename}: {reason}"}
    d = r.to_dict()
    d.pop("source")
    d.pop("attention", None)
    out = {"filename": filename, **d}
    if attention:
        out["attention"] = (None if r.attention is None
                            else [[round(x, 5) for x in row] for row in r.attention])
    return _finite(out)


def model_info(model: Captioner, name: str) -> dict:
    cfg = model.config
    enc = cfg.get("encoder") or {}
    return {"name": name, "architecture": cfg.get("arch"), "vocabulary_size": len(model.vocab),
            "attention": bool(model.decoder.has_attention),
            "encoder": {k: enc.get(k) for k in ("name", "image_size", "grid", "channels", "resize")},
            "decoding": model.settings.to_dict(), "metrics": _finite(cfg.get("metrics") or {})}


def _openapi_body(cfg: ServeConfig) -> dict:
    props: dict[str, Any] = {"images": {"type": "array", "items": {"type": "string", "format": "binary"},
                                        "description": f"one to {cfg.max_images} image files, each at most "
                                                       f"{_mb(cfg.max_upload_bytes)}"}}
    for name, (_, doc) in OPTIONS.items():
        props[name] = {"type": "string", "description": doc}
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": {"type": "object", "required": ["images"], "properties": props}}}},
        "parameters": [{"name": name, "in": "query", "required": False, "schema": {"type": "string"},
                        "description": f"{doc} (or as a form field)"} for name, (_, doc) in OPTIONS.items()],
    }


def create_app(model: Captioner, cfg: ServeConfig | None = None, *, name: str | None = None):
    """The FastAPI app serving ``model``. ``app.state.batcher`` is its :class:`Batcher`."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel
    from starlette.exceptions import HTTPException

    cfg = (cfg or ServeConfig()).checked()
    name = name or model.config.get("name") or "model"
    batcher = Batcher(model, max_batch=cfg.max_batch, max_wait=cfg.max_wait_ms / 1000, max_queue=cfg.max_queue,
                      max_pixels=cfg.max_pixels)

    @asynccontextmanager
    async def lifespan(app):
        if cfg.warm_up:  # the encoder is built and both networks run once before the first request
            await asyncio.get_running_loop().run_in_executor(batcher.executor, warm_up, model)
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            batcher.close()

    app = FastAPI(title="captioner", version=_version(), lifespan=lifespan,
                  description="Image captions with the words' attention over the photo. Upload images as "
                              "multipart files in the field `images`; the server never fetches URLs.")
    app.state.batcher = batcher
    app.state.config = cfg
    app.add_middleware(_BodyLimit, limit=cfg.max_request_bytes, paths=("/v1/captions",))

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

    @app.post("/v1/captions", summary="Caption uploaded images",
              responses={200: {"model": CaptionsAnswer}, 400: {"model": ErrorAnswer}, 413: {"model": ErrorAnswer},
                         422: {"model": ErrorAnswer}, 503: {"model": ErrorAnswer}},
              openapi_extra=_openapi_body(cfg))
    async def captions(request: Request):
        try:
            form = await request.form(max_files=cfg.max_images * 4, max_fields=4 * len(OPTIONS),
                                      max_part_size=64 * 1024)
        except RequestTooLarge:
            return _error(413, _too_large_body(cfg.max_request_bytes)["error"], headers={"Connection": "close"})
        except HTTPException as e:  # starlette's message for malformed multipart data
            return _error(400, f"bad multipart upload: {e.detail}")
        try:
            return await _captions(request, form)
        finally:
            await form.close()

    async def _captions(request: Request, form):
        from starlette.datastructures import UploadFile

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
        if not files:
            return _error(400, "no image: send one or more image files in the multipart field 'images' "
                               "(curl -F images=@photo.jpg http://HOST/v1/captions)")
        if len(files) > cfg.max_images:
            return _error(400, f"{len(files)} images in one request; this server takes at most {cfg.max_images} "
                               "(--max-images): split them over several requests")
        names = [(f.filename or "").strip()[:255] or f"image {k + 1}" for k, f in enumerate(files)]
        too_big = [{"filename": n, "error": f"{n}: {_mb(f.size)} is larger than the limit of "
                                            f"{_mb(cfg.max_upload_bytes)} a file (--max-upload-mb)"}
                   for n, f in zip(names, files) if f.size is not None and f.size > cfg.max_upload_bytes]
        if too_big:
            return _error(413, too_big[0]["error"] if len(too_big) == 1 else
                          f"{len(too_big)} files are larger than {_mb(cfg.max_upload_bytes)}", too_big)
        try:
            overrides, attention = parse_options(fields, cfg)
            settings = model.decoding_settings(**overrides)
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
        out = [result_json(r, n, attention) for r, n in zip(results, names)]
        bad = [o for o in out if "error" in o]
        if bad:
            message = bad[0]["error"] if len(bad) == 1 else f"{len(bad)} of {len(out)} images could not be read"
            return _error(422, message, bad, model=name, results=out)
        return JSONResponse({"model": name, "results": out})

    @app.get("/v1/health", summary="200 when the model is loaded and the server takes requests")
    async def health():
        return {"status": "ok", "model": name, "queued": batcher.queued, "batches": batcher.batches,
                "images": batcher.images}

    @app.get("/v1/models", summary="The model served: architecture, vocabulary, encoder, test metrics")
    async def models():
        return {"models": [model_info(model, name)],
                "limits": {"max_upload_bytes": cfg.max_upload_bytes, "max_images": cfg.max_images,
                           "max_pixels": cfg.max_pixels, "max_beam": cfg.max_beam, "max_len": cfg.max_len}}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def _version() -> str:
    from captioner import __version__

    return __version__


def warm_up(model: Captioner) -> None:
    """Run the encoder and decoder once on a small generated image."""
    from PIL import Image

    model.caption([Image.new("RGB", (64, 48), (120, 140, 160))], return_attention=True)


# ----------------------------------------------------------------------------- running it

def bind_socket(host: str, port: int):
    """A listening TCP socket on host:port (port 0: a free one); OSError with a clear message."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve this address ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                         "choose another port (--port) or stop the program using it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(model_name: str, cfg: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", threads: int | None = None) -> None:
    """Load the model, bind, and serve until interrupted (Ctrl-C / SIGTERM)."""
    try:
        import uvicorn
    except ImportError:
        raise ValueError("captioner serve needs FastAPI and uvicorn: pip install 'captioner[serve]'") from None
    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg = cfg.checked()
    sock = bind_socket(host, port)  # first: a port in use is reported before the model is loaded
    try:
        model = Captioner.from_pretrained(model_name)
        name = model.config.get("name") or Path(model_name).name
        app = create_app(model, cfg, name=name)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        print(f"captioner: serving {name} ({model.config.get('arch')}) on http://{shown}:{bound_port}/ "
              f"(API docs: /docs; batching: {'off' if cfg.max_batch == 1 else f'up to {cfg.max_batch} images'})",
              flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
