"""Feature store: encoder grids of a set of images, cached once, read back zero-copy.

Layout of a store directory::

    features.npy   float16 (N, H*W, C), a plain .npy file written through a memory map
    status.npy     uint8 (N,): 0 = to do, 1 = done, 2 = failed (unreadable image)
    index.json     {"images": [name, ...]}: row i holds images[i]
    meta.json      format/version, encoder spec, preprocessing, grid shape, fingerprint
    errors.jsonl   one {"image", "error"} line per image that could not be read

Crash safety: a row's features are written before its status byte, both into shared
memory maps, so a killed process never leaves a row marked done with partial data
(the kernel keeps the written pages); a rerun computes only rows whose status is 0.
The fingerprint (encoder, preprocessing, image names and sizes) guards against resuming
into a store made from other inputs.

Under torchrun (one node), every process fills the same files: rank r encodes the rows i with
i % world == r; rank 0 creates or checks the store first and writes meta.json last, after a barrier.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

FORMAT = "captioner-features"
VERSION = 1
TODO, DONE, FAILED = 0, 1, 2


class FeatureStoreError(ValueError):
    pass


def fingerprint(spec_dict: dict, images: Sequence[str], root: Path) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(spec_dict, sort_keys=True).encode())
    for name in images:
        p = root / name
        size = p.stat().st_size if p.exists() else -1
        h.update(f"{name}\0{size}\n".encode())
    return h.hexdigest()


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class _DecodeDataset:
    """Loads and resizes images (run in DataLoader workers, so decoding overlaps the CNN)."""

    def __init__(self, root: Path, names: list[str], rows: list[int], spec, max_pixels):
        self.root, self.names, self.rows, self.spec, self.max_pixels = root, names, rows, spec, max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from captioner.data.images import try_load_image
        from captioner.encoders.network import image_to_array

        row = self.rows[i]
        name = self.names[row]
        img, err = try_load_image(self.root / name, max_pixels=self.max_pixels)
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
) -> dict:
    """Compute (or finish computing) the features of ``images`` into ``out_dir``.

    Returns a summary: rows computed now, rows already done, failures, images/s.
    ``limit_batches`` stops after that many batches (for tests and benchmarks).
    ``device`` runs the encoder there (cpu, cuda, auto); ``precision="bf16"`` under bfloat16 autocast
    (recorded in meta.json: a store is finished in the precision it was started in).
    Under torchrun (WORLD_SIZE > 1, one node) each process encodes every WORLD_SIZE-th image into the
    same store, which ends up exactly as a single-process run leaves it.
    """
    from captioner.runtime.devices import check_precision, resolve_device
    from captioner.runtime.distributed import env_world, one_node, process_group

    dev = resolve_device(device)  # a GPU that is not there: an error before any file is touched
    check_precision(precision, dev)
    _, world = env_world()
    if world > 1 and not one_node(world):
        raise FeatureStoreError(
            f"{out_dir}: feature extraction runs its ranks on one machine (they write one shared memory-mapped "
            f"store), but torchrun started {world} processes over several nodes; use `torchrun --standalone "
            "--nproc_per_node N` on one node, or one store per node (each with its own --splits)")
    with process_group() as group:
        return _extract(group, image_root, images, out_dir, encoder=encoder, resize=resize, image_size=image_size,
                        batch_size=batch_size, workers=workers, max_pixels=max_pixels, overwrite=overwrite,
                        progress=progress, limit_batches=limit_batches, device=dev, precision=precision)


def _extract(group, image_root, images, out_dir, *, encoder, resize, image_size, batch_size, workers, max_pixels,
             overwrite, progress, limit_batches, device, precision) -> dict:
    """extract_features in one process of ``group``: rank r encodes the rows i with i % world == r.

    Rank 0 alone creates (or checks) the store and finally writes meta.json; every rank writes its
    own rows into the shared memory maps (disjoint rows, so no two ranks write the same bytes), and
    the layout is exactly that of a single-process run. Alone (world 1) this is the whole job."""
    import torch
    from tqdm import tqdm

    from captioner.data.images import DEFAULT_MAX_PIXELS
    from captioner.encoders.network import ImageEncoder, get_encoder_spec

    root, out = Path(image_root), Path(out_dir)
    names = list(images)
    if len(set(names)) != len(names):
        raise FeatureStoreError("the image list has duplicates; each image must appear once")
    spec = get_encoder_spec(encoder, resize=resize, image_size=image_size)
    if max_pixels is None:
        max_pixels = DEFAULT_MAX_PIXELS
    n, hw, c = len(names), spec.grid[0] * spec.grid[1], spec.channels
    feat_path, status_path = out / "features.npy", out / "status.npy"

    def open_store() -> tuple[dict, int, bool]:
        """Create or check the store (rank 0); returns its meta, rows already done, rows left to do."""
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "encoder": spec.to_dict(),
            "shape": [n, hw, c],
            "dtype": "float16",
            "image_root": str(root.resolve()),
            "fingerprint": fingerprint(spec.to_dict(), names, root),
            "precision": precision,
        }
        out.mkdir(parents=True, exist_ok=True)
        fresh = overwrite or not (out / "meta.json").exists()
        if not fresh:
            _check_resumable(out, meta)
        if fresh:
            for p in (feat_path, status_path, out / "errors.jsonl", out / "meta.json"):
                p.unlink(missing_ok=True)
            np.lib.format.open_memmap(status_path, mode="w+", dtype=np.uint8, shape=(n,)).flush()
            np.lib.format.open_memmap(feat_path, mode="w+", dtype=np.float16, shape=(n, hw, c)).flush()
            _write_json_atomic(out / "index.json", {"images": names})
            _write_json_atomic(out / "meta.json", {**meta, "complete": False})
        status = np.load(status_path, mmap_mode="r")
        left = bool((status == TODO).any())
        if left:  # only when rows will be written: a finished store is not touched
            for p in (status_path, feat_path):
                _reserve_disk_space(p, out, n)
        return meta, int((status == DONE).sum()), left

    meta, already, left = group.on_rank0(open_store)  # the others wait for the files to exist
    status = np.load(status_path, mmap_mode="r+")
    feats = np.load(feat_path, mmap_mode="r+")
    # this rank's share; no other rank writes these rows, so reading their status here is safe
    todo = [int(i) for i in np.flatnonzero(status == TODO) if i % group.world == group.rank]
    t0 = time.perf_counter()
    done_now = failed_now = 0
    if todo:
        enc = ImageEncoder(spec, device=device, precision=precision)
        ds = _DecodeDataset(root, names, todo, spec, max_pixels)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
            prefetch_factor=4 if workers > 0 else None, persistent_workers=False,
        )
        ranks = f" (rank 0 of {group.world}, its share)" if group.world > 1 else ""
        bar = tqdm(total=len(todo), unit="img", desc=f"features {spec.name}{ranks}",
                   disable=not progress or group.rank != 0, dynamic_ncols=True)
        # every rank appends whole lines (one write each, O_APPEND): lines never interleave
        with open(out / "errors.jsonl", "a") as errlog:
            for b, batch in enumerate(loader):
                if limit_batches is not None and b >= limit_batches:
                    break
                good = [(r, a) for r, a, e in batch if a is not None]
                for r, _, e in batch:
                    if e is not None:
                        errlog.write(json.dumps({"image": names[r], "error": e}) + "\n")
                        errlog.flush()
                        status[r] = FAILED
                        failed_now += 1
                if good:
                    rows = np.array([r for r, _ in good])
                    grid = enc.encode_arrays(np.stack([a for _, a in good]))
                    feats[rows] = grid.cpu().numpy().astype(np.float16)  # data first ...
                    status[rows] = DONE  # ... then the done mark
                    done_now += len(good)
                bar.update(len(batch))
                if b % 50 == 0:
                    feats.flush()
                    status.flush()
        bar.close()
    feats.flush()
    status.flush()
    group.barrier()  # every rank's rows are written
    secs = time.perf_counter() - t0
    done_now, failed_now = (int(v) for v in group.sum([done_now, failed_now]))
    complete = bool((status != TODO).all())
    if group.rank == 0:
        _write_json_atomic(out / "meta.json", {**meta, "complete": complete})
    group.barrier()  # meta.json is final when any rank returns
    summary = {
        "store": str(out),
        "images": n,
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


def _check_resumable(out: Path, meta: dict) -> None:
    """An existing store may be finished only with the same images, encoder and precision."""
    try:
        old = json.loads((out / "meta.json").read_text(encoding="utf-8"))
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
                                f"--precision {was}, or start again with --overwrite")


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


def _load_npy(path: Path) -> np.ndarray:
    """A memory map of a .npy file; any damage (numpy raises many types for a bad header) is a FeatureStoreError."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise FeatureStoreError(f"{path}: damaged array file ({type(e).__name__}: {e}); "
                                "rerun `captioner features --overwrite`") from None


