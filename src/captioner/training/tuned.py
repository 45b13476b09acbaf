"""Training on a trunk store (:mod:`captioner.encoders.tail`): the encoder's last units run inside the model.

:class:`TunedDecoder` is a decoder whose features are the front's maps a trunk store holds: it runs the
encoder's back on them, then the architecture's decoder. Training, validation, checkpoints, the moving
average and DDP take it as they take any decoder, so the encoder's trainable units learn with it
(system S5's second stage); best/ is written as the architecture's model directory plus the tuned units'
weights (encoder.safetensors). What may train (``encoder.train_blocks``, ``encoder.lr``,
``encoder.batchnorm``) is :class:`captioner.training.config.EncoderConfig`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from captioner.encoders.network import get_encoder_spec
from captioner.encoders.tail import Back, TailError, check_trunk, load_tail
from captioner.inference.encoder_file import EncoderFileError, read_encoder_file, tuned_record
from captioner.inference.modeldir import resolve_model_path
from captioner.models.base import Decoder, DecoderOutput, Memory, State
from captioner.training.config import TrainConfig, TrainError


class TunedDecoder(Decoder):
    """The encoder's last ``cut`` units (``back``) and the architecture's decoder (``inner``)."""

    def __init__(self, inner: Decoder, back: Back, trunk_grid: tuple[int, int], units: int):
        super().__init__()
        self.inner, self.back = inner, back
        self.trunk_grid, self.units = tuple(trunk_grid), units  # units: how many were ever tuned (saved)
        self.has_attention = inner.has_attention
        self.arch_name, self.cfg = inner.arch_name, inner.cfg

    def grids(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, h*w, C') front maps -> (B, H*W, C) grids, through the back."""
        B, _, C = maps.shape
        x = maps.transpose(1, 2).reshape(B, C, *self.trunk_grid)
        return self.back(x).flatten(2).transpose(1, 2)

    def encode(self, features: torch.Tensor) -> Memory:
        return self.inner.encode(self.grids(features))

    def init_state(self, memory: Memory) -> State:
        return self.inner.init_state(memory)

    def step(self, prev_tokens: torch.Tensor, state: State, memory: Memory):
        return self.inner.step(prev_tokens, state, memory)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                owner: np.ndarray | None = None) -> DecoderOutput:
        """Teacher forcing; with ``owner`` (the row of ``features`` each caption belongs to), ``features`` holds
        each image once, so one pass of the back serves all its captions."""
        grids = self.grids(features)
        if owner is not None:
            grids = grids[torch.as_tensor(owner, device=grids.device)]
        return self.inner(grids, tokens, lengths)

    def encoder_weights(self) -> dict[str, torch.Tensor] | None:
        """The tuned units' weights, named as the whole net names them (None when nothing was tuned)."""
        if not self.units:
            return None
        state = self.back.net_state()
        keep = _unit_names(self.back, self.units)
        return {k: v for k, v in state.items() if k.startswith(keep)}

    def encoder_record(self, encoder: dict) -> dict:
        """The model directory's "encoder" entry: the spec without the store's trunk fields, with ``tuned``."""
        enc = {k: v for k, v in encoder.items() if k not in ("cut", "trunk_grid", "trunk_channels", "tuned")}
        weights = self.encoder_weights()
        if weights is not None:
            enc["tuned"] = tuned_record(weights, self.units, self.back.batchnorm)
        return enc


def _unit_names(back: Back, units: int) -> tuple[str, ...]:
    n = back.n
    return tuple([f"_blocks.{i}." for i in range(n - (units - 1), n)] + ["_conv_head.", "_bn1."])


