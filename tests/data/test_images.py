"""Tests for captioner.data.images (all inputs generated with Pillow)."""

from __future__ import annotations

import base64
import io
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from captioner.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    display_name,
    expand_image_args,
    list_images,
    load_image,
    name_fields,
    try_load_image,
)

from ..watchdog import hang_guard


def _save(im: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    im.save(path, format=fmt, **kw)
    return path


def _load_saved(tmp_path: Path, im: Image.Image, name: str, **kw) -> Image.Image:
    out = load_image(_save(im, tmp_path / name, **kw))
    assert out.mode == "RGB"
    assert out.size == im.size
    return out


# ---------------------------------------------------------------- modes


def test_rgb_roundtrip(tmp_path):
    im = Image.new("RGB", (5, 4), (10, 200, 30))
    assert _load_saved(tmp_path, im, "a.png").getpixel((2, 2)) == (10, 200, 30)


def test_grayscale_L(tmp_path):
    im = Image.new("L", (4, 4), 77)
    assert _load_saved(tmp_path, im, "l.png").getpixel((0, 0)) == (77, 77, 77)


def test_rgba_transparent_is_white_and_opaque_kept(tmp_path):
    im = Image.new("RGBA", (4, 2), (0, 0, 0, 0))  # fully transparent black
    im.putpixel((1, 0), (255, 0, 0, 255))
    im.putpixel((2, 0), (0, 0, 255, 128))
    out = _load_saved(tmp_path, im, "rgba.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (255, 0, 0)
    r, g, b = out.getpixel((2, 0))  # half-transparent blue over white
    assert b == 255 and 120 <= r <= 135 and 120 <= g <= 135


def test_LA_composited_on_white(tmp_path):
    im = Image.new("LA", (3, 1), (0, 0))
    im.putpixel((1, 0), (40, 255))
    out = _load_saved(tmp_path, im, "la.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (40, 40, 40)


def test_palette_plain(tmp_path):
    im = Image.new("RGB", (4, 4), (0, 128, 255)).convert("P", palette=Image.Palette.ADAPTIVE)
    out = _load_saved(tmp_path, im, "p.png")
    assert out.getpixel((0, 0)) == (0, 128, 255)


@pytest.mark.parametrize("fmt, name", [("PNG", "pt.png"), ("GIF", "pt.gif")])
def test_palette_with_transparency(tmp_path, fmt, name):
    im = Image.new("P", (4, 1), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 0  # index 0 (black) is transparent
    out = _load_saved(tmp_path, im, name, fmt=fmt, transparency=0)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (255, 0, 0)


def test_cmyk_jpeg(tmp_path):
    im = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = _load_saved(tmp_path, im, "c.jpg", quality=95)
    r, g, b = out.getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15


def test_cmyk_tiff_exact(tmp_path):
    im = Image.new("CMYK", (2, 2), (0, 0, 0, 0))  # white
    assert _load_saved(tmp_path, im, "c.tif").getpixel((0, 0)) == (255, 255, 255)


def test_i16_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 65535, 32896, 257]], dtype=np.uint16)
    im = Image.fromarray(arr)
    assert im.mode == "I;16"
    out = _load_saved(tmp_path, im, "g16.png")
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 255, 128, 1]
    assert out.getpixel((1, 0)) == (255, 255, 255)


def test_mode_I_treated_as_16_bit(tmp_path):
    im = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert im.mode == "I"
    out = _load_saved(tmp_path, im, "i32.tif")
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert out.getpixel((1, 0)) == (255, 255, 255)


def test_mode_F_unit_range(tmp_path):
    im = Image.fromarray(np.array([[0.0, 1.0, 0.5]], dtype=np.float32))
    assert im.mode == "F"
    out = _load_saved(tmp_path, im, "f.tif")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 255, 128]


def test_bilevel(tmp_path):
    im = Image.new("1", (4, 1), 0)
    im.putpixel((2, 0), 1)
    out = _load_saved(tmp_path, im, "b.png")
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert out.getpixel((2, 0)) == (255, 255, 255)


def test_ycbcr(tmp_path):
    im = Image.new("RGB", (4, 4), (200, 50, 50)).convert("YCbCr")
    path = _save(im, tmp_path / "y.tif")
    assert Image.open(path).mode == "YCbCr"
    r, g, b = load_image(path).getpixel((1, 1))
    assert abs(r - 200) < 4 and abs(g - 50) < 4 and abs(b - 50) < 4


