"""Feature extraction: run an image encoder over a set of images into a feature store
(:mod:`captioner.data.features`), resumably.

A rerun computes only the rows still to do; an existing store is finished only with the same
images, encoder and precision. The store's files are reserved on disk before any image is encoded.

Under torchrun (one node), every process fills the same files: rank r encodes the rows i with
i % world == r; rank 0 creates or checks the store first and writes meta.json last, after a barrier.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from captioner.data.features import (DONE, FAILED, TODO, FeatureStoreError, create_store, store_meta, stored_dims,
                                     write_meta)
from captioner.data.features import images_to_encode  # noqa: F401 - here before it moved (torch-free there)
from captioner.data.images import DEFAULT_MAX_PIXELS, display_name, name_fields, try_load_image
from captioner.encoders.tail import TailError, trunk_dims
from captioner.encoders.network import EncoderSpec, ImageEncoder, get_encoder_spec, image_to_array
from captioner.encoders.runtime import (OnnxImageEncoder, default_threads, precision_flags, resolve_runtime,
                                       store_precision, with_runtime)
from captioner.files import METADATA_BYTES, check_regular, read_bytes
from captioner.runtime.devices import check_precision, resolve_device
from captioner.runtime.distributed import env_world, one_node, process_group
from captioner.runtime.progress import progress_bar
from captioner.runtime.workers import check_workers, worker_init


class _DecodeDataset:
    """Loads and resizes images (run in DataLoader workers, so decoding overlaps the CNN)."""

    def __init__(self, root: Path, names: list[str], rows: list[int], spec, max_pixels):
        self.root, self.names, self.rows, self.spec, self.max_pixels = root, names, rows, spec, max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        name = self.names[row]
        path = self.root / name  # errors name it readably, even when it is not UTF-8
        img, err = try_load_image(path, max_pixels=self.max_pixels, name=display_name(str(path)))
        if img is None:
            return row, None, err
        return row, image_to_array(img, self.spec), None


def _collate(items):
    return items


def extract_features(
    image_root: str | Path,
    images: Sequence[str],
    out_dir: str | Path,
    *,
    encoder: str = "efficientnet-lite0",
    resize: str | None = None,
    image_size: int | None = None,
    batch_size: int = 8,
    workers: int = 1,
    max_pixels: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    limit_batches: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    cut: int = 0,
    grid: int | None = None,
    runtime: str = "auto",
    calibration: str | Path | None = None,
    head_start=None,
) -> dict:
    """Compute (or finish computing) the features of ``images`` into ``out_dir``.

    Returns a summary: rows computed now, rows already done, failures, images/s.
    ``limit_batches`` stops after that many batches (for tests and benchmarks).
    ``device`` runs the encoder there (cpu, cuda, auto); ``precision="bf16"`` under bfloat16 autocast
    (recorded in meta.json: a store is finished in the precision it was started in).
    ``runtime`` runs the encoder (:mod:`captioner.encoders.runtime`; onnx-int8, calibrated on the images of
    the folder ``calibration``, is recorded as precision int8: such a store is finished only with it).
    Under torchrun (WORLD_SIZE > 1, one node) each process encodes every WORLD_SIZE-th image into the
    same store, which ends up exactly as a single-process run leaves it.
    ``cut`` > 0 makes a trunk store: the maps before the encoder's last ``cut`` units
    (:mod:`captioner.encoders.tail`), what fine-tuning those units trains on. ``head_start``: a
    :class:`~captioner.encoders.head_start.HeadStart` started on ``image_root / name`` for every name, in order
    (``captioner features``); the grids it encoded of the first rows are taken when its encoder is this one.
    """
    check_workers(workers)
    dev = resolve_device(device)  # a GPU that is not there: an error before any file is touched
    check_precision(precision, dev)
    runtime = resolve_runtime(runtime, dev, precision, calibration)  # an unusable one: before any file
    _, world = env_world()
    if world > 1 and not one_node(world):
        raise FeatureStoreError(
            f"{out_dir}: feature extraction runs its ranks on one machine (they write one shared memory-mapped "
            f"store), but torchrun started {world} processes over several nodes; use `torchrun --standalone "
            "--nproc_per_node N` on one node, or one store per node (each with its own --splits)")
    with process_group() as group:
        return _extract(group, image_root, images, out_dir, encoder=encoder, resize=resize, image_size=image_size,
                        batch_size=batch_size, workers=workers, max_pixels=max_pixels, overwrite=overwrite,
                        progress=progress, limit_batches=limit_batches, device=dev, precision=precision, cut=cut,
                        grid=grid, runtime=runtime, calibration=calibration, head_start=head_start)


def _extract(group, image_root, images, out_dir, *, encoder, resize, image_size, batch_size, workers, max_pixels,
             overwrite, progress, limit_batches, device, precision, cut=0, grid=None, runtime="torch",
             calibration=None, head_start=None) -> dict:
    """extract_features in one process of ``group``: rank r encodes the rows i with i % world == r.

    Rank 0 alone creates (or checks) the store and finally writes meta.json; every rank writes its
    own rows into the shared memory maps (disjoint rows, so no two ranks write the same bytes), and
    the layout is exactly that of a single-process run. Alone (world 1) this is the whole job."""
    root, out = Path(image_root), Path(out_dir)
    names = list(images)
    if len(set(names)) != len(names):
        raise FeatureStoreError("the image list has duplicates; each image must appear once")
    try:
        spec = get_encoder_spec(encoder, resize=resize, image_size=image_size, grid=grid)
    except ValueError as e:
        raise FeatureStoreError(str(e)) from None
    if max_pixels is None:
        max_pixels = DEFAULT_MAX_PIXELS
    # the others wait for the files to exist
    meta, already, left = group.on_rank0(lambda: _open_store(out, root, names, spec,
                                                                        store_precision(runtime, precision),
                                                                        overwrite, cut))
    status = np.load(out / "status.npy", mmap_mode="r+")
    feats = np.load(out / "features.npy", mmap_mode="r+")
    # this rank's share; no other rank writes these rows, so reading their status here is safe
    todo = [int(i) for i in np.flatnonzero(status == TODO) if i % group.world == group.rank]
    t0 = time.perf_counter()
    done_now = failed_now = 0
    if todo:
        # an inference runtime: a session of one thread, called by as many threads as torch would use (each decodes
        # and encodes its own batches); torch: its own threads, and `workers` decoding processes
        enc = with_runtime(ImageEncoder(spec, device=device, precision=precision, cut=cut), runtime,
                           calibration=calibration, threads=1 if runtime != "torch" else None)
        threads = default_threads() if isinstance(enc, OnnxImageEncoder) else 1  # not when auto fell back to torch
        head = _head_rows(head_start, enc, root, names, todo)
        ds = _DecodeDataset(root, names, todo[len(head):], spec, max_pixels)
        done_now, failed_now = _encode_rows(enc, ds, out, status, feats, group=group, batch_size=batch_size,
                                            workers=workers, progress=progress, limit_batches=limit_batches,
                                            threads=threads, head=head)
    elif head_start is not None:
        head_start.stop()
    feats.flush()
    status.flush()
    group.barrier()  # every rank's rows are written
    secs = time.perf_counter() - t0
    done_now, failed_now = (int(v) for v in group.sum([done_now, failed_now]))
    complete = bool((status != TODO).all())
    if group.rank == 0:
        write_meta(out, meta, complete=complete)
    group.barrier()  # meta.json is final when any rank returns
    summary = {
        "store": str(out),
        "images": len(names),
        "computed": done_now,
        "already_done": already,
        "failed": int((status == FAILED).sum()),
        "complete": complete,
        "seconds": round(secs, 2),
        "images_per_second": round((done_now + failed_now) / secs, 2) if secs > 0 and left else None,
    }
    if group.world > 1:
        summary["ranks"] = group.world
    return summary


def _head_rows(head_start, enc, root: Path, names: list[str], todo: list[int]) -> list[np.ndarray]:
    """The grids ``head_start`` encoded of the first rows, when those are the first rows to do and its encoder is
    ``enc`` (else none)."""
    if head_start is None:
        return []
    got = head_start.take(enc)
    if head_start.sources != [str(root / name) for name in names]:
        return []
    n = 0
    while n < min(len(got), len(todo)) and todo[n] == n:
        n += 1
    return [outputs[0] for _, _, outputs in got[:n]]


def _open_store(out: Path, root: Path, names: list[str], spec: EncoderSpec, precision: str,
                overwrite: bool, cut: int = 0) -> tuple[dict, int, bool]:
    """Create or check the store (rank 0); returns its meta, rows already done, rows left to do."""
    encoder = spec.to_dict()
    if cut:
        try:
            grid, channels = trunk_dims(spec, cut)
        except TailError as e:
            raise FeatureStoreError(f"--cut {cut}: {e}") from None
        encoder.update(cut=cut, trunk_grid=grid, trunk_channels=channels)
    grid, channels = stored_dims(encoder)
    meta = store_meta(encoder, [len(names), grid[0] * grid[1], channels], root, names, precision)
    out.mkdir(parents=True, exist_ok=True)
    fresh = overwrite or not (out / "meta.json").exists()
    if not fresh:
        _check_resumable(out, meta)
    if fresh:
        create_store(out, names, meta)
    status = np.load(check_regular(out / "status.npy", "the store's status.npy"), mmap_mode="r")
    left = bool((status == TODO).any())
    if left:  # only when rows will be written: a finished store is not touched
        for p in (out / "status.npy", out / "features.npy"):
            _reserve_disk_space(p, out, len(names))
    return meta, int((status == DONE).sum()), left


def _encode_rows(enc: ImageEncoder, ds: _DecodeDataset, out: Path, status: np.ndarray, feats: np.ndarray, *,
                 group, batch_size: int, workers: int, progress: bool, limit_batches: int | None,
                 threads: int = 1, head: list | None = None) -> tuple[int, int]:
    """Decode and encode this rank's rows ``ds.rows`` into the memory maps; returns (rows done, rows failed).
    ``head``: the grids of the first rows, already encoded (:mod:`captioner.encoders.head_start`). With an inference
    runtime (``threads`` > 1: a session of one thread, called from that many threads) each thread decodes and
    encodes its own batches; with torch, ``workers`` processes decode while torch's threads encode."""
    ranks = f" (rank 0 of {group.world}, its share)" if group.world > 1 else ""
    bar = progress_bar(total=len(ds.rows) + len(head or ()), unit="img", desc=f"features {enc.spec.name}{ranks}",
                       disable=not progress or group.rank != 0)
    done_now = failed_now = 0
    # every rank appends whole lines (one write each, O_APPEND): lines never interleave
    with open(out / "errors.jsonl", "a") as errlog:
        if head:
            rows = np.arange(len(head))
            feats[rows] = np.stack(head).astype(np.float16)  # data first ...
            status[rows] = DONE  # ... then the done mark
            done_now += len(head)
            bar.update(len(head))
        batches = _threaded_batches(enc, ds, batch_size, threads) if threads > 1 else \
            _loader_batches(enc, ds, batch_size, workers)
        try:
            for b, (batch, grid) in enumerate(batches):
                if limit_batches is not None and b >= limit_batches:
                    break
                for r, _, e in batch:
                    if e is not None:
                        errlog.write(json.dumps({**name_fields("image", ds.names[r]), "error": e}) + "\n")
                        errlog.flush()
                        status[r] = FAILED
                        failed_now += 1
                if grid is not None:
                    rows = np.array([r for r, a, _ in batch if a is not None])
                    feats[rows] = grid.astype(np.float16)  # data first ...
                    status[rows] = DONE  # ... then the done mark
                    done_now += len(rows)
                bar.update(len(batch))
                if b % 50 == 0:
                    feats.flush()
                    status.flush()
        finally:
            batches.close()  # the threaded batches: nothing more started, the running ones finished
    bar.close()
    return done_now, failed_now


