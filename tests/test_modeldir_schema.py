"""The config.json schema of model directories applies to every architecture, including ones
registered later: strict types from the config dataclass, bounded sizes, and the size estimate on
the meta device before anything is allocated (issue 7, case 4)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from captioner.models import base
from captioner.models.base import Decoder, register_architecture
from captioner.inference.modeldir import MAX_MODEL_BYTES, ModelDirError, estimate_parameters, validate_model_config


@dataclasses.dataclass
class ToyConfig:
    vocab_size: int = 0
    feature_dim: int = 1280
    d_model: int = 64
    num_layers: int = 2
    heads: int = 4
    ffn_dim: int = 256
    dropout: float = 0.1
    tie_embeddings: bool = True


class ToyDecoder(Decoder):
    """A stand-in for an architecture that does not exist yet (a Transformer-like stack)."""

    built_on: list[str] = []

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        ToyDecoder.built_on.append(str(torch.get_default_device()))
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(nn.TransformerDecoderLayer(cfg.d_model, cfg.heads, cfg.ffn_dim, cfg.dropout,
                                                               batch_first=True) for _ in range(cfg.num_layers))
        self.proj = nn.Linear(cfg.feature_dim, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)


@pytest.fixture
def toy_arch():
    register_architecture("toy-transformer", ToyConfig)(ToyDecoder)
    ToyDecoder.built_on.clear()
    yield "toy-transformer"
    base._ARCHITECTURES.pop("toy-transformer")


def toy_config(**model) -> dict:
    return {"format": "captioner-model", "version": 1, "arch": "toy-transformer",
            "model": {"vocab_size": 100, "feature_dim": 1280, **model}}


def test_a_new_architecture_is_checked_without_any_change_to_the_schema(toy_arch):
    validate_model_config(toy_config(d_model=128), "m/config.json", vocab_size=100)
    assert ToyDecoder.built_on == ["meta"]  # counted on the meta device only
    real = ToyDecoder(ToyConfig(vocab_size=100, d_model=128))
    assert estimate_parameters(toy_arch, dataclasses.asdict(real.cfg)) == \
        sum(p.numel() for p in real.parameters()) + sum(b.numel() for b in real.buffers())


@pytest.mark.parametrize(("model", "message"), [
    ({"num_layers": "2"}, "model.num_layers: expected a whole number, got '2'"),
    ({"heads": 0}, "model.heads must be a whole number from 1 to 1024, got 0"),
    ({"ffn_dim": -3}, "model.ffn_dim must be a whole number from 1 to 65536, got -3"),
    ({"d_model": True}, "model.d_model: expected a whole number, got True"),
    ({"dropout": 1.5}, "model.dropout must be from 0 to 1 (exclusive), got 1.5"),
    ({"dropout": float("nan")}, "model.dropout: expected a finite number, got nan"),
    ({"tie_embeddings": "yes"}, "model.tie_embeddings: expected true or false, got 'yes'"),
    ({"nope": 1}, "model: unknown field(s) ['nope'] for architecture 'toy-transformer'"),
    ({"vocab_size": 101}, "model.vocab_size is 101 but vocab.json beside it has 100 entries"),
    ({"feature_dim": 512, "encoder": True}, "model.feature_dim is 512 but encoder efficientnet-lite0 gives 1280"),
])
def test_a_new_architecture_gets_types_and_bounds(toy_arch, model, message):
    cfg = toy_config(**{k: v for k, v in model.items() if k != "encoder"})
    if model.get("encoder"):
        cfg["encoder"] = {"name": "efficientnet-lite0", "image_size": 224, "grid": [7, 7], "channels": 1280,
                          "mean": [127.0] * 3, "std": [128.0] * 3, "resize": "squash"}
    with pytest.raises(ModelDirError) as err:
        validate_model_config(cfg, "m/config.json", vocab_size=100)
    assert str(err.value).startswith("m/config.json: ") and message in str(err.value), str(err.value)
    assert ToyDecoder.built_on in ([], ["meta"])  # never built for real


def test_sizes_within_bounds_but_too_big_together_are_refused_before_allocating(toy_arch):
    # each size is allowed alone; 1024 layers of width 16384 would need ~4.4e12 bytes
    with pytest.raises(ModelDirError) as err:
        validate_model_config(toy_config(d_model=16384, num_layers=1024, ffn_dim=65536, heads=16), "m/config.json",
                              vocab_size=100)
    assert f"more than the {MAX_MODEL_BYTES / 2**30:.0f} GiB a model directory may need; refused before allocating" \
        in str(err.value)
    assert ToyDecoder.built_on == ["meta"]
