"""The `captioner` command: prepare, features, train, evaluate, caption, serve, synth."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


def _beams(text: str) -> list[int]:
    try:
        beams = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected beam sizes like 1,3,5, got {text!r}") from None
    if not beams or min(beams) < 1:
        raise argparse.ArgumentTypeError("beam sizes must be >= 1")
    return beams


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _number(text: str, ok, what: str, cast=float):
    try:
        v = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if v != v or not ok(v):  # NaN fails every bound
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return v


def _positive_float(text: str) -> float:
    return _number(text, lambda v: 0 < v < float("inf"), "a number > 0")


def _nonneg_float(text: str) -> float:
    return _number(text, lambda v: 0 <= v < float("inf"), "a number >= 0")


def _nonneg_int(text: str) -> int:
    return _number(text, lambda v: v >= 0, "a whole number >= 0", int)


def _seed(text: str) -> int:
    return _number(text, lambda v: 0 <= v < 2 ** 63, "a whole number from 0 to 2**63-1", int)


def _unit_interval(text: str) -> float:
    return _number(text, lambda v: 0 < v <= 1, "in (0, 1]")


def _ratios(text: str) -> tuple[float, float, float]:
    try:
        r = tuple(float(x) for x in text.split(","))
    except ValueError:
        r = ()
    if len(r) != 3 or not all(0 <= x <= 1 for x in r) or abs(sum(r) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"expected three ratios train,val,test summing to 1, got {text!r}")
    return r


def _finite(obj):
    """``obj`` with every non-finite float (NaN, inf) replaced by None: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def print_json(obj, **kw) -> None:
    """Print one line of strict JSON (never NaN or Infinity, which are not JSON)."""
    print(json.dumps(_finite(obj), allow_nan=False), **kw)


# ----------------------------------------------------------------------------- prepare