def _encoded_batch(enc, batch: list) -> tuple[list, np.ndarray | None]:
    """(the batch's (row, array, error) items, the grids of its readable images as float32 numpy, or None)."""
    good = [a for _, a, _ in batch if a is not None]
    return batch, (enc.encode_arrays(np.stack(good)).cpu().numpy() if good else None)


def _loader_batches(enc, ds: _DecodeDataset, batch_size: int, workers: int):
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
        prefetch_factor=4 if workers > 0 else None, persistent_workers=False,
        worker_init_fn=worker_init() if workers > 0 else None,  # a worker ends with this process
    )
    for batch in loader:
        yield _encoded_batch(enc, batch)


def _threaded_batches(enc, ds: _DecodeDataset, batch_size: int, threads: int):
    """The batches in order, each decoded and encoded by one of ``threads`` threads (JPEG decoding, resizing and
    ONNX Runtime's calls all release the GIL): every core decodes and encodes, with no process to pass arrays to.
    At most two batches a thread are ahead of the caller."""
    def job(start: int):
        return _encoded_batch(enc, [ds[i] for i in range(start, min(start + batch_size, len(ds)))])

    starts = iter(range(0, len(ds), batch_size))
    with ThreadPoolExecutor(threads, thread_name_prefix="captioner-features") as pool:
        window = deque(pool.submit(job, i) for i in itertools.islice(starts, 2 * threads))
        try:
            while window:
                result = window.popleft().result()
                window.extend(pool.submit(job, i) for i in itertools.islice(starts, 1))
                yield result
        finally:
            for f in window:
                f.cancel()