# ---------------------------------------------------------------- orientation / animation


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = _save(im, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    r, g, b = out.getpixel((10, 5))  # left half ends up on top
    assert r > 200 and b < 60


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 2
    assert load_image(path).getpixel((4, 4)) == (255, 0, 0)


def test_animated_png_first_frame(tmp_path):
    frames = [Image.new("RGBA", (8, 8), c) for c in [(0, 255, 0, 255), (0, 0, 255, 255)]]
    path = tmp_path / "anim.png"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    assert load_image(path).getpixel((4, 4)) == (0, 255, 0)


# ---------------------------------------------------------------- inputs


def test_bytes_input():
    buf = io.BytesIO()
    Image.new("RGB", (3, 3), (1, 2, 3)).save(buf, format="PNG")
    out = load_image(buf.getvalue())
    assert out.getpixel((0, 0)) == (1, 2, 3)


def test_file_object_input_not_closed(tmp_path):
    path = _save(Image.new("RGB", (3, 3), (9, 8, 7)), tmp_path / "f.png")
    with open(path, "rb") as fh:
        out = load_image(fh)
        assert not fh.closed
    assert out.getpixel((1, 1)) == (9, 8, 7)


def test_result_is_detached_from_file(tmp_path):
    path = _save(Image.new("RGB", (3, 3), (9, 8, 7)), tmp_path / "f.png")
    out = load_image(path)
    path.unlink()  # would fail on some platforms if a handle were left open
    assert out.copy().getpixel((0, 0)) == (9, 8, 7)


# ---------------------------------------------------------------- errors


def _error(src, **kw) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(src, **kw)
    return info.value


def test_error_message_format():
    e = ImageError("x.jpg", "file not found")
    assert str(e) == "x.jpg: file not found"
    assert (e.source, e.reason) == ("x.jpg", "file not found")
    again = pickle.loads(pickle.dumps(e))
    assert str(again) == str(e) and again.reason == e.reason


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    e = _error(path)
    assert e.reason == "file not found"
    assert str(e) == f"{path}: file not found"


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    e = _error(path)
    assert e.reason == "empty file (0 bytes)"
    assert "empty.png" in str(e)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 20)
    e = _error(path)
    assert e.reason == "not an image file (cannot identify format)"
    assert "notes.jpg" in str(e)


def test_directory(tmp_path):
    e = _error(tmp_path)
    assert "directory" in e.reason
    assert str(tmp_path) in str(e)


def test_named_pipe_is_refused_without_blocking(tmp_path):
    """Issue 7, case 5: a FIFO used to block open() forever (no writer)."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with hang_guard():
        e = _error(fifo)
    assert e.reason == "is a named pipe (FIFO), not a regular file; only regular files are read as images"
    assert str(e).startswith(f"{fifo}: ")


def test_device_is_refused_not_read_forever():
    with hang_guard():
        e = _error("/dev/zero")
    assert e.reason.startswith("is a character device, not a regular file")


def test_symlink_to_a_regular_image_is_read(tmp_path):
    target = _save(Image.new("RGB", (8, 6), (1, 2, 3)), tmp_path / "real.png")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    assert load_image(link).size == (8, 6)


def _noise(size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt, name", [("JPEG", "cut.jpg"), ("PNG", "cut.png")])
def test_truncated_file(tmp_path, fmt, name):
    buf = io.BytesIO()
    _noise((64, 64)).save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    e = _error(path)
    assert name in str(e)
    assert e.reason.startswith("truncated or corrupt image data")


def test_corrupt_data_bytes():
    buf = io.BytesIO()
    _noise((32, 32)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[60:200] = bytes(140)  # scribble over the compressed pixels
    e = _error(bytes(data), name="scribbled.png")
    assert str(e).startswith("scribbled.png: ")


def test_name_override_and_bytes_default():
    assert str(_error(b"nonsense")).startswith("<bytes>: ")
    assert str(_error(b"nonsense", name="row 7")).startswith("row 7: ")
    assert _error(b"").reason.startswith("empty")


def test_decompression_bomb_refused_before_decoding(tmp_path):
    path = _save(Image.new("L", (3000, 3000), 0), tmp_path / "big.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        e = _error(path, max_pixels=1_000_000)
    assert "big.png" in str(e)
    assert "3000 x 3000 = 9000000 pixels" in e.reason
    assert "limit of 1000000" in e.reason
    assert "raise max_pixels" in e.reason
    assert load_image(path, max_pixels=None).size == (3000, 3000)


def test_pil_global_limit_untouched_and_not_used(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    path = _save(Image.new("L", (200, 200), 0), tmp_path / "m.png")
    Image.MAX_IMAGE_PIXELS = 1000  # PIL would warn/raise; our own limit decides
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert load_image(path).size == (200, 200)
            assert Image.MAX_IMAGE_PIXELS == 1000
    finally:
        Image.MAX_IMAGE_PIXELS = before
    assert DEFAULT_MAX_PIXELS == 64_000_000


def test_bad_max_pixels_rejected():
    with pytest.raises(ValueError):
        load_image(b"x", max_pixels=0)


def test_try_load_image(tmp_path):
    good = _save(Image.new("RGB", (2, 2), (5, 5, 5)), tmp_path / "ok.png")
    image, err = try_load_image(good)
    assert err is None and image is not None and image.getpixel((0, 0)) == (5, 5, 5)

    missing = tmp_path / "gone.png"
    image, err = try_load_image(missing)
    assert image is None
    assert err == f"{missing}: file not found"

    image, err = try_load_image(good, max_pixels=3)
    assert image is None and "limit of 3" in err


# ---------------------------------------------------------------- paths: folders, globs, names


def _looping_tree(root: Path) -> Path:
    """root/a/b/x.jpg, with two links that loop: a/up -> .. and a/b/top -> ../.."""
    (root / "a" / "b").mkdir(parents=True)
    _save(Image.new("RGB", (8, 8)), root / "a" / "b" / "x.jpg")
    (root / "a" / "up").symlink_to("..")
    (root / "a" / "b" / "top").symlink_to("../..")
    return root / "a" / "b" / "x.jpg"


def test_a_recursive_glob_visits_each_real_folder_once(tmp_path, monkeypatch):
    """Issue 21, defect 5: with a/up -> .. a quoted ** glob listed one file 41 times; with two such links it
    never ended. Globs now follow the folders' rule: links to folders found on the way are not entered."""
    x = _looping_tree(tmp_path)
    with hang_guard(30):
        assert expand_image_args([str(tmp_path / "**" / "*.jpg")]) == [str(x)]
        assert expand_image_args([str(tmp_path)]) == [str(x)] and list_images(tmp_path) == [x]  # the same rule
        assert expand_image_args([str(tmp_path / "*" / "*" / "*.jpg")]) == [str(x)]
        monkeypatch.chdir(tmp_path)
        assert expand_image_args(["**/*.jpg", "a/**/x.jp?"]) == ["a/b/x.jpg", "a/b/x.jpg"]
        # a link named in the pattern's fixed part is the user's choice: followed, once
        assert expand_image_args(["a/up/a/**/*.jpg"]) == ["a/up/a/b/x.jpg"]