def cmd_prepare(a: argparse.Namespace) -> int:
    from captioner.data.corpus import CorpusError
    from captioner.data.readers import read_corpus
    from captioner.data.text import Vocab, length_report, write_json_atomic

    kwargs = {"strict": a.strict, "dedupe": a.dedupe}
    fmt = a.format
    src = a.source
    if a.extra and fmt != "coco":
        raise CorpusError(f"unexpected extra arguments {a.extra}: only the coco format takes several files")
    if fmt in ("kaggle", "coco", "folder"):
        kwargs.update(ratios=a.split_ratios, seed=a.split_seed)
    if fmt == "karpathy":
        kwargs["restval"] = a.restval
    if fmt == "flickr8k-text":
        kwargs.update(text_dir=src, image_dir=a.images)
    elif fmt == "karpathy":
        kwargs.update(json_path=src, image_dir=a.images)
    elif fmt == "kaggle":
        kwargs.update(csv_path=src, image_dir=a.images)
    elif fmt == "coco":
        kwargs.update(annotation_files=[src, *a.extra], image_dir=a.images)
    elif fmt == "folder":
        kwargs.update(captions_file=src, image_dir=a.images)
    out = Path(a.out)
    check_prepare_out(out, a.overwrite)
    corpus = read_corpus(fmt, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    train_tokens = [t for it in corpus.split("train") for t in it.tokens]
    vocab = Vocab.build(train_tokens, min_freq=a.min_freq, max_size=a.max_words)
    corpus.save(out / "corpus.json")
    vocab.save(out / "vocab.json")
    lengths = length_report(train_tokens, a.max_len)
    report = {**corpus.report.to_dict(), "vocab_size": len(vocab), "train_caption_lengths": lengths}
    write_json_atomic(out / "report.json", report, indent=1)
    print(corpus.report.summary())
    print(f"vocabulary: {len(vocab)} entries (min_freq={a.min_freq}, max_words={a.max_words})")
    print(f"train captions longer than {a.max_len} words (truncated in training): {lengths['truncated']}"
          f" of {lengths['captions']}")
    print(f"wrote {out / 'corpus.json'}, {out / 'vocab.json'}, {out / 'report.json'}")
    skipped = corpus.report.skipped_count()
    if skipped:
        print(f"{skipped} entr{'y was' if skipped == 1 else 'ies were'} skipped (listed above and in "
              f"{out / 'report.json'}); --strict makes that an error", file=sys.stderr)
        return 1
    return 0


PREPARE_OUTPUTS = ("corpus.json", "vocab.json", "report.json")


def check_prepare_out(out: Path, overwrite: bool) -> None:
    """``prepare`` never replaces a prepared corpus silently."""
    from captioner.data.corpus import CorpusError

    if out.exists() and not out.is_dir():
        raise CorpusError(f"--out {out}: exists and is not a folder; give a folder for corpus.json, vocab.json "
                          "and report.json")
    found = [name for name in PREPARE_OUTPUTS if (out / name).exists()]
    if found and not overwrite:
        raise CorpusError(f"--out {out}: already holds a prepared corpus ({', '.join(found)}); nothing was "
                          "changed. Use another --out folder, or --overwrite to replace it")


# ----------------------------------------------------------------------------- features

def cmd_features(a: argparse.Namespace) -> int:
    from captioner.data.corpus import Corpus
    from captioner.encoders.features import FeatureStoreError, extract_features
    from captioner.data.images import list_images

    if a.corpus:
        corpus = Corpus.load(a.corpus)
        splits = set(a.splits.split(",")) if a.splits else None
        unknown = (splits or set()) - set(corpus.splits())
        if unknown:
            raise FeatureStoreError(f"--splits: no split named {sorted(unknown)} in {a.corpus} "
                                    f"(splits: {', '.join(corpus.splits())})")
        names = [it.image for it in corpus.items if splits is None or it.split in splits]
        root = corpus.image_root
    else:
        root = Path(a.images)
        if not root.is_dir():
            raise FeatureStoreError(f"{root}: not a folder")
        names = [str(p.relative_to(root)) for p in list_images(root)]
    if not names:
        raise FeatureStoreError(f"no images to encode in {a.corpus or a.images}")
    summary = extract_features(root, names, a.out, encoder=a.encoder, resize=a.resize, image_size=a.image_size,
                               batch_size=a.batch_size, workers=a.workers, max_pixels=a.max_pixels,
                               overwrite=a.overwrite, progress=not a.quiet, device=a.device,
                               precision=a.precision)
    from captioner.runtime.distributed import env_world

    if env_world()[0] == 0:  # under torchrun, one summary (rank 0's holds the totals of all ranks)
        print_json(summary)
        if summary["failed"]:
            print(f"{summary['failed']} image(s) could not be read; see {Path(a.out) / 'errors.jsonl'}",
                  file=sys.stderr)
    return 1 if summary["failed"] else 0


# ----------------------------------------------------------------------------- train / evaluate

def cmd_train(a: argparse.Namespace) -> int:
    from captioner.config import load_config
    from captioner.training.loop import TrainConfig, train

    cfg = load_config(TrainConfig, a.config, a.overrides)
    if a.device is not None:  # the command line wins over the config file
        cfg.device = a.device
    if a.precision is not None:
        cfg.precision = a.precision
    from captioner.runtime.distributed import env_world

    summary = train(cfg, resume=a.resume, on_start=_warn_if_busy if env_world() == (0, 1) else None)
    if env_world()[0] == 0:  # under torchrun, rank 0 alone prints
        print_json({k: v for k, v in summary.items() if k != "history"})
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from captioner.evaluation.evaluate import evaluate_model

    res = evaluate_model(a.model, a.corpus, a.features, split=a.split, beams=a.beam, out=a.out, limit=a.limit or 0,
                         allow_unk=a.allow_unk, device=a.device, precision=a.precision,
                         length_penalty=a.length_penalty, no_repeat_ngram=a.no_repeat_ngram)
    print(res["markdown"])
    for k, s in res["seconds"].items():
        print(f"beam {k}: {s} s")
    return 0


# ----------------------------------------------------------------------------- caption

def cmd_caption(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from captioner.data.images import expand_image_args
    from captioner.inference.captioner import Captioner

    images = expand_image_args(a.images)
    if not images:
        raise ValueError(f"no images to caption in {' '.join(a.images)}")
    if a.attention:
        from captioner.viz import figure_format

        figure_format(a.attention)  # an unsupported figure format is a bad command, before any work
    model = Captioner.from_pretrained(a.model, device=a.device, precision=a.precision)
    settings = model.decoding_settings(  # checked (bounds, sampling vs beam options) before any image is read
        beam_size=a.beam, n_best=a.n_best, max_len=a.max_len, length_penalty=a.length_penalty,
        no_repeat_ngram=a.no_repeat_ngram, allow_unk=a.allow_unk or None, sample=a.sample or None,
        num_captions=a.num_captions, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    if a.attention and not model.decoder.has_attention:
        raise ValueError(f"--attention: the model {a.model} ({model.config['arch']}) has no attention over image "
                         "regions, so there is no map to draw; use an attention model (sat, bahdanau-gru, "
                         "gru-residual, transformer)")
    crop = model.config.get("encoder", {}).get("resize") == "center-crop"
    status = 0
    # a progress bar on stderr when the captions would scroll past a screen; results stream to stdout
    bar = tqdm(total=len(images), unit="img", desc="caption", disable=a.quiet or len(images) <= 24,
               dynamic_ncols=True, file=sys.stderr)
    results = model.iter_captions(images, settings, return_attention=bool(a.attention), max_pixels=a.max_pixels,
                                  keep_images=bool(a.attention), workers=a.workers, batch_size=a.batch_size)
    for k, r in enumerate(results):
        bar.update(1)
        if r.ok and a.attention:
            from captioner.viz import attention_figure

            target = Path(a.attention)
            if len(images) > 1:
                target = target.with_name(f"{target.stem}-{k:03d}-{Path(r.source).stem}{target.suffix or '.png'}")
            try:
                attention_figure(r.image, r.words, r.attention, r.grid, target, title=r.caption, center_crop=crop)
                r.attention_figure = str(target)
            except OSError as e:  # this image's figure only: the other images go on
                r.error = f"{r.source}: cannot write the attention figure {target}: {e.strerror or e}"
        if not r.ok:
            bar.clear()
            print(f"error: {r.error}", file=sys.stderr)
            if a.json:  # keep one line per image for scripts
                print_json({"image": r.source, "error": r.error}, flush=True)
            status = 1
            continue
        listed = r.samples if settings.sample else r.n_best
        if a.json:
            obj = {"image": r.source, "caption": r.caption, "score": r.score}
            if settings.n_best > 1:
                obj["n_best"] = [{"caption": c.caption, "score": c.score} for c in r.n_best]
            if settings.sample:
                obj["samples"] = [{"caption": c.caption, "score": c.score} for c in r.samples]
            if a.attention:
                obj["attention_figure"] = r.attention_figure
            print_json(obj, flush=True)
        else:
            print(f"{r.source}: {r.caption}", flush=True)
            if len(listed) > 1:
                for j, h in enumerate(listed, 1):
                    print(f"  {j}. {h.caption}  ({h.score:.3f})")
            if a.attention:
                print(f"  attention figure: {r.attention_figure}")
    bar.close()
    return status


# ----------------------------------------------------------------------------- serve

def cmd_serve(a: argparse.Namespace) -> int:
    from captioner.serving.app import ServeConfig, serve

    cfg = ServeConfig(max_upload_bytes=round(a.max_upload_mb * 2**20),
                      max_request_bytes=round(a.max_request_mb * 2**20), max_images=a.max_images, max_pixels=a.max_pixels, max_beam=a.max_beam, max_len=a.max_len,
                      timeout=a.timeout, max_batch=1 if a.no_batching else a.max_batch, max_wait_ms=a.max_wait_ms,
                      max_queue=a.max_queue)
    serve(a.model, cfg.checked(), host=a.host, port=a.port, log_level=a.log_level, threads=a.threads)
    return 0


# ----------------------------------------------------------------------------- synth

def cmd_synth(a: argparse.Namespace) -> int:
    from captioner.data.synthetic import make_shapes_dataset

    path = make_shapes_dataset(a.out, a.n, size=a.size, seed=a.seed)
    print(f"wrote {a.n} images and {path}")
    return 0


def _device_options(s: argparse.ArgumentParser, default: str | None = "cpu", where: str = "") -> None:
    """--device and --precision (checked when the command runs: an absent GPU is exit status 2)."""
    s.add_argument("--device", default=default, metavar="{cpu,cuda,auto}",
                   help="where the networks run: cpu (default), cuda (cuda:N for one GPU) or auto, a GPU when "
                        f"there is one{where}")
    s.add_argument("--precision", choices=["fp32", "bf16"], default=None if default is None else "fp32",
                   help="bf16: bfloat16 autocast, for GPUs with bfloat16 units (default fp32)")


def _decoding_options(s: argparse.ArgumentParser) -> None:
    """How beam search ranks and filters captions; by default the model's own settings."""
    s.add_argument("--length-penalty", type=_nonneg_float, default=None,
                   help="rank beam hypotheses by score / length**P (default: the model's, 0 = raw log-probability)")
    s.add_argument("--no-repeat-ngram", type=_nonneg_int, default=None, metavar="N",
                   help="never repeat an N-word sequence within a caption (default: the model's; 0 = off)")


def build_parser() -> argparse.ArgumentParser:
    from captioner import __version__

    p = argparse.ArgumentParser(prog="captioner", description="Image captioning that works offline on a CPU.")
    p.add_argument("--version", action="version", version=f"captioner {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare", help="read a dataset into corpus.json + vocab.json + report.json")
    s.add_argument("format", choices=["flickr8k-text", "karpathy", "kaggle", "coco", "folder"])
    s.add_argument("source", help="flickr8k-text: the Flickr8k_text folder; karpathy: dataset_*.json; "
                                  "kaggle: captions.txt; coco: captions_*.json; folder: CSV/JSONL of captions")
    s.add_argument("extra", nargs="*", help="coco: more captions_*.json files")
    s.add_argument("--images", required=True, help="folder holding the images")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--min-freq", type=_positive, default=5, help="words rarer than this in train become <unk>")
    s.add_argument("--max-words", type=_positive, default=None, help="keep at most this many words (top-k)")
    s.add_argument("--max-len", type=_positive, default=30, help="caption length (words) reported for truncation")
    s.add_argument("--strict", action="store_true", help="fail on any problem instead of reporting and skipping")
    s.add_argument("--dedupe", action="store_true",
                   help="drop an image's repeated captions (default: report them and keep every reference)")
    s.add_argument("--split-ratios", type=_ratios, default=(0.9, 0.05, 0.05),
                   help="train,val,test ratios of the hash split used when the source has no split")
    s.add_argument("--split-seed", type=int, default=0, help="seed of the hash split")
    s.add_argument("--restval", choices=["train", "keep"], default="train",
                   help="karpathy: put 'restval' images into train (default) or keep them apart")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the corpus.json, vocab.json and report.json already in --out")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("features", help="cache encoder grids of images (resumable)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--corpus", help="corpus.json from `captioner prepare`")
    g.add_argument("--images", help="a folder of images (all of them)")
    s.add_argument("--splits", default=None, help="only these splits of the corpus, e.g. train,val")
    s.add_argument("--out", required=True, help="feature store folder")
    s.add_argument("--encoder", default="efficientnet-lite0")
    s.add_argument("--resize", choices=["squash", "center-crop"], default=None)
    s.add_argument("--image-size", type=_positive, default=None)
    s.add_argument("--batch-size", type=_positive, default=8)
    s.add_argument("--workers", type=int, default=1, help="image decoding processes (0: decode in this process)")
    s.add_argument("--max-pixels", type=_positive, default=None, help="decompression-bomb limit")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true")
    _device_options(s)
    s.set_defaults(func=cmd_features)

    s = sub.add_parser("train", help="train a captioning model", description="Overrides: key=value, e.g. "
                       "optim.lr=3e-4 optim.epochs=10 model.hidden_dim=256 data.corpus=... out_dir=...")
    s.add_argument("--config", default=None, help="YAML config (see configs/)")
    s.add_argument("--resume", action="store_true", help="continue from out_dir/last.pt")
    s.add_argument("overrides", nargs="*", help="key=value overrides")
    _device_options(s, default=None, where=" (default: the config's device, cpu)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="score a model on a split (JSON + Markdown)")
    s.add_argument("--model", required=True)
    s.add_argument("--corpus", required=True)
    s.add_argument("--features", required=True)
    s.add_argument("--split", default="test")
    s.add_argument("--beam", type=_beams, default=[1, 3, 5], help="beam sizes, e.g. 1,3,5")
    s.add_argument("--limit", type=_positive, default=None, help="only the first N images")
    s.add_argument("--out", default=None, help="folder for metrics.json, metrics.md, captions.json")
    s.add_argument("--allow-unk", action="store_true", help="let captions contain <unk> (default: never, "
                   "as in `captioner caption`)")
    _decoding_options(s)
    _device_options(s)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("caption", help="caption images with a model (default: the bundled one)")
    s.add_argument("images", nargs="+", help="image files, folders (recursively), quoted globs ('photos/*.jpg'), "
                   "or - for one path per line on stdin")
    s.add_argument("--model", default="flickr8k-sat", help="model directory or bundled model name")
    s.add_argument("--beam", type=_positive, default=None, help="beam size (default: the model's, 3)")
    s.add_argument("--n-best", type=_positive, default=None, help="also list the N best captions with scores")
    s.add_argument("--json", action="store_true", help="one JSON object per line per image")
    s.add_argument("--attention", default=None, metavar="OUT.png", help="write an attention figure")
    s.add_argument("--max-pixels", type=_positive, default=64_000_000, help="decompression-bomb limit")
    s.add_argument("--allow-unk", action="store_true", help="let captions contain <unk> (unknown word)")
    s.add_argument("--max-len", type=_positive, default=None, help="longest caption in words (default: the model's)")
    _decoding_options(s)
    g = s.add_argument_group("sampling (instead of beam search)")
    g.add_argument("--sample", action="store_true", help="draw captions from the model's distribution")
    g.add_argument("--num-captions", type=_positive, default=None, help="captions to draw per image (default 1)")
    g.add_argument("--temperature", type=_positive_float, default=None,
                   help="below 1: safer; above 1: more varied (default 1)")
    g.add_argument("--top-k", type=_nonneg_int, default=None, help="draw only from the K most likely words (0 = all)")
    g.add_argument("--top-p", type=_unit_interval, default=None,
                   help="draw only from the most likely words whose probabilities reach P (nucleus sampling)")
    g.add_argument("--seed", type=_seed, default=None, help="the same seed gives the same captions")
    s.add_argument("--workers", type=_nonneg_int, default=None,
                   help="image decoding processes (default: 1 for more than one batch; 0: decode in this process)")
    s.add_argument("--batch-size", type=_positive, default=16, help="images encoded and decoded together")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    _device_options(s)
    s.set_defaults(func=cmd_caption)

    s = sub.add_parser("serve", help="a REST API and a web page (needs the serve extra)",
                       description="Serve a model: the web page at /, POST /v1/captions, GET /v1/health, "
                                   "GET /v1/models, API docs at /docs. Images come only from uploads: the server "
                                   "never fetches URLs.")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_nonneg_int, default=8000, help="port (default 8000; 0: any free port)")
    s.add_argument("--model", default="flickr8k-sat", help="model directory or bundled model name")
    g = s.add_argument_group("limits")
    g.add_argument("--max-upload-mb", type=_positive_float, default=10.0, help="largest file (default 10 MB)")
    g.add_argument("--max-request-mb", type=_positive_float, default=64.0, help="largest request (default 64 MB)")
    g.add_argument("--max-images", type=_positive, default=16, help="images per request (default 16)")
    g.add_argument("--max-pixels", type=_positive, default=40_000_000,
                   help="largest image in pixels, checked before decoding (default 40 million)")
    g.add_argument("--max-beam", type=_positive, default=10, help="largest beam, n-best and number of samples "
                   "a client may ask for (default 10)")
    g.add_argument("--max-len", type=_positive, default=50, help="longest caption a client may ask for (default 50)")
    g.add_argument("--timeout", type=_positive_float, default=30.0,
                   help="seconds a request may wait for its captions, then 503 (default 30)")
    g.add_argument("--max-queue", type=_positive, default=256, help="images waiting for the model; more get 503 "
                   "with Retry-After (default 256)")
    g = s.add_argument_group("micro-batching")
    g.add_argument("--max-batch", type=_positive, default=16,
                   help="images of concurrent requests captioned together (default 16; 1: no batching)")
    g.add_argument("--max-wait-ms", type=_nonneg_float, default=5.0,
                   help="how long a batch waits for more images when the model is idle (default 5 ms)")
    g.add_argument("--no-batching", action="store_true", help="one image per model call (same as --max-batch 1)")
    s.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    s.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("synth", help="write the synthetic shapes dataset (own-folder format)")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=_positive, default=300)
    s.add_argument("--size", type=int, default=96)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)
    return p


# Exit statuses (README, "Exit status"): the same for every command.
EXIT_OK = 0  # everything done
EXIT_SOME_FAILED = 1  # some inputs failed (each named on stderr), the rest done
EXIT_BAD_INPUT = 2  # bad command, configuration or file: nothing (more) done
EXIT_INTERNAL = 3  # a bug in captioner (CAPTIONER_DEBUG=1 shows the traceback)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_PIPE_CLOSED = 141  # the reader of stdout went away, e.g. `| head` (128 + SIGPIPE)


def _stdout_is_broken() -> bool:
    """True when stdout is a pipe or socket whose reader has gone away."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() on this platform, or stdout closed
        return True


def _os_error_message(e: OSError) -> str:
    """``FILE: what went wrong`` for an error from the operating system (and a hint for a full disk)."""
    import errno

    where = f"{e.filename}: " if e.filename else ""
    hint = "; is the disk full? Free some space and run the command again" if e.errno in (errno.ENOSPC,
                                                                                         errno.EDQUOT) else ""
    return f"{where}{e.strerror or e}{hint}"


def set_wait_policy(command: str) -> None:
    """How OpenMP's idle threads wait, set before torch is imported unless the user has chosen
    (OMP_WAIT_POLICY). Spinning collapses when another process shares the cores (features went from
    2.9 to 5.8 images/s with it off, on 2 busy cores), so every command sleeps (PASSIVE) but
    ``train``: a training job is the long one that has the machine to itself, and spinning makes it
    1.2x faster then (bench/README.md); :func:`cmd_train` warns when the machine is already busy."""
    if "torch" not in sys.modules and command != "train":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _warn_if_busy() -> None:
    """Spinning threads lose many times over to another busy process (two spinning jobs on 2 cores:
    24x slower each); say so when training starts on a machine that is already loaded."""
    try:
        cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average on this system: nothing to say
        return
    if os.environ.get("OMP_WAIT_POLICY") is None and load >= 0.75 * cores:
        print(f"note: this machine is busy (load average {load:.1f} on {cores} cores). Training's threads spin while "
              "they wait, which is fastest alone but slows every job sharing the cores many times over; for jobs "
              "at the same time, start each with OMP_WAIT_POLICY=PASSIVE", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_wait_policy(args.command)
    debug = bool(os.environ.get("CAPTIONER_DEBUG"))
    try:
        status = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe is reported here, not at interpreter exit
        return status
    except BrokenPipeError:
        if not _stdout_is_broken():  # some other pipe: a real error
            if debug:
                raise
            print("error: broken pipe", file=sys.stderr)
            return EXIT_BAD_INPUT
        # stdout's reader is gone (`captioner caption *.jpg | head -1`): stop quietly, like any Unix tool;
        # the rest of the output goes nowhere, so Python's exit-time flush cannot complain either
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_PIPE_CLOSED
    except (ValueError, OSError) as e:  # bad input: files, formats, configs (all our errors are ValueErrors)
        if debug:
            raise
        print(f"error: {_os_error_message(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError:
        if debug:
            raise
        print("error: not enough memory for this command; use smaller sizes (batch size, model sizes, "
              "max pixels) or a machine with more memory", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # not a user's mistake: a bug; one line, the traceback on request
        if debug:
            raise
        print(f"error: internal error ({type(e).__name__}: {e}); this is a bug in captioner. "
              "Run again with CAPTIONER_DEBUG=1 to see the traceback, and please report it", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
