"""Attention figures: each word of a caption with the image regions the model looked at."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter


def attention_overlay_map(alpha: Sequence[float], grid: tuple[int, int], size: tuple[int, int],
                          smooth: float = 0.0) -> np.ndarray:
    """One step's attention over the H x W grid -> a smooth (h, w) map in [0, 1] at image size.

    Upsampled bicubically (then optionally Gaussian-blurred by ``smooth`` x cell size), so the
    map shows soft blobs rather than grid squares.
    """
    H, W = grid
    a = np.asarray(alpha, dtype=np.float32).reshape(H, W)
    a = a / (a.max() + 1e-12)
    img = Image.fromarray((a * 255).astype(np.uint8), mode="L").resize(size, Image.BICUBIC)
    if smooth > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius=smooth * size[0] / W))
    m = np.asarray(img, dtype=np.float32) / 255.0
    return m / (m.max() + 1e-12)


def attention_figure(image: Image.Image, words: Sequence[str], attention: Sequence[Sequence[float]],
                     grid: tuple[int, int], path: str | Path, *, title: str | None = None, cols: int = 5,
                     max_side: int = 320, center_crop: bool = False) -> Path:
    """Save a PNG: the image, then one panel per word with its attention map overlaid.

    ``center_crop``: the encoder saw only the centre square (resize policy "center-crop"), so the
    maps are drawn over that square rather than stretched over the whole photo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    im = image.convert("RGB")
    if center_crop:
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side))
    scale = max_side / max(im.size)
    if scale < 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
    n = len(words) + 1
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    aspect = im.height / im.width
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * aspect * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(im)
    axes.flat[0].set_title("input", fontsize=10)
    for i, (w, a) in enumerate(zip(words, attention), start=1):
        ax = axes.flat[i]
        ax.imshow(im)
        ax.imshow(attention_overlay_map(a, grid, im.size, smooth=0.3), cmap="jet", alpha=0.5,
                  extent=(0, im.width, im.height, 0))
        ax.set_title(w, fontsize=11)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out = Path(path)
    fmt = figure_format(out)
    # written to a temporary file then renamed: a failed write (full disk, unwritable folder)
    # leaves neither a 0-byte nor a half-written figure behind
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=90, format=fmt)
        os.replace(tmp, out)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. the folder itself is not there
            pass
        raise
    finally:
        plt.close(fig)
    return out


def figure_format(path: str | Path) -> str:
    """The image format of a figure path from its suffix (no suffix: png); ValueError if unsupported."""
    from matplotlib.figure import Figure

    fmt = Path(path).suffix[1:].lower() or "png"
    supported = Figure().canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"{path}: cannot write a figure in format {fmt!r}; use a suffix among "
                         f"{', '.join(sorted(supported))} (e.g. .png)")
    return fmt
