"""The one inference path: images in, typed results out (the CLI, the server and Python use it).

    from captioner import Captioner
    model = Captioner.from_pretrained("flickr8k-sat")
    for r in model.iter_captions(["a.jpg", "b.jpg"], beam_size=5, n_best=3):
        print(r.source, r.caption if r.ok else r.error)

- :class:`~captioner.decoding.settings.DecodingSettings` is every choice of how captions are decoded
  (beam, length, n-best, banned words, sampling). A model directory stores its defaults (``config.json``
  "decoding"); caption, evaluate and training's validation all decode through
  :func:`captioner.decoding.search.generate`.
- :class:`~captioner.inference.results.CaptionResult` is one image's answer, or its error: an unreadable
  image is reported in its result and the others go on.
- :meth:`Captioner.iter_captions` decodes and resizes images in worker processes while the
  network runs on the previous batch, and yields each result, in input order, as soon as its
  batch is done.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections import OrderedDict, deque
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from captioner.data.images import DEFAULT_MAX_PIXELS
from captioner.data.text import Vocab, join_tokens
from captioner.decoding.search import NonFiniteError
from captioner.decoding.settings import DecodingSettings
from captioner.encoders.head_start import HeadStart
from captioner.encoders.network import ImageEncoder, get_encoder_spec
from captioner.encoders.tail import TailError, load_tail
from captioner.encoders.runtime import resolve_runtime, with_runtime
from captioner.inference import DEFAULT_MODEL
from captioner.inference.encoder_file import EncoderFileError, read_encoder_file
from captioner.inference.guidance import Decoded, Guide
from captioner.inference.ensemble_dir import ModelArg, encoder_dir, load_model, model_name, several
from captioner.inference.modeldir import ModelDirError, save_model_dir
from captioner.inference.prepared import Prepared, PrepareDataset, as_list, prepare
from captioner.inference.results import Caption, CaptionResult
from captioner.models.base import Decoder
from captioner.models.extension import VocabExtension
from captioner.runtime.devices import autocast, check_precision, resolve_device, split_precision
from captioner.runtime.workers import check_workers, worker_init


# images per encoder call: ONNX Runtime's one thread took 9.1-9.4 CPU ms an image in calls of 2 against 10.1-10.2 in
# calls of 8 (a call's activations stay in the core's cache; bench/README.md)
ENCODER_BATCH = 2
# guided decoding: images to search again are gathered until there are this many, or this many batches wait
AGAIN_IMAGES, AGAIN_BATCHES = 48, 8
ENCODE_AHEAD = 3  # batches the encoder thread may run ahead of the decoder


_ENCODERS: "OrderedDict[tuple, Any]" = OrderedDict()  # the last few encoders built, shared by Captioners
_ENCODERS_LOCK = threading.Lock()
SHARED_ENCODERS = 4


def _shared_encoder(key: tuple, build):
    """The encoder ``key`` names, built once per process (an encoder in inference mode holds no per-call state; a
    Captioner made again, as the tests and a server's reload do, reuses it instead of folding the net again)."""
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = build()
            while len(_ENCODERS) > SHARED_ENCODERS:
                _ENCODERS.popitem(last=False)
        _ENCODERS.move_to_end(key)
        return _ENCODERS[key]


class Captioner:
    """Image in, caption out. ``Captioner.from_pretrained("flickr8k-sat").caption(["a.jpg"])``.

    ``device`` (cpu, cuda, cuda:N, auto) is where the encoder and the decoder run; ``precision``
    ``"bf16"`` runs them under bfloat16 autocast, ``"fp32"`` in float32, and ``"auto"`` (default) the encoder in
    float32 and the decoder in bfloat16 on a CPU with bfloat16 instructions
    (:func:`captioner.runtime.devices.split_precision`). ``runtime`` runs the image encoder
    (:mod:`captioner.encoders.runtime`: auto, torch, onnx, onnx-int8; ``calibration``: the image folder
    onnx-int8 is calibrated on the first time)."""

    def __init__(self, decoder: Decoder, vocab: Vocab, config: dict, *, device: str | torch.device = "cpu",
                 precision: str = "auto", extension: VocabExtension | None = None,
                 encoder_weights: tuple[dict[str, torch.Tensor], int] | None = None, runtime: str = "auto",
                 calibration: str | os.PathLike | None = None):
        self.device = resolve_device(device)
        self.precision = check_precision(precision, self.device, allow_auto=True, default="auto")
        self.encoder_precision, self.decoder_precision = split_precision(self.precision, self.device)
        self.runtime = resolve_runtime(runtime, self.device, self.encoder_precision, calibration)  # unusable: now
        self.calibration = calibration  # onnx-int8's calibration images (encoders/quantize.py)
        self.decoder, self.vocab, self.config = decoder.to(self.device).eval(), vocab, config
        try:
            self.settings = DecodingSettings.from_model(config)  # this model's decoding defaults
        except (TypeError, ValueError) as e:
            raise ModelDirError(f"config.json: its decoding defaults are not usable: {e}") from None
        self._encoder = None
        self.encoder_threads: int | None = None  # an inference runtime's threads (None: torch's; share_cores)
        self._all_threads: int | None = None  # torch's threads before share_cores
        self.encoder_weights = encoder_weights  # a fine-tuned encoder's (weights, units) (inference/encoder_file.py)
        if (config.get("encoder") or {}).get("tuned") and encoder_weights is None:
            raise ModelDirError("config.json says the encoder was fine-tuned (encoder.tuned), but no tuned weights were "
                                "given; load the directory with Captioner.from_pretrained, which reads them")
        self._specials = {vocab.pad_id, vocab.start_id, vocab.end_id}
        # concepts, mentions and the words the model was taught after training (captioner.inference.guidance)
        self.guide = Guide(self.decoder, vocab, config, extension)
        self.source = str(config.get("name") or "the model")  # how errors name it (from_pretrained: its path)

    @classmethod
    def from_pretrained(cls, name_or_path: ModelArg = DEFAULT_MODEL, *, device: str | torch.device = "cpu",
                        precision: str = "auto", runtime: str = "auto",
                        calibration: str | os.PathLike | None = None) -> "Captioner":
        """A model directory or bundled name (an ensemble's directory too), or a list of them: one ensemble."""
        encoder_precision = split_precision(precision, resolve_device(device))[0]  # before loading anything
        resolve_runtime(runtime, resolve_device(device), encoder_precision, calibration)  # an unusable runtime too
        decoder, vocab, config, extension = load_model(name_or_path)
        where = encoder_dir(name_or_path[0] if several(name_or_path) else name_or_path)
        try:
            tuned = read_encoder_file(where, config)
            if tuned is not None:  # names and shapes now, not at the first caption
                e = config["encoder"]
                load_tail(get_encoder_spec(e["name"], resize=e.get("resize"), image_size=e.get("image_size"),
                                           grid=e.get("grid")).build(), *tuned, str(where / "encoder.safetensors"))
        except (EncoderFileError, TailError) as e:
            raise ModelDirError(str(e)) from None
        model = cls(decoder, vocab, config, device=device, precision=precision, extension=extension,
                    encoder_weights=tuned, runtime=runtime, calibration=calibration)
        model.source = model_name(name_or_path)
        return model

    def save_pretrained(self, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Path:
        extra = {k: v for k, v in self.config.items() if k not in ("format", "version", "arch", "model")}
        return save_model_dir(path, self.decoder, self.vocab, extra, dtype=dtype, extension=self.guide.extension,
                              encoder_weights=self.encoder_weights[0] if self.encoder_weights else None)

    @property
    def encoder(self):
        if self._encoder is None:
            e = self.config.get("encoder")
            if not e:
                raise ModelDirError("this model's config.json names no encoder, so it can only caption features "
                                    "(decode_features), not images")
            def build():
                spec = get_encoder_spec(e["name"], resize=e.get("resize"), image_size=e.get("image_size"),
                                        grid=e.get("grid"))
                weights, units = self.encoder_weights or (None, 0)
                return with_runtime(ImageEncoder(spec, device=self.device, precision=self.encoder_precision,
                                                 tuned=weights, tuned_units=units),
                                    self.runtime, calibration=self.calibration, threads=self.encoder_threads)

            # the same encoder (spec, tuned weights' digest, device, precision, runtime) is built once per process
            key = (json.dumps(e, sort_keys=True), str(self.device), self.encoder_precision, self.runtime,
                   str(self.calibration), self.encoder_threads)
            self._encoder = _shared_encoder(key, build)
        return self._encoder

    def share_cores(self) -> None:
        """For a process that captions many images (the ``caption`` command): when the encoder runs on an inference
        runtime (its own thread pool) on the CPU, give it half of torch's threads and the decoder the rest, since
        :meth:`iter_captions` encodes the next batch while this one is decoded. Two pools of all the cores each
        would take turns on them: on 2 cores, one thread each took 0.92x the CPU time (bench/README.md). Once the
        encoder has encoded the last batch of a call, the decoder gets all the threads back. Changes torch's thread
        count for the process; call it before the first caption."""
        cores = torch.get_num_threads()
        if self.runtime == "torch" or self.device.type != "cpu" or cores < 2 or self._encoder is not None:
            return
        self.encoder_threads = cores - cores // 2
        self._all_threads = cores  # the decoder takes them all back once the encoder has nothing left to do
        torch.set_num_threads(cores // 2)

    def decoding_settings(self, settings: DecodingSettings | None = None, **overrides: Any) -> DecodingSettings:
        """``settings`` (default: the model's own) with ``overrides`` applied, checked."""
        return (settings or self.settings).replace(**overrides)

    def decode_features(self, features: torch.Tensor, settings: DecodingSettings | None = None, *,
                        seed_offset: int = 0, **overrides: Any):
        """Hypotheses per image for a batch of encoder features (B, P, C); their word ids are those of
        ``self.guide.vocab`` (the model's vocabulary, then the words added to it: decode them with that). A
        model whose log-probabilities hold NaN or infinity is a
        :class:`~captioner.decoding.search.NonFiniteError` (a ValueError) naming it."""
        return self._decode(features, self.decoding_settings(settings, **overrides), seed_offset)[0]

    def _decode(self, features: torch.Tensor, s: DecodingSettings, seed_offset: int):
        """(hypotheses, concepts) of a batch of features, with settings already checked; a hypothesis's
        word ids are those of ``self.guide.vocab`` (the model's words, then any it was taught after)."""
        with self._running():
            return self.guide.generate(features.to(self.device), s, seed_offset=seed_offset)

    @contextmanager
    def _running(self):
        """The decoder runs in its precision; non-finite log-probabilities name this model."""
        try:
            with autocast(self.device, self.decoder_precision):
                yield
        except NonFiniteError as e:
            raise e.naming(self.source) from None

    def caption(self, images: Sequence[Any] | Any, settings: DecodingSettings | None = None, **kw: Any
                ) -> list[CaptionResult]:
        """Caption image paths, bytes or PIL images: one :class:`CaptionResult` per image, in order
        (a single image gives a list of one). Options as for :meth:`iter_captions`."""
        single = not isinstance(images, (list, tuple))
        return list(self.iter_captions([images] if single else images, settings, **kw))

    def iter_captions(self, images: Iterable[Any], settings: DecodingSettings | None = None, *,
                      return_attention: bool = False, max_pixels: int | None = None, batch_size: int = 32,
                      workers: int | None = None, keep_images: bool = False, seed_offset: int = 0,
                      head_start: HeadStart | None = None, **overrides: Any) -> Iterator[CaptionResult]:
        """Yield one :class:`CaptionResult` per image, in input order, each batch as soon as it is done (with
        concepts or mentions, the images to search again are gathered over up to ``AGAIN_BATCHES`` batches first).

        ``overrides`` are fields of :class:`DecodingSettings` (beam_size=5, n_best=3, sample=True, ...).
        Paths are loaded and resized in ``workers`` processes (default: 1 when there is more than one
        batch) while the network runs; bytes and PIL images in this process. ``max_pixels`` (default
        :data:`captioner.data.images.DEFAULT_MAX_PIXELS`) refuses larger images before decoding them.
        With a seed, the k-th readable image draws from the stream ``(seed, seed_offset + k)``. ``head_start``: the
        :class:`~captioner.encoders.head_start.HeadStart` the caller started on the same ``images`` with the same
        ``max_pixels`` before importing torch (the ``caption`` command); what it encoded is taken, the batches staying
        those of a call without it."""
        s = self.decoding_settings(settings, **overrides)
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: must be >= 1")
        spec = self.encoder.spec
        limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        items = [(im, im if isinstance(im, str) else os.fspath(im) if isinstance(im, os.PathLike) else f"image {i}")
                 for i, im in enumerate(images)]
        ready, lead = self._head_started(head_start, items, batch_size, keep_images or head_start is not None
                                         and head_start.max_pixels != limit)
        items = items[sum(len(b) for b in ready):]
        all_paths = all(isinstance(src, (str, os.PathLike)) for src, _ in items)
        workers = check_workers(workers) if workers is not None else 1 if len(items) > batch_size else 0
        if workers > 0 and all_paths:
            loader = torch.utils.data.DataLoader(PrepareDataset(items, spec, limit, keep_images),
                                                 batch_size=batch_size, num_workers=workers, collate_fn=as_list,
                                                 prefetch_factor=4, worker_init_fn=worker_init())  # die with us
            batches: Iterable[list[Prepared]] = loader
        else:
            batches = ([prepare(src, name, spec, limit, keep_images) for src, name in items[i:i + batch_size]]
                       for i in range(0, len(items), batch_size))
        batches = itertools.chain(ready, iter(batches))  # iter: the loader's workers start decoding now
        readable = 0  # readable images so far: the k-th draws from the random stream (seed, seed_offset + k)
        held: list[tuple[list[Prepared], Decoded]] = []  # decoded batches waiting for their images' re-search
        ahead = _Ahead()
        for batch, feats in self._encoded(batches, ahead, lead):
            self._cores_back(ahead)
            decoded = Decoded([], None)
            if feats is not None:
                decoded = self._first_pass(*feats, s, seed_offset + readable)
                readable += len(feats[0])
            held.append((batch, decoded))
            # images to search again for their words are gathered over a few batches: one search for many
            # images costs much less than one per batch (the results still come out in order)
            waiting = sum(len(d.again) for _, d in held)
            if waiting == 0 or waiting >= AGAIN_IMAGES or len(held) >= AGAIN_BATCHES:
                self._cores_back(ahead)
                yield from self._flush(held, s, return_attention)
                held = []
        yield from self._flush(held, s, return_attention)

    def _head_started(self, head_start: HeadStart | None, items: list[tuple[Any, str]], batch_size: int,
                      refuse: bool) -> tuple[list["_Encoded"], tuple[torch.Tensor, torch.Tensor | None] | None]:
        """(the whole batches ``head_start`` encoded of ``items``, as :meth:`_encoded` yields them; the features of
        the images it encoded after them, the first of the next batch, or None): nothing when it ran on other images
        or another encoder, or when ``refuse`` (the images themselves to be kept, another pixel limit)."""
        if head_start is None:
            return [], None
        got = head_start.take(self.encoder)
        if refuse or head_start.sources != [src for src, _ in items[:len(head_start.sources)]]:
            return [], None
        tuned = self.encoder_weights is not None  # as _encode_chunk: the concept head's input apart only then

        def features(part):
            return (torch.from_numpy(np.stack([o[0] for _, _, o in part])),
                    torch.from_numpy(np.stack([o[1] for _, _, o in part])) if tuned and len(part[0][2]) > 1 else None)

        whole = len(got) // batch_size * batch_size
        ready = []
        for i in range(0, whole, batch_size):
            part = got[i:i + batch_size]
            batch = _Encoded(Prepared(items[i + j][1], array, size) for j, (array, size, _) in enumerate(part))
            batch.features = features(part)
            ready.append(batch)
        return ready, features(got[whole:]) if len(got) > whole else None

    def _cores_back(self, ahead: "_Ahead") -> None:
        """With :meth:`share_cores`: all of torch's threads to the decoder once the encoder has encoded every batch
        (before the next search, which may be a long search again)."""
        if self._all_threads and torch.get_num_threads() != self._all_threads and ahead.idle():
            torch.set_num_threads(self._all_threads)

    def _first_pass(self, feats: torch.Tensor, concept_feats: torch.Tensor | None, s: DecodingSettings,
                    seed_offset: int) -> Decoded:
        with self._running():
            return self.guide.first_pass(feats.to(self.device), s, seed_offset=seed_offset,
                                         concept_features=concept_feats)

    def _flush(self, held: list[tuple[list[Prepared], Decoded]], s: DecodingSettings,
               return_attention: bool) -> Iterator[CaptionResult]:
        """The results of the held batches, in order, after the re-search of the images that need one."""
        with self._running():
            self.guide.search_again([d for _, d in held], s)
        for batch, decoded in held:
            concepts = decoded.concepts if decoded.concepts is not None else [None] * len(decoded.hyps)
            it = iter(zip(decoded.hyps, concepts))
            for p in batch:
                yield (CaptionResult(p.source, error=p.error) if p.error is not None
                       else self._result(p, *next(it), s, return_attention))

    def _chunks(self, batch: list[Prepared], skip: int = 0) -> list[np.ndarray]:
        """The readable images of a batch (but the first ``skip``) as the encoder's calls take them: ``ENCODER_BATCH``
        at a time (the encoder runs fastest in small batches that stay in cache, as `features` does; the decoder gains
        from large ones)."""
        good = [p.array for p in batch if p.error is None][skip:]
        return [np.stack(good[i:i + ENCODER_BATCH]) for i in range(0, len(good), ENCODER_BATCH)]

    def _encode_chunk(self, chunk: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(grids, the concept head's input when a tuned encoder gives it apart, else None): for any other encoder
        the grids are all the head needs (their mean is its input)."""
        enc = self.encoder
        return enc.encode_all(chunk) if self.encoder_weights is not None else (enc.encode_arrays(chunk), None)

    def _encoded(self, batches: Iterable[list[Prepared]], ahead: "_Ahead",
                 lead: tuple[torch.Tensor, torch.Tensor | None] | None = None
                 ) -> Iterator[tuple[list[Prepared], tuple[torch.Tensor, torch.Tensor | None] | None]]:
        """(batch, its features) with the next batches' encoder running in a thread while the caller decodes
        this one: the decoder's small matrix products leave a core idle that the encoder's convolutions fill.
        Up to ``ENCODE_AHEAD`` batches are encoded ahead, so that the encoder keeps working while the caller
        searches several batches again for their concepts. With :meth:`share_cores` (an inference runtime, one
        thread of its own), a caller that would wait for a batch encodes its chunks that the encoder's thread has not
        started yet itself, so neither core idles while the other has encoding to do. ``ahead`` tells the caller
        when the encoder's thread has nothing left to do. ``lead``: the features of the first readable images of the
        first batch not already encoded (the head start's), which are not encoded again."""
        share = bool(self._all_threads)
        if share:  # the decoder's half while the encoder works
            torch.set_num_threads(self._all_threads // 2)
        pending = ahead.pending  # (batch, [(chunk, its future)])
        with ThreadPoolExecutor(1, thread_name_prefix="captioner-encoder") as pool:
            try:
                for batch in batches:
                    if isinstance(batch, _Encoded):  # by the head start
                        pending.append((batch, [(None, _done(batch.features))]))
                        continue
                    jobs, skip = ([], 0) if lead is None else ([(None, _done(lead))], len(lead[0]))
                    lead = None
                    jobs += [(c, pool.submit(self._encode_chunk, c)) for c in self._chunks(batch, skip)]
                    pending.append((batch, jobs))
                    if len(pending) > ENCODE_AHEAD:
                        done, jobs = pending.popleft()
                        yield done, self._collect(jobs, steal=share)
                ahead.complete = True
                while pending:
                    done, jobs = pending.popleft()
                    yield done, self._collect(jobs, steal=share)
            finally:  # also when the caller stops early or an error ends it: nothing more encoded, all threads back
                for _, jobs in pending:
                    for _, f in jobs:
                        f.cancel()
                if share and torch.get_num_threads() != self._all_threads:
                    torch.set_num_threads(self._all_threads)

    def _collect(self, jobs: list, *, steal: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """A batch's features from its chunks' futures; with ``steal``, a chunk the encoder's thread has not started
        is encoded here instead of waited for (the runtime's session takes calls from several threads at once). Every
        chunk not started is taken back at once, before any is encoded: taken one by one in order, each would be
        started by the encoder's thread while this one waits for the one before."""
        taken = [steal and f.cancel() for _, f in jobs]
        mine = {i: self._encode_chunk(c) for i, ((c, _), t) in enumerate(zip(jobs, taken)) if t}  # before waiting
        return _joined([mine[i] if t else f.result() for i, ((_, f), t) in enumerate(zip(jobs, taken))])

    def _result(self, p: Prepared, hyps, concepts, s: DecodingSettings, return_attention: bool) -> CaptionResult:
        best, vocab = hyps[0], self.guide.vocab
        # words and their attention rows together, skipping any special token the model emitted
        keep = [i for i, t in enumerate(best.tokens) if t not in self._specials]
        listed = [Caption(join_tokens(vocab.decode(h.tokens)), round(h.norm_score, 4)) for h in hyps]
        r = CaptionResult(p.source, caption=join_tokens([vocab.itos[best.tokens[i]] for i in keep]),
                          score=round(best.norm_score, 4), n_best=listed[:1] if s.sample else listed,
                          samples=listed if s.sample else None, words=[vocab.itos[best.tokens[i]] for i in keep],
                          grid=tuple(self.config["encoder"]["grid"]), image_size=tuple(p.size), image=p.image,
                          concepts=concepts)
        if return_attention and self.decoder.has_attention:
            r.attention = best.attention[keep].tolist() if best.attention is not None else []
        return r


class _Encoded(list):
    """A batch of :class:`Prepared` whose ``features`` (grids, concept inputs) are already computed."""

    features: tuple[torch.Tensor, torch.Tensor | None]


def _done(result) -> Future:
    f: Future = Future()
    f.set_result(result)
    return f


class _Ahead:
    """The batches handed to the encoder's thread and not yet taken by the decoder (``pending``: each batch with its
    chunks and their futures), and whether every batch has been handed over (``complete``)."""

    def __init__(self):
        self.pending: deque = deque()
        self.complete = False

    def idle(self) -> bool:
        """The encoder's thread has nothing left to do: every batch handed over and encoded."""
        return self.complete and all(f.done() for _, jobs in self.pending for _, f in jobs)


def _joined(parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The chunks' (grids, concept inputs) as one batch's; None for a batch without a readable image."""
    if not parts:
        return None
    concepts = [c for _, c in parts if c is not None]
    return torch.cat([g for g, _ in parts]), torch.cat(concepts) if concepts else None
