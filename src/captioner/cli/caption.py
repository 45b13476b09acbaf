"""`captioner caption`: images in, captions out (text, or JSON lines), with n-best lists and attention figures."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from captioner.cli.args import (decoding_flags, decoding_overrides, device_options, model_arg, model_option, positive,
                                print_json, runtime_options, workers)
from captioner.data.images import DEFAULT_MAX_PIXELS, display_name, expand_image_args, name_fields
from captioner.decoding.settings import SETTINGS
from captioner.inference import DEFAULT_MODEL
from captioner.inference.results import CaptionResult
from captioner.runtime.progress import progress_bar
from captioner.runtime.workers import MAX_WORKERS
from captioner.viz import attention_figure, figure_format

SAMPLING = [name for name, s in SETTINGS.items() if s.applies == "sample" or name == "sample"]


def add_parser(sub) -> None:
    s = sub.add_parser("caption", help="caption images with a model (default: the bundled one)")
    s.add_argument("images", nargs="+", help="image files, folders (recursively), quoted globs ('photos/*.jpg'), "
                   "or - for one path per line on stdin")
    model_option(s, what=" (their log-probabilities averaged at each word)")
    s.add_argument("--json", action="store_true", help="one JSON object per line per image")
    s.add_argument("--attention", default=None, metavar="OUT.png", help="write an attention figure")
    s.add_argument("--max-pixels", type=positive, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit")
    decoding_flags(s, [name for name in SETTINGS if name not in SAMPLING])
    decoding_flags(s.add_argument_group("sampling (instead of beam search)"), SAMPLING)
    s.add_argument("--workers", type=workers, default=None,
                   help=f"image decoding processes, up to {MAX_WORKERS} (default: 1 for more than one batch; 0: "
                        "decode in this process)")
    s.add_argument("--batch-size", type=positive, default=32, help="images encoded and decoded together")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    device_options(s, captioning=True)
    runtime_options(s)
    s.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    images = expand_image_args(a.images)
    if not images:
        raise ValueError(f"no images to caption in {' '.join(a.images)}")
    if a.attention:
        figure_format(a.attention)  # an unsupported figure format is a bad command, before any work
    a.model = model_arg(a, DEFAULT_MODEL)  # several: one ensemble
    overrides = decoding_overrides(a)
    for name, value in overrides.items():  # each flag's own type and bounds before the model loads (seconds)
        if value is not None:  # None: not given
            SETTINGS[name].check(value)
    # the first images encoded while torch is imported (encoders/head_start.py), stopped however this ends
    with _head_start(a, images) as head:
        import torch

        from captioner.inference.captioner import Captioner  # torch: not for `captioner --help` or a bad flag

        model = Captioner.from_pretrained(a.model, device=a.device, precision=a.precision, runtime=a.runtime,
                                          calibration=a.calibration)
        settings = model.decoding_settings(**overrides)  # with the model's defaults, checked before any image is read
        threads = torch.get_num_threads()
        if len(images) > a.batch_size:  # a pipeline of batches: the encoder's runtime and the decoder share the cores
            model.share_cores()
        try:
            return _caption_all(model, images, settings, a, head)
        finally:
            torch.set_num_threads(threads)  # as it was (main() may be called in a process that goes on)


def _head_start(a: argparse.Namespace, images: list[str]):
    """A head start on ``images`` (a context that stops it; an empty one otherwise) when the encoder will run on ONNX
    Runtime in float32 on the CPU (a guess from the flags: the captioner takes its work only if its encoder is the one
    the head start ran)."""
    if a.runtime not in ("auto", "onnx") or a.device != "cpu" or a.precision == "bf16" or a.attention:
        return contextlib.nullcontext()
    from captioner.encoders.head_start import HeadStart, caption_key

    models = list(a.model) if isinstance(a.model, (list, tuple)) else [a.model]
    return HeadStart.start(caption_key([str(m) for m in models], a.runtime), images, max_pixels=a.max_pixels)


def _caption_all(model, images: list[str], settings, a: argparse.Namespace, head=None) -> int:
    if a.attention and not model.decoder.has_attention:
        raise ValueError(f"--attention: the model {model.source} ({model.config['arch']}) has no attention over image "
                         "regions, so there is no map to draw; use an attention model (sat, bahdanau-gru, "
                         "gru-residual, transformer)")
    crop = model.config.get("encoder", {}).get("resize") == "center-crop"
    status = 0
    # a progress bar on stderr when the captions would scroll past a screen; results stream to stdout
    bar = progress_bar(total=len(images), unit="img", desc="caption", disable=a.quiet or len(images) <= 24)
    results = model.iter_captions(images, settings, return_attention=bool(a.attention), max_pixels=a.max_pixels,
                                  keep_images=bool(a.attention), workers=a.workers, batch_size=a.batch_size,
                                  head_start=head)
    for k, r in enumerate(results):
        bar.update(1)
        if r.ok and a.attention:
            _write_figure(r, _figure_path(a.attention, k, r.source, several=len(images) > 1), crop)
        if not r.ok:
            bar.clear()
            status = 1
        _show(r, a, settings.n_best > 1, settings.sample)
    bar.close()
    return status


def _figure_path(attention: str, k: int, source: str, *, several: bool) -> Path:
    target = Path(attention)
    stem = display_name(Path(source).stem)  # a figure's name is valid UTF-8 even when the image's is not
    return target.with_name(f"{target.stem}-{k:03d}-{stem}{target.suffix or '.png'}") if several \
        else target


def _write_figure(r: CaptionResult, target: Path, crop: bool) -> None:
    try:
        attention_figure(r.image, r.words, r.attention, r.grid, target, title=r.caption, center_crop=crop)
        r.attention_figure = str(target)
    except OSError as e:  # this image's figure only: the other images go on
        r.error = f"{r.source}: cannot write the attention figure {target}: {e.strerror or e}"


def _show(r: CaptionResult, a: argparse.Namespace, n_best: bool, sample: bool) -> None:
    """One image's result on stdout (an error on stderr too; with --json, always one line per image).

    A file name that is not valid UTF-8 is shown with U+FFFD for its undecodable bytes, and the JSON line
    gives its exact bytes too ("image_b64", :func:`captioner.data.images.name_fields`)."""
    shown = display_name(r.source)
    d = r.to_dict("image", shown, detail=False, n_best=n_best, attention=False)
    if not r.ok:
        print(f"error: {d['error']}", file=sys.stderr)
    if a.json:
        print_json({**d, **name_fields("image", r.source)}, flush=True)
        return
    if not r.ok:
        return
    print(f"{shown}: {r.caption}", flush=True)
    listed = r.samples if sample else r.n_best
    if len(listed) > 1:
        for j, h in enumerate(listed, 1):
            print(f"  {j}. {h.caption}  ({h.score:.3f})")
    if a.attention:
        print(f"  attention figure: {r.attention_figure}")
