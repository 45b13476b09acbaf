"""Tests for the Show-Attend-Tell decoder: teacher forcing vs stepping, attention, regulariser,
gradients, gate and initial state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from captioner.models import build_decoder
from captioner.models.sat import SATConfig, SATDecoder

V, P, C = 12, 4, 8
START, END, PAD = 1, 2, 0


def make(seed: int = 0, **overrides) -> SATDecoder:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, feature_dim=C, embed_dim=16, hidden_dim=16, attention_dim=16)
    cfg.update(overrides)
    model = SATDecoder(SATConfig(**cfg))
    with torch.no_grad():  # larger output weights than the default init: outputs depend on the input
        model.out.weight.normal_(0.0, 1.0)
    return model


def random_captions(seed: int, word_counts, V: int, P: int, C: int):
    """Random features and captions <start> w1..wn <end> <pad>..., sorted longest first; lengths = n + 2."""
    g = torch.Generator().manual_seed(seed)
    B, T1 = len(word_counts), max(word_counts) + 2
    tokens = torch.full((B, T1), PAD, dtype=torch.long)
    for b, n in enumerate(word_counts):
        tokens[b, 0] = START
        tokens[b, 1:n + 1] = torch.randint(3, V, (n,), generator=g)
        tokens[b, n + 1] = END
    lengths = torch.tensor([n + 2 for n in word_counts])
    return torch.randn(B, P, C, generator=g), tokens, lengths


def batch(seed: int = 0, word_counts=(6, 4, 4, 1, 0)):
    return random_captions(seed, word_counts, V, P, C)


def test_registered_and_buildable():
    model = build_decoder("sat", dict(vocab_size=V, feature_dim=C, embed_dim=16, hidden_dim=16, attention_dim=16))
    assert isinstance(model, SATDecoder) and model.arch_name == "sat"


def test_teacher_forcing_matches_stepping():
    model = make(0).eval()
    feats, tokens, lengths = batch(0)
    out = model(feats, tokens, lengths)
    B, T = tokens.shape[0], int(lengths.max()) - 1
    assert out.logits.shape == (B, T, V)
    assert out.attention.shape == (B, T, P)
    forced = F.log_softmax(out.logits, dim=-1)
    with torch.no_grad():
        memory = model.encode(feats)
        state = model.init_state(memory)
        for t in range(T):  # step the whole batch on the same tokens
            logp, state, alpha = model.step(tokens[:, t], state, memory)
            for b in range(B):
                if t < int(lengths[b]) - 1:
                    torch.testing.assert_close(forced[b, t], logp[b], rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(out.attention[b, t], alpha[b], rtol=1e-5, atol=1e-5)
    for b in range(B):  # positions past each caption's last target are untouched
        n = int(lengths[b]) - 1
        assert torch.count_nonzero(out.logits[b, n:]) == 0
        assert torch.count_nonzero(out.attention[b, n:]) == 0
        assert torch.count_nonzero(out.logits[b, :n].abs().sum(-1)) == n


def test_teacher_forcing_per_caption_equals_alone():
    """A caption's outputs do not depend on the other captions in the batch."""
    model = make(1).eval()
    feats, tokens, lengths = batch(1)
    out = model(feats, tokens, lengths)
    for b in range(tokens.shape[0]):
        n = int(lengths[b])
        alone = model(feats[b:b + 1], tokens[b:b + 1, :n], lengths[b:b + 1])
        torch.testing.assert_close(out.logits[b, :n - 1], alone.logits[0], rtol=1e-5, atol=1e-5)


def test_forward_requires_sorted_lengths():
    model = make(0).eval()
    feats, tokens, lengths = batch(0, word_counts=(2, 5, 1))
    with pytest.raises(ValueError, match="sorted by decreasing length"):
        model(feats, tokens, lengths)
    # equal lengths are fine
    feats, tokens, lengths = batch(0, word_counts=(3, 3, 3))
    assert model(feats, tokens, lengths).logits.shape == (3, 4, V)


