"""The inputs of :meth:`captioner.inference.captioner.Captioner.iter_captions` after loading: each image decoded and
resized to the encoder's uint8 array (or its error), in this process or in DataLoader worker processes."""

from __future__ import annotations

from typing import Any

import torch

from captioner.data.images import ImageError, image_to_array, load_image


class Prepared:
    """One input after loading: its source name, the encoder's uint8 array or an error."""

    __slots__ = ("source", "array", "size", "error", "image")

    def __init__(self, source, array=None, size=None, error=None, image=None):
        self.source, self.array, self.size, self.error, self.image = source, array, size, error, image


def prepare(src: Any, source: str, spec, max_pixels: int | None, keep_image: bool) -> Prepared:
    try:
        img = load_image(src, max_pixels=max_pixels, name=source)
    except ImageError as e:
        return Prepared(source, error=str(e))
    return Prepared(source, image_to_array(img, spec), img.size, image=img if keep_image else None)


class PrepareDataset(torch.utils.data.Dataset):
    """Image loading and resizing, run in DataLoader worker processes (paths only)."""

    def __init__(self, items: list[tuple[Any, str]], spec, max_pixels, keep_images: bool):
        self.items, self.spec, self.max_pixels, self.keep = items, spec, max_pixels, keep_images

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Prepared:
        src, source = self.items[i]
        return prepare(src, source, self.spec, self.max_pixels, self.keep)


def as_list(batch):
    return batch
