"""Devices: every tensor the decoding engine and the decoders create is made on the model's device.

The machines here have no GPU, so the check is made on the CPU with PyTorch's default device set
to "meta": the model and its inputs live on the CPU, and any tensor created without naming a device
lands on "meta" instead, so mixing it with the model's tensors fails at once (as a CPU tensor would
next to a CUDA model)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from captioner.decoding import beam_search, greedy_search, sample
from captioner.models import available_architectures, build_decoder
from captioner.train import caption_loss

from .models.test_contract import SMALL
from .models.test_sat import random_captions

V, P, C = 14, 5, 12
START, END = 1, 2
ARCHS = available_architectures()


@contextlib.contextmanager
def default_device_meta():
    before = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(before)


def make(arch: str):
    torch.manual_seed(0)
    model = build_decoder(arch, {**SMALL[arch], "vocab_size": V, "feature_dim": C})
    return model


def test_the_meta_default_device_catches_a_tensor_made_without_a_device():
    """The premise of the tests below: a device-less tensor next to the model's CPU tensors fails."""
    x = torch.ones(3)
    with default_device_meta():
        made = torch.zeros(3)
        assert made.device.type == "meta"
        with pytest.raises((RuntimeError, NotImplementedError)):
            (x + made).sum().item()
        assert torch.zeros(3, device=x.device).device.type == "cpu"


@pytest.mark.parametrize("arch", ARCHS)
def test_searches_and_sampling_create_tensors_on_the_models_device(arch):
    model = make(arch).eval()
    feats = torch.randn(3, P, C)
    with default_device_meta():
        greedy = greedy_search(model, feats, start_id=START, end_id=END, max_len=6, banned=(0, 1))
        beams = beam_search(model, feats, start_id=START, end_id=END, beam_size=3, max_len=6, n_best=2,
                            banned=(0, 1))
        drawn = sample(model, feats, start_id=START, end_id=END, max_len=6, num_samples=2, top_k=5, top_p=0.9,
                       banned=(0, 1))
        seeded = sample(model, feats, start_id=START, end_id=END, max_len=6, num_samples=2, seed=7)
    assert len(greedy) == 3 and all(len(b) == 2 for b in beams)
    assert all(len(d) == 2 for d in drawn) and all(len(d) == 2 for d in seeded)
    for h in [*greedy, *(h for b in beams for h in b), *(h for d in drawn for h in d)]:
        assert 0 not in h.tokens and 1 not in h.tokens and h.score <= 0
        if h.attention is not None:
            assert h.attention.device.type == "cpu" and h.attention.shape == (len(h.tokens), P)
    # the results are real numbers, the same as without the meta default
    assert [h.tokens for h in greedy] == [h.tokens for h in greedy_search(model, feats, start_id=START, end_id=END,
                                                                          max_len=6, banned=(0, 1))]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_training_step_creates_tensors_on_the_models_device(arch):
    model = make(arch).train()
    feats, tokens, lengths = random_captions(0, (6, 4, 4, 1), V, P, C)
    params = [p for p in model.parameters() if p.requires_grad]
    with default_device_meta():
        out = model(feats, tokens, lengths)
        loss, ce = caption_loss(out, tokens, lengths)
        loss.backward()
    assert loss.device.type == "cpu" and torch.isfinite(loss) and ce > 0
    assert all(p.grad is not None and p.grad.device.type == "cpu" for p in params)
    assert any(float(p.grad.abs().sum()) > 0 for p in params)