def test_attention_sums_to_one_and_regulariser_by_hand():
    model = make(2, alpha_c=0.7).eval()
    feats, tokens, lengths = batch(2)
    with torch.no_grad():
        out = model(feats, tokens, lengths)
    for b in range(tokens.shape[0]):
        n = int(lengths[b]) - 1
        torch.testing.assert_close(out.attention[b, :n].sum(-1), torch.ones(n), rtol=0, atol=1e-6)
        assert (out.attention[b, :n] > 0).all()
    B, att = tokens.shape[0], out.attention.detach()
    total = 0.0
    for b in range(B):
        for i in range(P):
            total += (1.0 - sum(float(att[b, t, i]) for t in range(int(lengths[b]) - 1))) ** 2
    expected = 0.7 * total / (B * P)
    assert out.extra_loss.dim() == 0
    assert float(out.extra_loss) == pytest.approx(expected, rel=1e-5)

    off = make(2, alpha_c=0.0).eval()
    assert float(off(feats, tokens, lengths).extra_loss.detach()) == 0.0


def test_gradients_reach_every_parameter():
    model = make(3).train()
    feats, tokens, lengths = batch(3)
    out = model(feats, tokens, lengths)
    targets = tokens[:, 1:out.logits.shape[1] + 1]
    ce = F.cross_entropy(out.logits.reshape(-1, V), targets.reshape(-1), ignore_index=PAD)
    (ce + out.extra_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name == "attention.w.bias":
            # a bias added to every e_ti cancels in the softmax: it can never learn
            assert float(p.grad.abs().max()) < 1e-6
        else:
            assert float(p.grad.abs().sum()) > 0, name
    # the <pad> embedding row gets no gradient (padding_idx)
    assert float(model.embed.weight.grad[PAD].abs().sum()) == 0.0


def _perturbed(model: SATDecoder, param: str) -> SATDecoder:
    other = copy.deepcopy(model)
    with torch.no_grad():
        p = dict(other.named_parameters())[param]
        p.add_(torch.randn_like(p))
    return other


@pytest.mark.parametrize("param", ["f_beta.weight", "f_beta.bias", "init_h.weight", "init_c.weight",
                                   "attention.W_a.weight", "attention.W_h.weight"])
def test_gate_initial_state_and_attention_layers_are_used(param):
    model = make(4).eval()
    feats, tokens, lengths = batch(4)
    base = model(feats, tokens, lengths).logits
    changed = _perturbed(model, param)(feats, tokens, lengths).logits
    assert not torch.allclose(base, changed, atol=1e-4)


def test_gate_is_a_sigmoid_of_the_hidden_state():
    """A hugely negative f_beta bias closes the gate: the context no longer reaches the LSTM,
    so the outputs stop depending on the features except through the initial state."""
    model = make(5).eval()
    with torch.no_grad():
        model.f_beta.bias.fill_(-1e4)
    feats, tokens, lengths = batch(5)
    memory = model.encode(feats)
    state = model.init_state(memory)
    shuffled = (memory[0][:, torch.randperm(P)], memory[1])  # same keys, different values
    a = model.step(tokens[:, 0], state, memory)[0]
    b = model.step(tokens[:, 0], state, shuffled)[0]
    torch.testing.assert_close(a, b)
    model.f_beta.bias.data.fill_(0.0)
    c = model.step(tokens[:, 0], state, memory)[0]
    d = model.step(tokens[:, 0], state, shuffled)[0]
    assert not torch.allclose(c, d, atol=1e-5)


def test_initial_state_from_mean_feature():
    model = make(6).eval()
    feats = torch.randn(3, P, C)
    h, c = model.init_state(model.encode(feats))
    mean = feats.mean(1)
    torch.testing.assert_close(h, model.init_h(mean))
    torch.testing.assert_close(c, model.init_c(mean))
    # the order of the regions does not matter for the initial state
    h2, c2 = model.init_state(model.encode(feats[:, torch.randperm(P)]))
    torch.testing.assert_close(h, h2)
    torch.testing.assert_close(c, c2)


def test_dropout_only_in_training():
    model = make(7, dropout=0.5)
    feats, tokens, lengths = batch(7)
    model.eval()
    a, b = model(feats, tokens, lengths).logits, model(feats, tokens, lengths).logits
    torch.testing.assert_close(a, b)
    model.train()
    torch.manual_seed(0)
    c = model(feats, tokens, lengths).logits
    assert not torch.allclose(a, c)
