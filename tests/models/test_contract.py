"""The contract every registered architecture keeps, run over all of them (in the spirit of
Hugging Face's shared model tester): stepping equals teacher forcing, beam 1 equals greedy,
beam-search state reordering is right, the model directory round-trips, every trainable
parameter gets a gradient, and attention is present exactly when the model says it attends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from captioner.data.text import Vocab
from captioner.decoding.search import beam_search, decode, greedy_search
from captioner.decoding.search import _expand, _select
from captioner.models import available_architectures, build_decoder
from captioner.inference.modeldir import load_model_dir, save_model_dir

from .test_sat import random_captions

V, P, C = 14, 5, 12
START, END, PAD = 1, 2, 0

# small sizes per architecture; a new architecture must add itself here (checked below)
SMALL = {
    "sat": dict(embed_dim=16, hidden_dim=16, attention_dim=16),
    "bahdanau-gru": dict(embed_dim=16, proj_dim=16, hidden_dim=16, attention_dim=16),
    "gru-residual": dict(embed_dim=16, hidden_dim=16, heads=2),
    "merge": dict(word_vectors="", freeze_embeddings=False, embed_dim=16, hidden_dim=16, num_layers=2),
    "transformer": dict(embed_dim=16, d_model=16, heads=2, num_layers=2, ff_dim=32),
}
ARCHS = available_architectures()


def test_every_architecture_is_covered():
    assert sorted(SMALL) == ARCHS
    assert {"sat", "bahdanau-gru", "gru-residual", "merge", "transformer"} <= set(ARCHS)


def make(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_decoder(arch, {**SMALL[arch], "vocab_size": V, "feature_dim": C})
    with torch.no_grad():  # larger weights than the default init, so outputs depend on their inputs
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.6 / p.shape[-1] ** 0.25)
    for m in model.modules():  # batch norm with running statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_(0.0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def batch(seed: int = 0, word_counts=(7, 5, 5, 2, 0)):
    return random_captions(seed, word_counts, V, P, C)


@pytest.mark.parametrize("arch", ARCHS)
def test_step_by_step_equals_teacher_forcing(arch):
    model = make(arch)
    feats, tokens, lengths = batch()
    with torch.no_grad():
        out = model(feats, tokens, lengths)
        B, T = tokens.shape[0], int(lengths.max()) - 1
        assert out.logits.shape == (B, T, V)
        forced = F.log_softmax(out.logits, dim=-1)
        memory = model.encode(feats)
        state = model.init_state(memory)
        checked = 0
        for t in range(T):
            logp, state, att = model.step(tokens[:, t], state, memory)
            assert logp.shape == (B, V)
            assert (att is not None) == model.has_attention
            for b in range(B):
                if t < int(lengths[b]) - 1:
                    torch.testing.assert_close(logp[b], forced[b, t], rtol=1e-5, atol=1e-5)
                    if model.has_attention:
                        torch.testing.assert_close(att[b], out.attention[b, t], rtol=1e-5, atol=1e-5)
                        assert float(att[b].sum()) == pytest.approx(1.0, abs=1e-5)
                    checked += 1
    assert checked == int((lengths - 1).sum())
    assert (out.attention is not None) == model.has_attention
    # the outputs depend on the image (not a language model only)
    with torch.no_grad():
        other = model(torch.randn(B, P, C), tokens, lengths)
    assert not torch.allclose(other.logits[0, :3], out.logits[0, :3], atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_one_equals_greedy(arch):
    model = make(arch, seed=1)
    feats = torch.randn(6, P, C, generator=torch.Generator().manual_seed(1))
    greedy = greedy_search(model, feats, start_id=START, end_id=END, max_len=9)
    beam = beam_search(model, feats, start_id=START, end_id=END, beam_size=1, max_len=9)
    assert len({tuple(g.tokens) for g in greedy}) >= 2  # different images, different captions
    for g, (b,) in zip(greedy, beam):
        assert g.tokens == b.tokens
        assert g.score == pytest.approx(b.score, abs=1e-5)
        if model.has_attention:
            if g.tokens:
                torch.testing.assert_close(g.attention, b.attention, rtol=1e-5, atol=1e-5)
        else:
            assert g.attention is None and b.attention is None


@pytest.mark.parametrize("arch", ARCHS)
def test_state_reorder_matches_running_each_row_alone(arch):
    """Reordering the state rows (what beam search does) and stepping gives the reordered
    outputs, and a batched beam search equals one image at a time."""
    model = make(arch, seed=2)
    feats = torch.randn(4, P, C, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        memory = _expand(model.encode(feats), 2)  # 8 rows
        state = model.init_state(memory)
        prev = torch.full((8,), START, dtype=torch.long)
        for t in range(3):
            _, state, _ = model.step(prev, state, memory)
            prev = torch.randint(3, V, (8,), generator=torch.Generator().manual_seed(t))
        perm = torch.tensor([3, 3, 0, 7, 1, 6, 2, 5])
        logp_all, _, att_all = model.step(prev, state, memory)
        logp_perm, _, att_perm = model.step(prev[perm], _select(state, perm), _select(memory, perm))
    torch.testing.assert_close(logp_perm, logp_all[perm], rtol=1e-5, atol=1e-5)
    if model.has_attention:
        torch.testing.assert_close(att_perm, att_all[perm], rtol=1e-5, atol=1e-5)

    together = beam_search(model, feats, start_id=START, end_id=END, beam_size=3, n_best=3, max_len=8)
    for i in range(feats.shape[0]):
        (alone,) = beam_search(model, feats[i:i + 1], start_id=START, end_id=END, beam_size=3, n_best=3,
                               max_len=8)
        assert [h.tokens for h in alone] == [h.tokens for h in together[i]]
        for a, b in zip(alone, together[i]):
            assert a.score == pytest.approx(b.score, abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_model_directory_round_trip(arch, tmp_path):
    model = make(arch, seed=3)
    vocab = Vocab.build([[f"w{i}" for i in range(V - 4)]], min_freq=1)
    assert len(vocab) == V
    save_model_dir(tmp_path / "m", model, vocab, {"decoding": {"beam_size": 3, "max_len": 10}})
    loaded, vocab2, cfg = load_model_dir(tmp_path / "m")
    assert cfg["arch"] == arch and type(loaded) is type(model) and vocab2.itos == vocab.itos
    assert loaded.cfg == model.cfg
    feats, tokens, lengths = batch(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(feats, tokens, lengths).logits, model(feats, tokens, lengths).logits,
                                   rtol=0, atol=0)
    a = decode(model, feats, start_id=START, end_id=END, beam_size=3, n_best=2, max_len=8)
    b = decode(loaded, feats, start_id=START, end_id=END, beam_size=3, n_best=2, max_len=8)
    assert [[h.tokens for h in x] for x in a] == [[h.tokens for h in x] for x in b]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_trainable_parameter_gets_a_gradient(arch):
    model = make(arch, seed=4).train()
    feats, tokens, lengths = batch(4)
    out = model(feats, tokens, lengths)
    T = out.logits.shape[1]
    mask = torch.arange(T).unsqueeze(0) < (lengths - 1).unsqueeze(1)
    loss = F.cross_entropy(out.logits[mask], tokens[:, 1:T + 1][mask])
    if out.extra_loss is not None:
        loss = loss + out.extra_loss
    loss.backward()
    # biases that add the same amount to every score of a softmax get an exactly zero gradient
    shift_invariant = ("attention.w.bias", "V.bias", "attention.W_k.bias", "self_attn.W_k.bias",
                       "cross_attn.W_k.bias")
    unconnected = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    zero = [n for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None and not p.grad.any() and not n.endswith(shift_invariant)]
    assert not unconnected and not zero


@pytest.mark.parametrize("arch", ARCHS)
def test_freeze_embeddings_leaves_only_the_embedding_without_gradient(arch):
    model = build_decoder(arch, {**SMALL[arch], "vocab_size": V, "feature_dim": C, "freeze_embeddings": True})
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["embed.weight"]