def _check_resumable(out: Path, meta: dict) -> None:
    """An existing store may be finished only with the same images, encoder and precision."""
    try:
        old = json.loads(read_bytes(out / "meta.json", "the store's meta.json", METADATA_BYTES).decode("utf-8"))
    except (ValueError, OSError) as e:
        raise FeatureStoreError(f"{out / 'meta.json'}: damaged ({e}); use a new output directory or --overwrite") \
            from None
    if not isinstance(old, dict):
        raise FeatureStoreError(f"{out / 'meta.json'}: not a feature store's meta.json; use a new output "
                                "directory or --overwrite")
    if old.get("fingerprint") != meta["fingerprint"] or old.get("shape") != meta["shape"]:
        raise FeatureStoreError(
            f"{out}: this store was made from other images or another encoder "
            f"({(old.get('encoder') if isinstance(old.get('encoder'), dict) else {}).get('name')}, "
            f"{old.get('shape')}); "
            "use a new output directory or --overwrite"
        )
    was = old.get("precision", "fp32")  # stores from before precision was recorded are fp32
    if was != meta["precision"]:
        raise FeatureStoreError(f"{out}: this store was started in {was} precision; finish it with "
                                f"{precision_flags(was)}, or start again with --overwrite")


def _reserve_disk_space(path: Path, out: Path, n_images: int) -> None:
    """Allocate the disk blocks of a store file before writing through its memory map.

    The arrays are created sparse; a write through a memory map into a hole on a full disk
    cannot fail with an error, the kernel kills the process with SIGBUS instead. Reserving the
    blocks up front (cheap where they are already allocated) turns that into a clear error
    before any image is encoded. Filesystems without the call are left as they are."""
    if not hasattr(os, "posix_fallocate"):
        return
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise FeatureStoreError(
                f"{out}: not enough disk space for the feature store ({path.name}: {size / 2**20:.1f} MiB for "
                f"{n_images} images; {e.strerror}). Free some space or choose another --out, then rerun: rows "
                "already done are kept") from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)