def tuned_decoder(inner: Decoder, store_encoder: dict, train_blocks: int, batchnorm: str,
                  init: tuple[dict[str, torch.Tensor], int] | None, where: str) -> TunedDecoder:
    """The decoder of a run on a trunk store: the back of the store's ``cut`` units with the packaged weights
    (those of ``init``, the starting model's tuned units, over them), its last ``train_blocks`` units trainable."""
    cut = store_encoder["cut"]
    spec = get_encoder_spec(store_encoder["name"], resize=store_encoder.get("resize"),
                            image_size=store_encoder.get("image_size"), grid=store_encoder.get("grid"))
    try:
        check_trunk(spec, store_encoder, f"{where}/meta.json")
    except TailError as e:
        raise TrainError(str(e)) from None
    net = spec.build()
    tuned_units = 0
    if init is not None:
        weights, tuned_units = init
        if tuned_units > cut:
            raise TrainError(f"init_from's encoder was tuned in its last {tuned_units} units, but {where} holds the "
                             f"maps before the last {cut}; make a store with `captioner features --cut {tuned_units}`")
        load_tail(net, weights, tuned_units, "init_from's encoder.safetensors")
    back = Back(net, cut, batchnorm)
    back.trainable(train_blocks)
    return TunedDecoder(inner, back, tuple(store_encoder["trunk_grid"]), max(train_blocks, tuned_units))


def on_store(cfg: TrainConfig, decoder: Decoder, store_encoder: dict, init_cfg: dict | None) -> Decoder:
    """The decoder a run trains: ``decoder`` itself on a store of grids, a :class:`TunedDecoder` on a trunk store.
    A TrainError when the settings, the starting model and the store do not go together."""
    init = None
    if init_cfg is not None:
        try:
            init = read_encoder_file(resolve_model_path(cfg.init_from), init_cfg)
        except EncoderFileError as e:
            raise TrainError(f"init_from={cfg.init_from}: {e}") from None
    cut, blocks = store_encoder.get("cut", 0), cfg.encoder.train_blocks
    if not cut:
        if blocks:
            raise TrainError(f"encoder.train_blocks={blocks}: fine-tuning the encoder trains on a trunk store, the maps "
                             f"before its last units, but {cfg.data.features} holds finished grids; make one with "
                             f"`captioner features --corpus CORPUS.json --out DIR --cut {blocks}` and set "
                             "data.features=DIR")
        if init is not None:
            raise TrainError(f"init_from={cfg.init_from}: its encoder was fine-tuned (its last {init[1]} units), so the "
                             f"grids in {cfg.data.features} (made by the packaged encoder) are not its grids; train on "
                             f"a trunk store: `captioner features --corpus CORPUS.json --out DIR --cut {init[1]}`")
        return decoder
    if blocks > cut:
        raise TrainError(f"encoder.train_blocks={blocks}: {cfg.data.features} holds the maps before the encoder's "
                         f"last {cut} units, so at most {cut} can train; make a store with --cut {blocks}")
    return tuned_decoder(decoder, store_encoder, blocks, cfg.encoder.batchnorm, init, cfg.data.features)


def param_groups(cfg: TrainConfig, decoder: Decoder) -> list[dict]:
    """The optimizer's groups: the decoder's trainable weights at optim.lr, the encoder's at encoder.lr (each
    group's ``base_lr`` is what schedules scale)."""
    inner = decoder.inner if isinstance(decoder, TunedDecoder) else decoder
    groups = [{"params": [p for p in inner.parameters() if p.requires_grad], "lr": cfg.optim.lr,
               "base_lr": cfg.optim.lr}]
    if isinstance(decoder, TunedDecoder):
        tuned = [p for p in decoder.back.parameters() if p.requires_grad]
        if tuned:
            groups.append({"params": tuned, "lr": cfg.encoder.lr, "base_lr": cfg.encoder.lr})
    return groups


def restore_tuned(decoder: TunedDecoder, model_dir: Path, state: dict[str, torch.Tensor]) -> None:
    """Back to a best/ written by this run: the decoder's weights ``state`` and the tuned units' (if any)."""
    decoder.inner.load_state_dict(state)
    cfg = json.loads((model_dir / "config.json").read_text())
    tuned = read_encoder_file(model_dir, cfg)
    if tuned is not None:
        decoder.back.load_net_state(tuned[0])
