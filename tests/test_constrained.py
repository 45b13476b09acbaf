"""Constrained beam search (captioner.decoding.constrained) on every architecture.

The decoders are tiny ones of each registered architecture (captioner.models.build_decoder), trained here
for a second on a synthetic "language" whose captions the features determine: word A (4..7) and word B
(8..11) are read from two regions, and each image has three paraphrases, so a decoder's captions depend on
the image, vary in length and end with <end>. The searches then ask for words a caption does not hold.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from captioner.decoding.constrained import constrained_beam_search
from captioner.decoding.search import Hypothesis, beam_search
from captioner.decoding.settings import DecodingSettings
from captioner.models import available_architectures, build_decoder

PAD, START, END, UNK = 0, 1, 2, 3
V, C, P = 16, 8, 4
BANNED = (PAD, START, UNK)
WORDS = list(range(4, V))
SIZES = {
    "sat": dict(embed_dim=16, hidden_dim=32, attention_dim=16),
    "bahdanau-gru": dict(embed_dim=16, proj_dim=16, hidden_dim=32, attention_dim=16),
    "gru-residual": dict(embed_dim=16, hidden_dim=32, heads=2),
    "merge": dict(word_vectors="", freeze_embeddings=False, embed_dim=16, hidden_dim=32, num_layers=1),
    "transformer": dict(embed_dim=16, d_model=32, heads=2, num_layers=1, ff_dim=32, max_regions=16),
}
ARCHS = available_architectures()


def test_every_architecture_has_sizes_here():
    assert sorted(SIZES) == ARCHS


def synthetic_batch(g: torch.Generator, n: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Features (n, P, C) and one caption per image (word ids, no <start>/<end>)."""
    a, b = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)
    feats = torch.randn(n, P, C, generator=g) * 0.3
    feats[torch.arange(n), 0, a] += 2.0
    feats[torch.arange(n), 1, 4 + b] += 2.0
    para = torch.randint(0, 3, (n,), generator=g).tolist()
    caps = [[[A, 12, B], [A, 13, B, 14, 15], [B, 12, A, 14]][p]
            for A, B, p in zip((4 + a).tolist(), (8 + b).tolist(), para)]
    return feats, caps


