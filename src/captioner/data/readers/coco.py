"""Reader of MS-COCO caption annotations (``captions_train2014.json`` ...)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from captioner.data.corpus import DEFAULT_RATIOS, Corpus, CorpusError, PathLike, Ratios, hash_split
from captioner.data.readers.builder import (
    Builder,
    check_image_dir,
    check_ratios,
    image_name_problem,
    load_json,
)


def read_coco(
    annotation_files: PathLike | Sequence[PathLike],
    image_dir: PathLike,
    *,
    strict: bool = False,
    check_images: bool = True,
    dedupe: bool = False,
    ratios: Ratios = DEFAULT_RATIOS,
    seed: int = 0,
    name: str = "coco",
) -> Corpus:
    """Read MS-COCO caption annotations (``captions_train2014.json`` ...).

    Split from the file name: "train" in it -> train, "val" -> val, "test" ->
    test, otherwise :func:`hash_split` per image. Images live in
    ``image_dir/<suffix>/`` (e.g. ``train2014/`` for ``captions_train2014.json``)
    when that folder exists, else directly in ``image_dir``.
    For the Karpathy split of COCO use :func:`read_karpathy` instead.
    """
    files = (
        [annotation_files]
        if isinstance(annotation_files, (str, os.PathLike))
        else list(annotation_files)
    )
    if not files:
        raise CorpusError("no COCO annotation file given")
    check_ratios(ratios)
    image_root = Path(image_dir).expanduser().absolute()
    b = Builder()
    first_where: dict[str, str] = {}
    for file in files:
        _read_annotation_file(b, Path(file).expanduser(), image_root, first_where, ratios, seed)

    root = check_image_dir(image_root, check_images, Path(files[0]))
    return b.finish(
        name=name,
        image_root=root,
        source=", ".join(str(f) for f in files),
        strict=strict,
        check_images=check_images,
        dedupe=dedupe,
    )


def _read_annotation_file(
    b: Builder, path: Path, image_root: Path, first_where: dict[str, str], ratios: Ratios, seed: int
) -> None:
    """Add the images and captions of one annotation file (``first_where``: where each image was first listed)."""
    data = load_json(path, "COCO annotation file")
    if not (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and isinstance(data.get("annotations"), list)
    ):
        raise CorpusError(
            f"{path}: not a COCO captions file (expected 'images' and 'annotations' lists)"
        )
    stem = path.stem.lower()
    file_split = next((s for s in ("train", "val", "test") if s in stem), None)
    subdir = path.stem.rsplit("_", 1)[-1]
    prefix = f"{subdir}/" if "_" in path.stem and (image_root / subdir).is_dir() else ""

    by_id: dict[Any, str] = {}
    for i, img in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str):
            b.malformed(where, "expected an object with 'id' and 'file_name'")
            continue
        image = prefix + img["file_name"]
        problem = image_name_problem(img["file_name"])
        if problem:
            b.malformed(where, problem)
            continue
        if image in first_where:
            b.malformed(where, f"{image} is already listed at {first_where[image]}")
            continue
        if not isinstance(img.get("id"), (int, str)) or img["id"] in by_id:
            b.malformed(where, f"missing or repeated image id {img.get('id')!r}")
            continue
        first_where[image] = where
        by_id[img["id"]] = image
        b.image(image, file_split or hash_split(image, ratios, seed))

    for k, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{k}]"
        if not isinstance(ann, dict):
            b.malformed(where, "expected an object")
            continue
        image_id = ann.get("image_id")
        image = None if isinstance(image_id, (list, dict)) else by_id.get(image_id)
        if image is None:
            b.malformed(where, f"unknown image_id {ann.get('image_id')!r}")
            continue
        if not isinstance(ann.get("caption"), str):
            b.malformed(where, "no 'caption' text")
            continue
        b.records[image].captions.append((ann["caption"], where))