def _check_store_json(path: Path, meta, index) -> None:
    """meta.json and index.json of a store: types and sane values, before any array is mapped."""
    def fail(file: str, problem: str) -> FeatureStoreError:
        return FeatureStoreError(f"{path / file}: {problem}; rerun `captioner features --overwrite`")

    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FeatureStoreError(f"{path}/meta.json: not a captioner feature store")
    if meta.get("version") != VERSION:
        raise fail("meta.json", f"'version' is {meta.get('version')!r}, this code reads version {VERSION}")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise fail("meta.json", f"'shape' must be [N, H*W, C], three whole numbers, got {shape!r}")
    enc = meta.get("encoder")
    grid = enc.get("grid") if isinstance(enc, dict) else None
    if not (isinstance(enc, dict) and isinstance(enc.get("name"), str) and isinstance(grid, list) and len(grid) == 2
            and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
            and grid[0] * grid[1] == shape[1] and enc.get("channels") == shape[2]):
        raise fail("meta.json", f"'encoder' must name the encoder and give its grid and channels matching "
                                f"the shape {shape}, got {enc!r}")
    images = index.get("images") if isinstance(index, dict) else None
    if not (isinstance(images, list) and all(isinstance(n, str) and n for n in images)):
        raise fail("index.json", "expected {\"images\": [image names]}")
    if len(set(images)) != len(images):
        raise fail("index.json", "an image is listed twice")


