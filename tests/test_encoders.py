"""Encoder registry, specs, preprocessing, BN folding and resize policies (fast, CPU, 1 thread OK)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.encoders.network import (
    ImageEncoder,
    available_encoders,
    get_encoder_spec,
    image_to_array,
    resize_image,
)

LITES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def lite0() -> ImageEncoder:
    return ImageEncoder("efficientnet-lite0")


@pytest.fixture(scope="module")
def lite0_unfused() -> ImageEncoder:
    return ImageEncoder("efficientnet-lite0", fuse=False)


# ------------------------------------------------------------------ registry and specs


def test_registry_lists_the_lite_family():
    names = available_encoders()
    assert set(LITES) <= set(names)
    assert names == sorted(names)


def test_unknown_encoder_is_a_clear_value_error():
    with pytest.raises(ValueError, match=r"unknown encoder 'resnet-9000'.*efficientnet-lite0"):
        get_encoder_spec("resnet-9000")
    with pytest.raises(ValueError, match=r"unknown encoder"):
        ImageEncoder("resnet-9000")


def test_unknown_resize_policy_is_a_value_error():
    with pytest.raises(ValueError, match=r"unknown resize policy 'stretch'"):
        get_encoder_spec("efficientnet-lite0", resize="stretch")
    with pytest.raises(ValueError, match=r"unknown resize policy"):
        resize_image(Image.new("RGB", (10, 10)), 8, "stretch")


@pytest.mark.parametrize("name,size,grid", [
    ("efficientnet-lite0", 224, (7, 7)),
    ("efficientnet-lite1", 240, (8, 8)),
    ("efficientnet-lite2", 260, (9, 9)),
])
def test_native_specs(name, size, grid):
    spec = get_encoder_spec(name)
    assert (spec.name, spec.image_size, spec.grid, spec.channels) == (name, size, grid, 1280)
    assert spec.resize == "squash"  # the documented default
    # The Lite weights expect (pixel - 127) / 128.
    assert spec.mean == (127.0, 127.0, 127.0) and spec.std == (128.0, 128.0, 128.0)
    d = spec.to_dict()
    assert "build" not in d and d["grid"] == list(grid) and d["image_size"] == size


def test_spec_overrides():
    spec = get_encoder_spec("efficientnet-lite0", resize="center-crop", image_size=96)
    assert (spec.image_size, spec.grid, spec.resize) == (96, (3, 3), "center-crop")
    assert get_encoder_spec("efficientnet-lite0", image_size=240).grid == (8, 8)  # ceil(240 / 32)
    assert get_encoder_spec("efficientnet-lite0", image_size=224).grid == (7, 7)


@pytest.mark.parametrize("name", LITES)
def test_network_grid_matches_spec_at_native_size(name):
    spec = get_encoder_spec(name)
    enc = ImageEncoder(spec)
    out = enc.encode([Image.new("RGB", (50, 40), (90, 120, 30))])
    assert out.shape == (1, spec.grid[0] * spec.grid[1], spec.channels)


def test_network_grid_matches_spec_at_non_native_size():
    # 240 is not a multiple of 32: the "same" padding must be computed for 240, not for the
    # native 224 (which used to give a 7x7 grid while the spec said 8x8).
    spec = get_encoder_spec("efficientnet-lite0", image_size=240)
    out = ImageEncoder(spec).encode_arrays(np.zeros((1, 240, 240, 3), np.uint8))
    assert out.shape == (1, 64, 1280)


# ------------------------------------------------------------------ preprocessing, folding, output


def test_output_shape_dtype_and_order(lite0):
    imgs = [Image.new("RGB", (400, 100), (200, 10, 10)), Image.new("RGB", (64, 64), (0, 0, 250))]
    out = lite0.encode(imgs)
    assert out.shape == (2, 49, 1280) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Batch rows are independent and in input order.
    one = lite0.encode(imgs[1:])
    torch.testing.assert_close(out[1:], one, atol=1e-4, rtol=1e-4)


def test_preprocessing_is_pixel_minus_127_over_128(lite0):
    value = 200
    img = Image.new("RGB", (31, 17), (value, value, value))  # constant: resizing cannot change it
    got = lite0.encode([img])

    raw = get_encoder_spec("efficientnet-lite0").build().eval()  # plain un-fused network
    x = torch.full((1, 3, 224, 224), (value - 127.0) / 128.0)
    with torch.inference_mode():
        want = raw(x).flatten(2).transpose(1, 2)
    assert want.abs().max() > 0.1  # not a degenerate all-zero map
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)


def test_bn_folding_removes_batchnorm_and_keeps_outputs(lite0, lite0_unfused):
    n_bn = lambda m: sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    assert n_bn(lite0_unfused.net) == 49
    assert n_bn(lite0.net) == 0  # every BN folded into its conv
    batch = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    torch.testing.assert_close(lite0.encode_arrays(batch), lite0_unfused.encode_arrays(batch), atol=1e-3, rtol=0)


def test_image_to_array(lite0):
    arr = image_to_array(Image.new("L", (300, 120), 77), lite0.spec)  # grey -> RGB
    assert arr.shape == (224, 224, 3) and arr.dtype == np.uint8
    assert (arr == 77).all()


# ------------------------------------------------------------------ resize policies


def _bands(w: int, h: int, vertical: bool = False) -> Image.Image:
    """Red first quarter, green middle half, blue last quarter (along the long side)."""
    img = Image.new("RGB", (w, h), GREEN)
    if not vertical:
        img.paste(RED, (0, 0, w // 4, h))
        img.paste(BLUE, (w - w // 4, 0, w, h))
    else:
        img.paste(RED, (0, 0, w, h // 4))
        img.paste(BLUE, (0, h - h // 4, w, h))
    return img


def _close(px, color, tol=8) -> bool:
    return all(abs(int(a) - b) <= tol for a, b in zip(px, color))


def test_squash_keeps_the_whole_image():
    out = resize_image(_bands(400, 100), 32, "squash")
    assert out.size == (32, 32)
    a = np.asarray(out)
    assert _close(a[16, 2], RED) and _close(a[16, 16], GREEN) and _close(a[16, 29], BLUE)
    assert (np.abs(a[:, :6].astype(int) - RED).max(axis=-1) <= 8).all()  # full-height red band


def test_center_crop_keeps_the_centre_of_a_wide_image():
    out = resize_image(_bands(400, 100), 32, "center-crop")
    assert out.size == (32, 32)
    a = np.asarray(out).astype(int)
    # short side 100 -> 32, long side 400 -> 128; the centre 32 columns are all green.
    assert (np.abs(a - GREEN).max(axis=-1) <= 8).all()


def test_center_crop_keeps_the_centre_of_a_tall_image():
    out = resize_image(_bands(100, 400, vertical=True), 32, "center-crop")
    a = np.asarray(out).astype(int)
    assert out.size == (32, 32) and (np.abs(a - GREEN).max(axis=-1) <= 8).all()


def test_center_crop_of_a_two_colour_image_is_centred():
    img = Image.new("RGB", (400, 100), RED)
    img.paste(BLUE, (200, 0, 400, 100))  # left half red, right half blue
    a = np.asarray(resize_image(img, 32, "center-crop"))
    # The crop straddles the red/blue boundary, which stays in the middle of the crop.
    assert _close(a[16, 0], RED) and _close(a[16, 31], BLUE)
    assert _close(a[16, 12], RED) and _close(a[16, 19], BLUE)
    # squash: the boundary also stays in the middle, but the full width is seen
    s = np.asarray(resize_image(img, 32, "squash"))
    assert _close(s[16, 0], RED) and _close(s[16, 31], BLUE)


def test_encoder_uses_the_spec_resize_policy():
    wide = _bands(400, 100)
    crop = ImageEncoder(get_encoder_spec("efficientnet-lite0", resize="center-crop", image_size=64))
    green = crop.encode([Image.new("RGB", (64, 64), GREEN)])
    torch.testing.assert_close(crop.encode([wide]), green, atol=1e-3, rtol=0)  # only the green centre is seen
    arr = crop.preprocess([wide])
    assert arr.shape == (1, 64, 64, 3) and (np.abs(arr.astype(int) - GREEN).max() <= 8)
