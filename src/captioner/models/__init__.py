"""Caption decoders. Importing this package registers every architecture."""

from __future__ import annotations

from captioner.config import from_dict
from captioner.models.base import (Decoder, DecoderConfig, DecoderOutput, available_architectures, get_architecture,
                                   register_architecture)
from captioner.models.wordvec import init_embedding, vector_dim
from captioner.models import sat  # noqa: F401,E402  (registers each architecture)
from captioner.models import bahdanau_gru  # noqa: F401,E402
from captioner.models import gru_residual  # noqa: F401,E402
from captioner.models import merge  # noqa: F401,E402
from captioner.models import transformer  # noqa: F401,E402


def build_decoder(arch: str, config: dict, vocab=None) -> Decoder:
    """The decoder ``arch`` with its config ``config`` (a dict of its config dataclass's fields).

    Given the ``vocab`` (when training starts), the word embedding is initialised from the
    pretrained ``word_vectors`` the config names, and ``embed_dim`` defaults to their size; the
    report of words found is kept as ``decoder.word_vector_report``. Without it (loading a
    saved model), the weights come from the model directory instead. ``freeze_embeddings``
    applies in both cases."""
    cls, cfg_cls = get_architecture(arch)
    config = dict(config)
    cfg = from_dict(cfg_cls, config, where=f"model ({arch})")
    # an architecture whose config does not extend DecoderConfig has no word-vector options
    word_vectors, freeze = getattr(cfg, "word_vectors", ""), getattr(cfg, "freeze_embeddings", False)
    if vocab is not None and word_vectors and "embed_dim" not in config:
        config["embed_dim"] = vector_dim(word_vectors)
        cfg = from_dict(cfg_cls, config, where=f"model ({arch})")
    if vocab is not None and freeze and not word_vectors:
        raise ValueError(f"model.freeze_embeddings=true without model.word_vectors would train {arch} with a "
                         "fixed random word embedding; set model.word_vectors=glove-6b-50d or "
                         "model.freeze_embeddings=false")
    decoder = cls(cfg)
    decoder.word_vector_report = None
    if vocab is not None and word_vectors:
        decoder.word_vector_report = init_embedding(decoder.embed, vocab, word_vectors)
    if freeze:
        decoder.embed.weight.requires_grad_(False)
    return decoder


__all__ = ["Decoder", "DecoderConfig", "DecoderOutput", "available_architectures", "build_decoder",
           "get_architecture", "register_architecture"]
