"""Filling a feature store's rows, whatever runs the encoder (imports no torch): the store opened or checked, the
images decoded and resized, the rows written with their done marks, the failures logged, the summary.

:func:`captioner.encoders.extract.extract_features` runs it with the encoder it builds (torch, or ONNX Runtime
through :mod:`captioner.encoders.runtime`); :mod:`captioner.encoders.quick_features` runs it without importing
torch at all, with the exported encoder the last run named.
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
from typing import Callable, Iterator

import numpy as np

from captioner.data.features import (DONE, FAILED, TODO, FeatureStoreError, create_store, store_meta, stored_dims,
                                     write_meta)
from captioner.data.images import display_name, image_to_array, name_fields, try_load_image
from captioner.files import METADATA_BYTES, check_regular, read_bytes
from captioner.runtime.progress import progress_bar


def precision_flags(precision: str) -> str:
    """The flags that finish a store recorded in ``precision`` (what runtime.store_precision wrote)."""
    return "--runtime onnx-int8" if precision == "int8" else f"--precision {precision} (and any runtime but onnx-int8)"


class DecodeDataset:
    """Loads and resizes the images of ``rows`` (in DataLoader workers, or in the threads that encode them)."""

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


def collate(items):
    return items


def fill_store(group, root: Path, names: list[str], out: Path, encoder: dict, precision: str, overwrite: bool,
               encode: Callable[[list[int], np.ndarray, np.ndarray], tuple[int, int]]) -> dict:
    """Open (or create) the store ``out`` of ``names`` under ``root`` made by ``encoder`` (its spec as a dict, a trunk
    store's cut and dimensions too) in ``precision``, have ``encode(rows, status, feats)`` fill this rank's rows
    still to do (it returns rows done and rows failed), and finish the store; returns the summary.

    Rank 0 alone creates (or checks) the store and finally writes meta.json; every rank writes its own rows into
    the shared memory maps (disjoint rows, so no two ranks write the same bytes), and the layout is exactly that of
    a single-process run. Alone (world 1) this is the whole job."""
    if len(set(names)) != len(names):
        raise FeatureStoreError("the image list has duplicates; each image must appear once")
    # the others wait for the files to exist
    meta, already, left = group.on_rank0(lambda: open_store(out, root, names, encoder, precision, overwrite))
    status = np.load(out / "status.npy", mmap_mode="r+")
    feats = np.load(out / "features.npy", mmap_mode="r+")
    # this rank's share; no other rank writes these rows, so reading their status here is safe
    todo = [int(i) for i in np.flatnonzero(status == TODO) if i % group.world == group.rank]
    t0 = time.perf_counter()
    done_now, failed_now = encode(todo, status, feats) if todo else (0, 0)
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


def open_store(out: Path, root: Path, names: list[str], encoder: dict, precision: str,
               overwrite: bool) -> tuple[dict, int, bool]:
    """Create or check the store (rank 0); returns its meta, rows already done, rows left to do."""
    grid, channels = stored_dims(encoder)
    meta = store_meta(encoder, [len(names), grid[0] * grid[1], channels], root, names, precision)
    out.mkdir(parents=True, exist_ok=True)
    fresh = overwrite or not (out / "meta.json").exists()
    if not fresh:
        check_resumable(out, meta)
    if fresh:
        create_store(out, names, meta)
    status = np.load(check_regular(out / "status.npy", "the store's status.npy"), mmap_mode="r")
    left = bool((status == TODO).any())
    if left:  # only when rows will be written: a finished store is not touched
        for p in (out / "status.npy", out / "features.npy"):
            reserve_disk_space(p, out, len(names))
    return meta, int((status == DONE).sum()), left


def fill_rows(name: str, ds: DecodeDataset, out: Path, status: np.ndarray, feats: np.ndarray,
              batches: Iterator[tuple[list, np.ndarray | None]], *, group, progress: bool,
              limit_batches: int | None) -> tuple[int, int]:
    """Write ``batches`` (each: its ``(row, array, error)`` items and the grids of its readable images, as
    :func:`encoded_batch` gives them) of this rank's rows ``ds.rows`` into the memory maps, with a progress bar
    named after the encoder ``name``; returns (rows done, rows failed)."""
    ranks = f" (rank 0 of {group.world}, its share)" if group.world > 1 else ""
    bar = progress_bar(total=len(ds.rows), unit="img", desc=f"features {name}{ranks}",
                       disable=not progress or group.rank != 0)
    done_now = failed_now = 0
    # every rank appends whole lines (one write each, O_APPEND): lines never interleave
    with open(out / "errors.jsonl", "a") as errlog:
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
            close = getattr(batches, "close", None)
            if close is not None:  # threaded batches: nothing more started, the running ones finished
                close()
    bar.close()
    return done_now, failed_now


def encoded_batch(encode: Callable[[np.ndarray], np.ndarray], batch: list) -> tuple[list, np.ndarray | None]:
    """(the batch's (row, array, error) items, ``encode`` of the stacked arrays of its readable images or None)."""
    good = [a for _, a, _ in batch if a is not None]
    return batch, (encode(np.stack(good)) if good else None)


def threaded_batches(encode: Callable[[np.ndarray], np.ndarray], ds: DecodeDataset, batch_size: int, threads: int):
    """The batches in order, each decoded and encoded by one of ``threads`` threads (JPEG decoding, resizing and
    ONNX Runtime's calls all release the GIL): every core decodes and encodes, with no process to pass arrays to.
    At most two batches a thread are ahead of the caller."""
    def job(start: int):
        return encoded_batch(encode, [ds[i] for i in range(start, min(start + batch_size, len(ds)))])

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


def check_resumable(out: Path, meta: dict) -> None:
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


def reserve_disk_space(path: Path, out: Path, n_images: int) -> None:
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
