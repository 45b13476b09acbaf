"""Caption decoders. Importing this package registers every architecture."""

from __future__ import annotations

from ..config import from_dict
from .base import Decoder, DecoderOutput, available_architectures, get_architecture, register_architecture
from . import sat  # noqa: F401  (registers "sat")


def build_decoder(arch: str, config: dict) -> Decoder:
    cls, cfg_cls = get_architecture(arch)
    return cls(from_dict(cfg_cls, dict(config), where=f"model ({arch})"))


__all__ = ["Decoder", "DecoderOutput", "available_architectures", "build_decoder", "get_architecture",
           "register_architecture"]