@dataclass
class FeatureStore:
    """A finished (or partial) store opened read-only; ``features`` is a zero-copy memory map."""

    path: Path
    features: np.ndarray  # (N, H*W, C) float16 memmap
    status: np.ndarray  # (N,) uint8
    images: list[str]
    meta: dict

    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = False) -> "FeatureStore":
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FeatureStoreError(f"{path}: is a file, not a feature store folder")
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
            index = json.loads((path / "index.json").read_text(encoding="utf-8"))
            _check_store_json(path, meta, index)
            images = index["images"]
            feats = _load_npy(path / "features.npy")
            status = _load_npy(path / "status.npy")
        except FileNotFoundError as e:
            raise FeatureStoreError(f"{path}: not a feature store ({Path(e.filename).name} missing); "
                                    "run `captioner features` first") from None
        except FeatureStoreError:
            raise
        except (ValueError, KeyError, OSError) as e:  # json, short files
            raise FeatureStoreError(f"{path}: damaged feature store ({e}); rerun `captioner features`") from None
        if feats.dtype != np.float16 or feats.ndim != 3 or status.dtype != np.uint8 or status.ndim != 1:
            raise FeatureStoreError(f"{path}: features.npy must be float16 (N, H*W, C) and status.npy uint8 (N,), got "
                                    f"{feats.dtype} {feats.shape} and {status.dtype} {status.shape}; "
                                    "rerun `captioner features --overwrite`")
        if list(feats.shape) != meta["shape"] or len(images) != feats.shape[0] or status.shape[0] != feats.shape[0]:
            raise FeatureStoreError(f"{path}: features.npy, status.npy and index.json disagree in size; "
                                    "rerun `captioner features --overwrite`")
        if require_complete and (status == TODO).any():
            raise FeatureStoreError(f"{path}: {int((status == TODO).sum())} rows still to compute; "
                                    "rerun `captioner features` to finish")
        return cls(path, feats, status, images, meta)

    @property
    def row_of(self) -> dict[str, int]:
        if not hasattr(self, "_row_of"):
            self._row_of = {name: i for i, name in enumerate(self.images)}
        return self._row_of

    def has(self, image: str) -> bool:
        i = self.row_of.get(image)
        return i is not None and self.status[i] == DONE

    def get(self, image: str) -> np.ndarray:
        """The (H*W, C) float16 grid of one image: a view into the memory map, no copy."""
        i = self.row_of[image]
        if self.status[i] != DONE:
            raise KeyError(f"{image}: no features ({'failed' if self.status[i] == FAILED else 'not computed'})")
        return self.features[i]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["encoder"]["grid"])

    def errors(self) -> list[dict]:
        p = self.path / "errors.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
