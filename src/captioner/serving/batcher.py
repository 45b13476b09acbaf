"""The micro-batcher: the images of concurrent requests gathered into model calls, in one model thread.

:class:`Batcher` takes requests (:meth:`Batcher.submit`) into a bounded queue and runs one
``Captioner.caption`` call per decoding setting (the words to mention included) in its model thread, off the
event loop, so that a word one request asks for never reaches another's captions or fails them; a full queue
is :class:`Busy` (503 with Retry-After). :meth:`Batcher.drain` (SIGTERM) answers every request not yet in a
model call with :class:`ShuttingDown` and lets the call under way finish.
"""

import asyncio
import collections
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from PIL import Image

from captioner.decoding.settings import DecodingSettings
from captioner.inference.captioner import Captioner
from captioner.inference.guidance import MentionError
from captioner.inference.results import CaptionResult

log = logging.getLogger(__name__)


def warm_up(model: Captioner) -> None:
    """Caption one small generated image: the encoder is built and both networks run once. A model that
    cannot (its weights give non-finite probabilities: :class:`~captioner.decoding.search.NonFiniteError`)
    is a ValueError naming it, so that the server refuses to start with it."""
    (result,) = model.caption([Image.new("RGB", (64, 48), (120, 140, 160))], return_attention=True)
    if not result.ok:
        raise ValueError(f"{model.source}: cannot caption a plain test image ({result.error})")


class Busy(Exception):
    """The queue is full: the client should retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Busy):
    """The server is draining (SIGTERM): the request was not captioned; another replica, or this server once
    restarted, will take it."""


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
        self.draining = False  # drain() was called: no new request is taken
        self.on_batch: Callable[[int], None] | None = None  # called (in the model thread) with each batch's size

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

    def drain(self) -> None:
        """Stop taking requests (SIGTERM): those waiting in the queue, and any submitted from now on, get
        :class:`ShuttingDown` at once; the model call under way finishes and its requests get their captions."""
        self.draining = True
        while self._queue is not None and not self._queue.empty():
            job = self._took(self._queue.get_nowait())
            if not job.future.done():
                job.future.set_exception(ShuttingDown(1))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def warm_up(self) -> None:
        """Run the encoder and decoder once on a small generated image, in the model thread, so that the
        first request is not slow (not counted in the batch statistics); a model that cannot caption it
        (weights giving non-finite probabilities) is refused with a ValueError naming it."""
        await asyncio.get_running_loop().run_in_executor(self.executor, warm_up, self.model)

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
        Raises :class:`Busy` when the queue is full, :class:`ShuttingDown` once the server drains."""
        if self.draining:
            raise ShuttingDown(1)
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
            if self.draining:  # gathered but not started when SIGTERM came: not run
                for j in group:
                    if not j.future.done():
                        j.future.set_exception(ShuttingDown(1))
                continue
            images = [im for j in group for im in j.images]
            self.running = len(images)
            try:
                results = await loop.run_in_executor(self.executor, self._caption, images, settings)
            except Exception as e:  # not a bad image (those are in the results): a word it cannot say, or a bug
                if isinstance(e, MentionError):  # the client's (a 400): these requests asked for the same words
                    log.info("not captioned: %s", e)
                else:
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
            if self.on_batch is not None:
                self.on_batch(len(images[i:i + self.max_batch]))
        self.images += len(images)
        self._seconds_per_image.append(seconds / len(images))
        return results