def test_glob_patterns_keep_their_meaning(tmp_path, monkeypatch):
    for name in ("p1.jpg", "p2.png", "q1.jpg", "sub/p3.jpg", "sub/deeper/p4.jpg", ".hidden/p5.jpg", "sub/.p6.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub" / "dir.jpg").mkdir()  # folders are never listed
    monkeypatch.chdir(tmp_path)
    assert expand_image_args(["p*.jpg"]) == ["p1.jpg"]  # * stays within one folder
    assert expand_image_args(["[pq]1.*"]) == ["p1.jpg", "q1.jpg"]
    assert expand_image_args(["**/p?.jpg"]) == ["p1.jpg", "sub/deeper/p4.jpg", "sub/p3.jpg"]  # hidden: not
    assert expand_image_args(["**/.p*.jpg", ".hidden/*"]) == ["sub/.p6.jpg", ".hidden/p5.jpg"]
    assert expand_image_args([str(tmp_path / "sub" / "**")]) == [str(tmp_path / "sub" / n)
                                                                  for n in ("deeper/p4.jpg", "p3.jpg")]
    assert expand_image_args(["nothing-*.jpg", "missing.jpg"]) == ["missing.jpg"]


def test_a_nul_in_a_path_is_named(tmp_path):
    """Issue 21: a NUL in the stdin path list (`captioner caption -`) gave "embedded null byte", naming no line."""
    e = _error(str(tmp_path / "a\0b.png"))
    assert e.reason.startswith("the path contains a NUL byte")
    with pytest.raises(ValueError, match=r"stdin, line 3: .*NUL byte.*-print0"):
        expand_image_args(["-"], stdin=io.StringIO("a.jpg\n\nb\0.jpg\n"))


def test_names_that_are_not_utf8_are_read_and_named_reversibly(tmp_path):
    """Issue 21, defect 6: a file name that is not valid UTF-8 (Python holds it with lone surrogates)."""
    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    _save(Image.new("RGB", (4, 3)), Path(os.fsdecode(raw)))
    assert load_image(os.fsdecode(raw)).size == (4, 3)
    assert list_images(tmp_path) == [Path(os.fsdecode(raw))]
    shown = display_name(os.fsdecode(raw))
    assert shown == str(tmp_path) + "/caf\ufffd.png" and shown.encode("utf-8")
    fields = name_fields("image", os.fsdecode(raw))
    assert fields == {"image": shown, "image_b64": base64.b64encode(raw).decode("ascii")}
    assert name_fields("image", "plain-é.jpg") == {"image": "plain-é.jpg"}  # valid names: as they are
    assert display_name("from Python \ud800").encode("utf-8")  # a surrogate that is no file-system byte
    stdin = io.TextIOWrapper(io.BytesIO(b"ok.jpg\n" + raw + b"\r\n"), encoding="utf-8")
    assert expand_image_args(["-"], stdin=stdin) == ["ok.jpg", os.fsdecode(raw)]