def train(arch: str, steps: int = 120, batch: int = 48):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = build_decoder(arch, dict(vocab_size=V, feature_dim=C, dropout=0.0, **SIZES[arch]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        feats, caps = synthetic_batch(g, batch)
        order = sorted(range(batch), key=lambda i: -len(caps[i]))  # forward wants decreasing lengths
        caps = [caps[i] for i in order]
        tokens = torch.zeros(batch, len(caps[0]) + 2, dtype=torch.long)
        for i, c in enumerate(caps):
            tokens[i, :len(c) + 2] = torch.tensor([START, *c, END])
        out = model(feats[order], tokens, torch.tensor([len(c) + 2 for c in caps]))
        loss = F.cross_entropy(out.logits.reshape(-1, V), tokens[:, 1:].reshape(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: threads only contend (the suite shares two cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(one_thread) -> dict:
    return {arch: train(arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def feats() -> torch.Tensor:
    return synthetic_batch(torch.Generator().manual_seed(5), 6)[0]


def settings(**kw) -> DecodingSettings:
    return DecodingSettings(**{"beam_size": 3, "max_len": 10, **kw}).checked()


def plain(model, feats, s: DecodingSettings) -> list[list[Hypothesis]]:
    return beam_search(model, feats, s, start_id=START, end_id=END, banned=BANNED)


def cbs(model, feats, groups, s: DecodingSettings, **kw) -> list[list[Hypothesis]]:
    return constrained_beam_search(model, feats, groups, s, start_id=START, end_id=END, banned=kw.pop("banned", BANNED),
                                   **kw)


def absent(hyps: list[Hypothesis], n: int, skip: int = 0) -> list[int]:
    """``n`` words that no hypothesis of ``hyps`` holds (the ``skip`` first such left out)."""
    used = {w for h in hyps for w in h.tokens}
    return [w for w in WORDS if w not in used][skip:skip + n]


def holds(h: Hypothesis, groups) -> bool:
    return all(any(w in h.tokens for w in g) for g in groups)


def teacher_forced(model, feats1: torch.Tensor, h: Hypothesis) -> float:
    """log p(tokens (+ <end> when finished) | image) by stepping the model over the hypothesis's own words."""
    with torch.inference_mode():
        memory = model.encode(feats1)
        state = model.init_state(memory)
        prev, total = torch.tensor([START]), 0.0
        for w in h.tokens + ([END] if h.finished else []):
            logp, state, _ = model.step(prev, state, memory)
            total += float(logp[0, w])
            prev = torch.tensor([w])
    return total


def same(a: list[Hypothesis], b: list[Hypothesis], atol: float) -> None:
    assert [h.tokens for h in a] == [h.tokens for h in b]
    assert [h.finished for h in a] == [h.finished for h in b]
    assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=atol, rel=0)
    assert [h.norm_score for h in a] == pytest.approx([h.norm_score for h in b], abs=atol, rel=0)
    for x, y in zip(a, b):
        assert (x.attention is None) == (y.attention is None)
        if x.attention is not None:
            torch.testing.assert_close(x.attention, y.attention, rtol=0, atol=max(atol, 1e-6))


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_the_trained_decoders_caption_by_image(models, feats, arch):
    """The fixture is what the other tests need: captions that end and differ between images."""
    hyps = plain(models[arch], feats, settings())
    assert len({tuple(h[0].tokens) for h in hyps}) >= 3
    assert all(h[0].finished and 3 <= len(h[0].tokens) <= 5 for h in hyps)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kw", [dict(), dict(n_best=3, length_penalty=1.0), dict(no_repeat_ngram=2, beam_size=4)])
def test_without_groups_it_is_the_beam_search(models, feats, arch, kw):
    s = settings(**kw)
    model = models[arch]
    for got, want in zip(cbs(model, feats, [[] for _ in feats], s), plain(model, feats, s)):
        same(got, want, atol=1e-6)  # images leave the plain search's batch early: float rounding only
    for b in range(2):  # one image: the same computation, to the bit
        same(cbs(model, feats[b:b + 1], [[]], s)[0], plain(model, feats[b:b + 1], s)[0], atol=0.0)


def groups_for(hyps: list[list[Hypothesis]], n_groups: int, alternatives: bool) -> list[list[list[int]]]:
    """Per image, ``n_groups`` groups of words its plain captions lack (the last with two words to choose
    from when ``alternatives``)."""
    out = []
    for h in hyps:
        words = absent(h, n_groups + 1)
        groups = [[w] for w in words[:n_groups]]
        if alternatives:
            groups[-1].append(words[n_groups])
        out.append(groups)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_groups, alternatives", [(1, False), (2, False), (2, True), (3, True)])
def test_every_hypothesis_holds_a_word_of_each_group(models, feats, arch, n_groups, alternatives):
    model, s = models[arch], settings(n_best=3, max_len=12)
    before = plain(model, feats, s)
    groups = groups_for(before, n_groups, alternatives)
    assert not any(holds(h, g) for hs, g in zip(before, groups) for h in hs)  # asked for words it lacked
    after = cbs(model, feats, groups, s)
    for hs, g in zip(after, groups):
        assert len(hs) == 3 and all(holds(h, g) for h in hs)
        assert len({tuple(h.tokens) for h in hs}) == 3  # the n best are distinct captions
        assert [h.norm_score for h in hs] == sorted((h.norm_score for h in hs), reverse=True)
        if model.has_attention:  # an attention row per word
            assert all(h.attention is not None and h.attention.shape == (len(h.tokens), P) for h in hs)
        else:
            assert all(h.attention is None for h in hs)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_batch_equals_one_image_at_a_time(models, feats, arch):
    """Images with 0 to 3 groups in one batch: each as if searched alone (its missing groups count as met)."""
    model, s = models[arch], settings(n_best=2, length_penalty=0.5)
    before = plain(model, feats, s)
    sizes = [0, 1, 3, 2, 1, 0]
    groups = [groups_for([h], n, alternatives=n == 2)[0] if n else [] for h, n in zip(before, sizes)]
    together = cbs(model, feats, groups, s)
    for b, g in enumerate(groups):
        alone = cbs(model, feats[b:b + 1], [g], s)[0]
        same(together[b], alone, atol=1e-5)
        assert all(holds(h, g) for h in alone)


@pytest.mark.parametrize("arch", ARCHS)
def test_banned_rows_are_never_produced(models, feats, arch):
    model, s = models[arch], settings(n_best=3, max_len=12)
    before = plain(model, feats, s)
    groups = groups_for(before, 1, alternatives=False)
    rows = torch.zeros(len(feats), V, dtype=torch.bool)
    for b, h in enumerate(before):  # each image's own best words, and a word it lacks (not the asked one)
        rows[b, h[0].tokens[:2] + absent(h, 1, skip=1)] = True
    for g in (groups, [[] for _ in feats]):
        after = cbs(model, feats, g, s, banned_rows=rows)
        for b, hs in enumerate(after):
            assert hs and not any(rows[b, w] for h in hs for w in h.tokens)
            assert all(holds(h, g[b]) for h in hs)


class _Fewer:
    """``model`` with only the words ``keep`` (ascending ids, a word's new id its place there): the log-softmax over
    those words alone. A search of it is what ``absent_rows`` should give for the other words."""

    def __init__(self, model, keep: list[int]):
        self.model, self.keep = model, torch.tensor(keep)
        self.shares_memory, self.training = getattr(model, "shares_memory", False), False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def encode(self, feats):
        return self.model.encode(feats)

    def init_state(self, memory):
        return self.model.init_state(memory)

    def step(self, prev, state, memory):
        logp, state, att = self.model.step(self.keep[prev], state, memory)
        return torch.log_softmax(logp[:, self.keep], dim=-1), state, att


@pytest.mark.parametrize("arch", ARCHS)
def test_absent_words_are_as_if_the_model_had_no_such_words(models, feats, arch):
    """``absent_rows``: each image searched, in one batch, as a model without its absent words searches it alone
    (how images that need different added words are searched together: inference/guidance.py)."""
    model, s = models[arch], settings(n_best=2, length_penalty=0.5, no_repeat_ngram=2)
    before = plain(model, feats, s)
    groups = groups_for(before, 1, alternatives=False)
    rows = torch.zeros(len(feats), V, dtype=torch.bool)
    bans = torch.zeros(len(feats), V, dtype=torch.bool)
    for b, h in enumerate(before):  # its own best first word and one other word, never the asked one; a ban too
        rows[b, [h[0].tokens[0], *absent(h, 1, skip=1)]] = True
        bans[b, absent(h, 1, skip=2)] = True
    together = cbs(model, feats, groups, s, absent_rows=rows, banned_rows=bans)
    for b, g in enumerate(groups):
        keep = (~rows[b]).nonzero().flatten().tolist()  # the absent words are >= 4: <pad> ... <unk> keep their ids
        new = {w: i for i, w in enumerate(keep)}
        alone = cbs(_Fewer(model, keep), feats[b:b + 1], [[[new[w] for w in group] for group in g]], s,
                    banned_rows=bans[b:b + 1, keep])[0]
        for h in alone:
            h.tokens = [keep[i] for i in h.tokens]
        same(together[b], alone, atol=1e-5)
        assert together[b] and not any(rows[b, w] or bans[b, w] for h in together[b] for w in h.tokens)
    # so the check above can fail: with every word, some image's captions are others
    anyway = cbs(model, feats, groups, s, banned_rows=bans)
    assert any([h.tokens for h in x] != [h.tokens for h in y] for x, y in zip(together, anyway))


def repeated_bigram(tokens: list[int]) -> bool:
    pairs = list(zip(tokens, tokens[1:]))
    return len(set(pairs)) < len(pairs)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_repeat_ngram_holds_with_groups(models, feats, arch):
    # captions that may not end (<end> banned) run on to max_len past what they say, and repeat it
    model = models[arch]
    groups = groups_for(plain(model, feats, settings()), 2, alternatives=True)
    endless = BANNED + (END,)
    loose = cbs(model, feats, groups, settings(n_best=3, max_len=14), banned=endless)
    assert any(repeated_bigram(h.tokens) for hs in loose for h in hs)  # so the check below can fail
    strict = cbs(model, feats, groups, settings(n_best=3, max_len=14, no_repeat_ngram=2), banned=endless)
    for hs, g in zip(strict, groups):
        assert len(hs) == 3 and not any(repeated_bigram(h.tokens) or h.finished for h in hs)
        assert all(len(h.tokens) == 14 and holds(h, g) for h in hs)
    ended = cbs(model, feats, groups, settings(n_best=3, max_len=14, no_repeat_ngram=2))
    assert all(not repeated_bigram(h.tokens) and holds(h, g) for hs, g in zip(ended, groups) for h in hs)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_unreachable_group_gives_the_hypotheses_with_the_most_groups(models, feats, arch):
    model, s = models[arch], settings(n_best=2, max_len=12)
    before = plain(model, feats, s)
    reachable = groups_for(before, 2, alternatives=False)
    cut = [absent(h, 1, skip=2)[0] for h in before]  # a third word each, banned for the search
    groups = [g + [[w]] for g, w in zip(reachable, cut)]
    rows = torch.zeros(len(feats), V, dtype=torch.bool)
    rows[torch.arange(len(feats)), torch.tensor(cut)] = True
    fallback = cbs(model, feats, groups, s, banned_rows=rows)
    want = cbs(model, feats, reachable, s, banned_rows=rows)
    for hs, ws, g, w in zip(fallback, want, reachable, cut):
        assert hs and all(holds(h, g) and w not in h.tokens for h in hs)
        same(hs, ws, atol=1e-5)
    # banned for every image (``banned``): the same fallback
    every = cbs(model, feats[:1], [[[cut[0]], *reachable[0]]], s, banned=BANNED + (cut[0],))[0]
    assert [h.tokens for h in every] == [h.tokens for h in fallback[0]]


@pytest.mark.parametrize("arch", ARCHS)
def test_scores_are_the_models_own_log_probabilities(models, feats, arch):
    model, s = models[arch], settings(n_best=3, max_len=12, length_penalty=1.0)
    groups = groups_for(plain(model, feats, s), 3, alternatives=True)
    after = cbs(model, feats, groups, s)
    for b, hs in enumerate(after):
        for h in hs:
            assert abs(h.score - teacher_forced(model, feats[b:b + 1], h)) < 1e-4
            length = len(h.tokens) + (1 if h.finished else 0)  # <end> counts
            assert h.norm_score == pytest.approx(h.score / length, abs=1e-9)
