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

This module is the store's format: creating an empty one, opening and checking one, and the
fingerprint. Filling it with an encoder is :func:`captioner.encoders.extract.extract_features`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from captioner.checks import is_int
from captioner.data.corpus import Corpus, PathLike
from captioner.data.images import list_images
from captioner.data.text import write_text_atomic
from captioner.files import DATA_BYTES, METADATA_BYTES, NotRegularFileError, check_regular, read_bytes

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
        # surrogatepass: a file name that is not UTF-8 (held with lone surrogates) hashes too
        h.update(f"{name}\0{size}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def store_meta(encoder: dict, shape: Sequence[int], image_root: Path, images: Sequence[str], precision: str) -> dict:
    """The meta.json (less ``complete``) of a store of ``images`` in ``image_root``, encoded by ``encoder``
    (its spec as a dict) in ``precision`` into grids of ``shape`` ``[N, H*W, C]``."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "encoder": encoder,
        "shape": list(shape),
        "dtype": "float16",
        "image_root": str(image_root.resolve()),
        "fingerprint": fingerprint(encoder, images, image_root),
        "precision": precision,
    }


def stored_dims(encoder: dict) -> tuple:
    """([rows, columns], channels) of the maps a store holds: the encoder's grid, or for a trunk store (``cut``
    units left to run, :mod:`captioner.encoders.tail`) the front's map."""
    if encoder.get("cut"):
        return encoder.get("trunk_grid"), encoder.get("trunk_channels")
    return encoder.get("grid"), encoder.get("channels")


def _write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def create_store(out: Path, names: Sequence[str], meta: dict) -> None:
    """A new store in ``out`` with every row to do, replacing any store files already there.

    ``meta`` (:func:`store_meta`) gives the shape ``[N, H*W, C]``; meta.json is written last,
    marked incomplete, so a store interrupted while being created is never taken as finished."""
    for p in (out / "features.npy", out / "status.npy", out / "errors.jsonl", out / "meta.json"):
        p.unlink(missing_ok=True)
    np.lib.format.open_memmap(out / "status.npy", mode="w+", dtype=np.uint8, shape=(len(names),)).flush()
    np.lib.format.open_memmap(out / "features.npy", mode="w+", dtype=np.float16, shape=tuple(meta["shape"])).flush()
    _write_json_atomic(out / "index.json", {"images": list(names)})
    write_meta(out, meta, complete=False)


def write_meta(out: Path, meta: dict, *, complete: bool) -> None:
    """Write the store's meta.json (atomically), recording whether every row is done or failed."""
    _write_json_atomic(out / "meta.json", {**meta, "complete": complete})


def _load_npy(path: Path) -> np.ndarray:
    """A memory map of a .npy file; any damage (numpy raises many types for a bad header) is a FeatureStoreError."""
    try:
        check_regular(path, f"the store's {path.name}")  # np.load would block on a FIFO
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (FileNotFoundError, NotRegularFileError):
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
    if not (isinstance(shape, list) and len(shape) == 3 and all(is_int(n) and n >= 0 for n in shape)):
        raise fail("meta.json", f"'shape' must be [N, H*W, C], three whole numbers, got {shape!r}")
    enc = meta.get("encoder")
    grid, channels = stored_dims(enc) if isinstance(enc, dict) else (None, None)
    if not (isinstance(enc, dict) and isinstance(enc.get("name"), str) and isinstance(grid, list) and len(grid) == 2
            and all(is_int(g) and g >= 1 for g in grid) and is_int(enc.get("cut", 0)) and enc.get("cut", 0) >= 0
            and is_int(enc.get("channels")) and enc["channels"] >= 1
            and grid[0] * grid[1] == shape[1] and channels == shape[2]):
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
    # rows whose values were found finite (each row is checked once, the first time it is read)
    _finite: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._finite = np.zeros(len(self.images), dtype=bool)

    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = False) -> "FeatureStore":
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FeatureStoreError(f"{path}: is a file, not a feature store folder")
        try:
            meta = json.loads(read_bytes(path / "meta.json", "the store's meta.json", METADATA_BYTES).decode())
            index = json.loads(read_bytes(path / "index.json", "the store's index.json", DATA_BYTES).decode())
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
        grid = self.features[i]
        self._check_finite(np.array([i]), grid[None])
        return grid

    def read(self, rows: np.ndarray) -> np.ndarray:
        """float16 (n, H*W, C) grids of ``rows``, in that order (read from the memory map in file order).

        A row holding NaN or infinity (a damaged store: a disk error, an edited file) is a
        :class:`FeatureStoreError` naming its image; each row is checked the first time it is read."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        grids = np.empty((len(rows), *self.features.shape[1:]), dtype=np.float16)
        grids[order] = self.features[rows[order]]
        self._check_finite(rows, grids)
        return grids

    def _check_finite(self, rows: np.ndarray, grids: np.ndarray) -> None:
        new = ~self._finite[rows]
        if not new.any():
            return
        finite = np.isfinite(grids[new]).all(axis=(1, 2))
        if not finite.all():
            row = int(rows[new][np.argmin(finite)])
            raise FeatureStoreError(
                f"{self.path}: the features of {self.images[row]} (row {row}) hold NaN or infinite values; the store "
                f"is damaged. Rebuild it: `captioner features --corpus CORPUS.json --out {self.path} --overwrite` "
                f"(or --images {self.meta.get('image_root', 'FOLDER')} for a folder of images)")
        self._finite[rows[new]] = True

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["encoder"]["grid"])

    def errors(self) -> list[dict]:
        p = self.path / "errors.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in read_bytes(p, "the store's errors.jsonl").decode().splitlines()
                if line.strip()]


def images_to_encode(corpus: PathLike | None, images: PathLike | None,
                     splits: str | None = None) -> tuple[Path, list[str]]:
    """The image folder and the image names a store is made from (`captioner features`): the images of
    the corpus.json ``corpus`` (only those of ``splits``, comma-separated, when given), or else every
    image under the folder ``images``. A FeatureStoreError for an unknown split or no image at all."""
    if corpus:
        c = Corpus.load(corpus)
        wanted = set(splits.split(",")) if splits else None
        unknown = (wanted or set()) - set(c.splits())
        if unknown:
            raise FeatureStoreError(f"--splits: no split named {sorted(unknown)} in {corpus} "
                                    f"(splits: {', '.join(c.splits())})")
        names = c.images(wanted)
        root = c.image_root
    else:
        root = Path(images)
        if not root.is_dir():
            raise FeatureStoreError(f"{root}: not a folder")
        names = [str(p.relative_to(root)) for p in list_images(root)]
    if not names:
        raise FeatureStoreError(f"no images to encode in {corpus or images}")
    return root, names
