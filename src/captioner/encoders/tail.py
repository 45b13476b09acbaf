"""Fine-tuning the encoder's last units (system S5's second stage), made cheap for a CPU.

An EfficientNet-Lite net is a stem, 16 blocks and a head (a 1x1 convolution to 1280 channels with its
BatchNorm). Counted from the end, its *units* are the head (unit 1), the last block (unit 2), and so on.
Split at ``cut`` units, the net is a **front** (stem and blocks up to the cut, kept frozen) and a **back**
(the last ``cut`` units, the part fine-tuning trains):

    grid = back(front(image))        # the same as the whole net

A *trunk store* (``captioner features --cut N``) caches ``front(image)`` once, so a fine-tuning step runs
only the back (for Lite0 at 224 px, ``--cut 2`` stores a 7x7x192 map, smaller than the 7x7x1280 grid).
A model whose last units were fine-tuned keeps their weights in ``encoder.safetensors`` (names as in the
net's own state dict, e.g. ``_blocks.15._project_conv.weight``, ``_conv_head.weight``); its config.json's
``encoder.tuned`` says how many units and the weights' digest (:func:`weights_digest`), checked on load. Such a
model refuses a store of the packaged encoder's grids: it is evaluated on a trunk store, whose front is always
the packaged one.

The concepts (:mod:`captioner.encoders.concepts`) keep coming from the ImageNet classifier over the
**pretrained** back: a tuned encoder runs both backs on the front's map (:class:`TunedNet`).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

BATCHNORM_MODES = ("frozen", "train")


class TailError(ValueError):
    pass


def _lite(net: nn.Module) -> nn.Module:
    inner = getattr(net, "net", None)
    if inner is None or not hasattr(inner, "_blocks") or not hasattr(inner, "_conv_head"):
        raise TailError("only the EfficientNet-Lite encoders can be split for fine-tuning")
    return inner


def unit_count(net: nn.Module) -> int:
    """How many units (blocks, then the head) a built encoder has."""
    return len(_lite(net)._blocks) + 1


def unit_prefixes(net: nn.Module, units: int) -> list[str]:
    """The state-dict prefixes (of the EfficientNet inside ``net``) of the last ``units`` units."""
    lite = _lite(net)
    n = len(lite._blocks)
    if not 0 <= units <= n + 1:
        raise TailError(f"{units} units: this encoder has {n + 1} (its {n} blocks and the head)")
    blocks = [f"_blocks.{i}." for i in range(n - (units - 1), n)] if units > 1 else []
    return blocks + (["_conv_head.", "_bn1."] if units else [])


def _check_cut(net: nn.Module, cut: int) -> nn.Module:
    lite = _lite(net)
    if not 1 <= cut <= len(lite._blocks) + 1:
        raise TailError(f"cut {cut}: this encoder has {len(lite._blocks) + 1} units (its blocks and the head); "
                        "cut at 1 (the head) to that many")
    return lite


class Front(nn.Module):
    """The frozen part: stem and every block before the last ``cut`` units. (B,3,S,S) -> (B,C',h,w)."""

    def __init__(self, net: nn.Module, cut: int):
        super().__init__()
        lite = _check_cut(net, cut)
        self.stem, self.bn0, self.act = lite._conv_stem, lite._bn0, lite._swish
        self.blocks = nn.ModuleList(list(lite._blocks)[:len(lite._blocks) - (cut - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.stem(x)))
        for block in self.blocks:
            x = block(x)  # the front never trains: no drop connect
        return x


class Back(nn.Module):
    """The last ``cut`` units and the optional pooling: (B,C',h,w) -> (B,C,H,W). In training mode its blocks
    drop connections at the rates the net was trained with; ``batchnorm="frozen"`` keeps every BatchNorm in
    eval mode (its running statistics fixed) whatever the mode. It holds only those units (shared with ``net``);
    :meth:`net_state` names their tensors as the whole net does."""

    def __init__(self, net: nn.Module, cut: int, batchnorm: str = "frozen"):
        super().__init__()
        lite = _check_cut(net, cut)
        n = len(lite._blocks)
        self.start, self.n, self.rate = n - (cut - 1), n, lite._global_params.drop_connect_rate or 0.0
        self.blocks = nn.ModuleList(list(lite._blocks)[self.start:])
        self.conv_head, self.bn1, self.act = lite._conv_head, lite._bn1, lite._swish
        self.pool = getattr(net, "pool", None)
        self.batchnorm = batchnorm
        self.units = 0  # how many of the last units train (trainable()); the others stay as they are

    def _fixed(self) -> list[nn.Module]:
        """The units that do not train (blocks before the last ``units - 1``; the head too when none trains)."""
        blocks = list(self.blocks)
        fixed = blocks[:max(len(blocks) - max(self.units - 1, 0), 0)]
        return fixed + ([] if self.units else [self.conv_head, self.bn1])

    def train(self, mode: bool = True) -> "Back":
        super().train(mode)
        for unit in self._fixed():  # units that do not train behave as at inference (BatchNorm statistics kept)
            unit.eval()
        if self.batchnorm == "frozen":
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def trainable(self, units: int) -> list[nn.Parameter]:
        """Make the last ``units`` units trainable (their BatchNorms too unless frozen), the rest fixed; returns
        the trainable parameters."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.units = units
        self.train(self.training)
        mods = ([self.conv_head, self.bn1] if units else []) + list(self.blocks)[len(self.blocks) - (units - 1):][
            :max(units - 1, 0)]
        params = []
        for mod in mods:
            for m in mod.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and self.batchnorm == "frozen":
                    continue
                for p in m.parameters(recurse=False):
                    p.requires_grad_(True)
                    params.append(p)
        return params

    def _net_name(self, key: str) -> str:
        if key.startswith("blocks."):
            i, rest = key[len("blocks."):].split(".", 1)
            return f"_blocks.{self.start + int(i)}.{rest}"
        return "_" + key

    def net_state(self) -> dict[str, torch.Tensor]:
        """The units' weights and BatchNorm statistics, named as in the whole net's state dict."""
        return {self._net_name(k): v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()
                if not k.endswith("num_batches_tracked")}

    def load_net_state(self, weights: dict[str, torch.Tensor]) -> None:
        """Load weights named as the whole net names them (:meth:`net_state`'s names; a subset may be given)."""
        own = {self._net_name(k): k for k in self.state_dict()}
        unknown = sorted(set(weights) - set(own))
        if unknown:
            raise TailError(f"{unknown[0]}: not a weight of the encoder's last units")
        self.load_state_dict({own[k]: v for k, v in weights.items()}, strict=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first_trained = len(self.blocks) - max(self.units - 1, 0)
        for i, block in enumerate(self.blocks):  # drop connect (training mode) only in the blocks that train
            rate = self.rate * (self.start + i) / self.n if self.rate and i >= first_trained else None
            x = block(x, drop_connect_rate=rate)
        x = self.act(self.bn1(self.conv_head(x)))
        return nn.functional.adaptive_avg_pool2d(x, self.pool) if self.pool else x


class TunedNet(nn.Module):
    """A tuned encoder for inference: (B,3,S,S) -> (grid (B,C,H,W) of the tuned back, the pretrained back's
    output averaged over the grid (B,C,1,1), what the ImageNet classifier sees)."""

    def __init__(self, pretrained: nn.Module, tuned: nn.Module, units: int):
        super().__init__()
        self.front = Front(pretrained, units)
        self.back = Back(tuned, units)
        self.frozen_back = Back(pretrained, units)
        self.frozen_back.pool = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.front(x)
        return self.back(m), self.frozen_back(m).mean(dim=(2, 3), keepdim=True)


def tail_state(net: nn.Module, units: int) -> dict[str, torch.Tensor]:
    """The weights (and BatchNorm statistics) of the last ``units`` units, named as in the net's state dict."""
    prefixes = unit_prefixes(net, units)
    return {k: v.detach().float().cpu().contiguous() for k, v in _lite(net).state_dict().items()
            if k.startswith(tuple(prefixes)) and not k.endswith("num_batches_tracked")}


def load_tail(net: nn.Module, weights: dict[str, torch.Tensor], units: int, where: str) -> None:
    """Put tuned weights into a built encoder; every tensor of its last ``units`` units must be given, with its
    shape, and nothing else (a TailError names the first problem)."""
    want = tail_state(net, units)
    missing, extra = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
    if missing or extra:
        raise TailError(f"{where}: {'missing ' + missing[0] if missing else 'unexpected ' + extra[0]} "
                        f"({len(missing)} missing, {len(extra)} unexpected) for an encoder tuned in its last "
                        f"{units} units")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(want[k].shape) or not v.is_floating_point():
            raise TailError(f"{where}: {k} has shape {tuple(v.shape)} ({v.dtype}), expected "
                            f"{tuple(want[k].shape)} float")
        if not torch.isfinite(v).all():
            raise TailError(f"{where}: {k} holds NaN or infinity")
    _lite(net).load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """A digest of tuned weights (names, shapes and float32 values): config.json's encoder.tuned.digest."""
    h = hashlib.sha256()
    for k in sorted(weights):
        t = weights[k].detach().float().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


def trunk_dims(spec, cut: int) -> tuple[list[int], int]:
    """([rows, columns], channels) of the front's map for encoder ``spec`` split at ``cut`` units."""
    net = spec.build().eval()
    with torch.inference_mode():
        m = Front(net, cut)(torch.zeros(1, 3, spec.image_size, spec.image_size))
    return [int(m.shape[2]), int(m.shape[3])], int(m.shape[1])


class Finisher(nn.Module):
    """The rest of the encoder for a trunk store's maps: (B, h*w, C') -> (grids (B, H*W, C) of the model's back, tuned
    or not, the pretrained back's output averaged over the grid (B, 1, C): what the ImageNet classifier sees)."""

    def __init__(self, spec, cut: int, trunk_grid, tuned: tuple[dict[str, torch.Tensor], int] | None = None,
                 where: str = "encoder.safetensors"):
        super().__init__()
        pretrained, own = spec.build().eval(), spec.build().eval()
        if tuned is not None:
            if tuned[1] > cut:
                raise TailError(f"the model's encoder was tuned in its last {tuned[1]} units, but the store holds the "
                                f"maps before the last {cut}; make one with `captioner features --corpus CORPUS.json "
                                f"--out DIR --cut {tuned[1]}`")
            load_tail(own, tuned[0], tuned[1], where)
        self.back, self.frozen_back = Back(own, cut).eval(), Back(pretrained, cut).eval()
        self.frozen_back.pool = None
        self.trunk_grid = tuple(trunk_grid)

    @torch.inference_mode()
    def forward(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, C = maps.shape
        x = maps.float().transpose(1, 2).reshape(B, C, *self.trunk_grid)
        grid = self.back(x).flatten(2).transpose(1, 2).contiguous()
        return grid, self.frozen_back(x).mean(dim=(2, 3)).unsqueeze(1)


def check_trunk(spec, encoder: dict, where: str) -> None:
    """A trunk store's meta.json (``encoder``) against what the encoder gives at its cut (TailError naming ``where``)."""
    try:
        grid, channels = trunk_dims(spec, encoder["cut"])
    except TailError as e:
        raise TailError(f"{where}: {e}") from None
    if [grid, channels] != [list(encoder.get("trunk_grid") or []), encoder.get("trunk_channels")]:
        raise TailError(f"{where}: its encoder cut at {encoder['cut']} units gives {grid[0]}x{grid[1]}x{channels} maps, "
                        f"but the store says {encoder.get('trunk_grid')}x{encoder.get('trunk_channels')}; rebuild it "
                        "with `captioner features --cut N --overwrite`")
