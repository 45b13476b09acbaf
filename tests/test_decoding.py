"""Tests for captioner.decoding.search: greedy, batched beam search, n-best lists, length penalty, sampling.

Two kinds of model are used:

* tiny random Show-Attend-Tell decoders (weights re-drawn so that the captions depend on the
  image and vary in length: some end with <end>, some run into ``max_len``);
* a hand-made second-order Markov "decoder" with a fixed log-probability table, small enough
  to enumerate every sequence by brute force, built so that greedy decoding is not optimal.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from captioner.decoding.search import Hypothesis, beam_search, decode, greedy_search, sample
from captioner.models.base import Decoder
from captioner.models.sat import SATConfig, SATDecoder

START, END = 1, 2
P, C = 4, 8


# ---------------------------------------------------------------------------------------
# helpers


def make_sat(seed: int, batch: int = 6) -> tuple[SATDecoder, torch.Tensor]:
    """A tiny SAT decoder in eval mode + features (batch, P, C).

    The default init gives near-constant outputs (tiny output weights), so the embedding and
    output layer are re-drawn larger: captions then depend on the image and the words."""
    torch.manual_seed(seed)
    model = SATDecoder(SATConfig(vocab_size=12, feature_dim=C, embed_dim=16, hidden_dim=16,
                                 attention_dim=16))
    with torch.no_grad():
        model.embed.weight.normal_(0.0, 1.0)
        model.out.weight.normal_(0.0, 1.0)
    feats = torch.randn(batch, P, C) * 2
    return model.eval(), feats


def sat_sequence_score(model: Decoder, feats: torch.Tensor, tokens: list[int], finished: bool) -> float:
    """Sum of the model's log-probs of ``tokens`` (+ <end> if finished) for one image (1, P, C)."""
    with torch.no_grad():
        memory = model.encode(feats)
        state = model.init_state(memory)
        prev = torch.tensor([START])
        total = 0.0
        for w in tokens + ([END] if finished else []):
            logp, state, _ = model.step(prev, state, memory)
            total += float(logp[0, w])
            prev = torch.tensor([w])
    return total


def assert_same_hyp(a: Hypothesis, b: Hypothesis, *, exact: bool = True, atol: float = 1e-5) -> None:
    assert a.tokens == b.tokens
    assert a.finished == b.finished
    if exact:
        assert a.score == b.score
        assert a.norm_score == b.norm_score
    else:
        assert a.score == pytest.approx(b.score, abs=atol)
        assert a.norm_score == pytest.approx(b.norm_score, abs=atol)
    if a.attention is None or b.attention is None:
        assert a.attention is None and b.attention is None
    else:
        assert a.attention.shape == b.attention.shape
        torch.testing.assert_close(a.attention, b.attention, rtol=0, atol=0 if exact else atol)


# The hand-made model: vocabulary <pad> <start> <end> a b c; the next-word distribution depends
# on the last two tokens (the state holds the one before the previous token, so beam search
# must reorder the state correctly to reproduce the brute-force scores).
PAD, A, B, Cw = 0, 3, 4, 5
V_HAND = 6


def _hand_table() -> torch.Tensor:
    m = torch.full((V_HAND, V_HAND), 0.01, dtype=torch.float64)
    m[START] = torch.tensor([0.01, 0.01, 0.01, 0.45, 0.35, 0.17])  # greedy starts with "a" ...
    m[A] = torch.tensor([0.01, 0.01, 0.24, 0.26, 0.25, 0.23])  # ... where everything is flat
    m[B] = torch.tensor([0.01, 0.01, 0.90, 0.03, 0.03, 0.02])  # "b <end>" is the best caption
    m[Cw] = torch.tensor([0.01, 0.01, 0.60, 0.02, 0.02, 0.34])
    m[PAD] = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2, 0.001])
    gen = torch.Generator().manual_seed(0)
    second_order = torch.randn(V_HAND, V_HAND, V_HAND, generator=gen, dtype=torch.float64)
    return torch.log_softmax(m.log()[None] + 0.1 * second_order, dim=-1)  # [prev_prev, prev, next]


HAND_TABLE = _hand_table()


class TableDecoder(Decoder):
    """log p(next | prev_prev, prev) = HAND_TABLE[prev_prev, prev]; state = (prev_prev,)."""

    def __init__(self, table: torch.Tensor = HAND_TABLE):
        super().__init__()
        self.table = table.float()

    def init_state(self, memory):
        return (torch.full((memory[0].shape[0],), START, dtype=torch.long),)

    def step(self, prev_tokens, state, memory):
        return self.table[state[0], prev_tokens], (prev_tokens.clone(),), None


def brute_force(max_len: int, length_penalty: float = 0.0) -> list[tuple[float, float, list[int], bool]]:
    """Every caption the decoder can produce within max_len steps, best first:
    (norm_score, score, tokens, finished). Finished = ends with <end> (counted in the length);
    unfinished = max_len words without <end>."""
    out = []
    for n in range(1, max_len + 1):
        for seq in itertools.product(range(V_HAND), repeat=n):
            if END in seq[:-1]:
                continue
            finished = seq[-1] == END
            if not finished and n < max_len:
                continue
            pp, p, score = START, START, 0.0
            for w in seq:
                score += float(HAND_TABLE[pp, p, w])
                pp, p = p, w
            norm = score / n ** length_penalty if length_penalty else score
            out.append((norm, score, list(seq[:-1]) if finished else list(seq), finished))
    out.sort(key=lambda x: -x[0])
    return out


def hand_score(tokens: list[int], finished: bool) -> float:
    pp, p, score = START, START, 0.0
    for w in tokens + ([END] if finished else []):
        score += float(HAND_TABLE[pp, p, w])
        pp, p = p, w
    return score


# ---------------------------------------------------------------------------------------
# beam size 1 == greedy


@pytest.mark.parametrize("length_penalty", [0.0, 0.7])
def test_beam_size_one_is_greedy(length_penalty):
    lengths, finished = set(), set()
    for seed in range(4):
        model, feats = make_sat(seed)
        greedy = greedy_search(model, feats, start_id=START, end_id=END, max_len=8,
                               length_penalty=length_penalty)
        beam = beam_search(model, feats, start_id=START, end_id=END, beam_size=1, max_len=8,
                           length_penalty=length_penalty)
        via_decode = decode(model, feats, start_id=START, end_id=END, beam_size=1, max_len=8,
                            length_penalty=length_penalty)
        assert len(greedy) == len(beam) == len(via_decode) == feats.shape[0]
        for g, bl, d in zip(greedy, beam, via_decode):
            assert len(bl) == 1 and len(d) == 1
            # beam search drops images from its batch as they finish, so its matrix products run on
            # other row counts than greedy's: the same words, scores equal up to float32 rounding
            assert_same_hyp(g, bl[0], exact=False, atol=1e-5)
            assert_same_hyp(g, d[0])
            lengths.add(len(g.tokens))
            finished.add(g.finished)
    # the comparison covered captions of several lengths, ending with <end> and cut at max_len
    assert len(lengths) >= 4 and 8 in lengths and 0 in lengths
    assert finished == {True, False}


def test_greedy_scores_are_the_models_log_probs():
    model, feats = make_sat(1)
    for b, h in enumerate(greedy_search(model, feats, start_id=START, end_id=END, max_len=8)):
        assert h.score == pytest.approx(sat_sequence_score(model, feats[b:b + 1], h.tokens, h.finished),
                                        abs=1e-5)
        assert END not in h.tokens


# ---------------------------------------------------------------------------------------
# beam search against brute force


def test_beam_search_finds_the_best_sequence_where_greedy_does_not():
    model, feats = TableDecoder(), torch.zeros(1, 1, 1)
    max_len = 4
    best_norm, best_score, best_tokens, best_finished = brute_force(max_len)[0]
    greedy = greedy_search(model, feats, start_id=START, end_id=END, max_len=max_len)[0]
    assert greedy.tokens != best_tokens
    assert greedy.score < best_score - 0.5  # greedy is clearly not optimal here
    hyps = beam_search(model, feats, start_id=START, end_id=END, beam_size=3, max_len=max_len, n_best=3)[0]
    assert hyps[0].tokens == best_tokens == [B]
    assert hyps[0].finished is best_finished is True
    assert hyps[0].score == pytest.approx(best_score, abs=1e-5)
    for h in hyps:  # every score is the sum of the log-probs of its words (and <end>)
        assert h.score == pytest.approx(hand_score(h.tokens, h.finished), abs=1e-5)
        assert h.attention is None  # this model does not attend


@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0, 2.0])
def test_exhaustive_beam_equals_brute_force_ranking(length_penalty):
    """With more beams than sequences nothing is pruned: the n-best list is the true ranking."""
    max_len = 3
    truth = brute_force(max_len, length_penalty)
    assert len(truth) == 1 + 5 + 25 + 125
    hyps = beam_search(TableDecoder(), torch.zeros(1, 1, 1), start_id=START, end_id=END,
                       beam_size=len(truth) + 10, max_len=max_len, length_penalty=length_penalty,
                       n_best=len(truth) + 10)[0]
    assert len(hyps) == len(truth)  # the never-started extra beams are dropped
    top = 12
    assert [h.tokens for h in hyps[:top]] == [t[2] for t in truth[:top]]
    for h, (norm, score, tokens, finished) in zip(hyps, truth):
        assert h.norm_score == pytest.approx(norm, abs=1e-5)
    by_tokens = {tuple(t[2]): t for t in truth}
    for h in hyps:
        norm, score, _, finished = by_tokens[tuple(h.tokens)]
        assert h.finished == finished
        assert h.score == pytest.approx(score, abs=1e-5)


def test_length_penalty_changes_the_ranking():
    model, feats = TableDecoder(), torch.zeros(1, 1, 1)
    kw = dict(start_id=START, end_id=END, beam_size=3, max_len=3, n_best=3)
    raw = beam_search(model, feats, length_penalty=0.0, **kw)[0]
    long = beam_search(model, feats, length_penalty=2.0, **kw)[0]
    assert raw[0].tokens == [B]  # "b <end>": best raw log-probability
    assert long[0].tokens == [A, B]  # "a b <end>": best once length is rewarded
    assert {tuple(h.tokens) for h in raw} == {tuple(h.tokens) for h in long}  # same search, re-ranked
    for hyps, lp in ((raw, 0.0), (long, 2.0)):
        for h in hyps:
            length = len(h.tokens) + (1 if h.finished else 0)  # <end> counts
            assert h.norm_score == pytest.approx(h.score / length ** lp if lp else h.score, abs=1e-6)
        assert [h.norm_score for h in hyps] == sorted((h.norm_score for h in hyps), reverse=True)


def test_length_penalty_formula_on_sat_unfinished_and_finished():
    model, feats = make_sat(3)
    lp = 0.8
    seen = set()
    for hyps in beam_search(model, feats, start_id=START, end_id=END, beam_size=4, max_len=8,
                            length_penalty=lp, n_best=4):
        for h in hyps:
            length = len(h.tokens) + (1 if h.finished else 0)
            assert h.norm_score == pytest.approx(h.score / max(length, 1) ** lp, rel=1e-6, abs=1e-6)
            seen.add(h.finished)
    assert seen == {True, False}


# ---------------------------------------------------------------------------------------
# batching, n-best


def test_batched_beam_search_equals_one_image_at_a_time():
    for seed in (0, 2, 3):
        model, feats = make_sat(seed, batch=5)
        kw = dict(start_id=START, end_id=END, beam_size=3, max_len=8, n_best=3, length_penalty=0.5)
        batched = beam_search(model, feats, **kw)
        assert len(batched) == feats.shape[0]
        for b in range(feats.shape[0]):
            alone = beam_search(model, feats[b:b + 1], **kw)
            assert len(alone) == 1 and len(alone[0]) == len(batched[b]) == 3
            for x, y in zip(batched[b], alone[0]):
                assert_same_hyp(x, y, exact=False)


def test_images_leave_the_beam_batch_once_their_result_is_settled():
    """Without a length penalty an image stops when its n_best best beams have ended (a running beam's
    score only falls): its best caption is the one the search finds when it runs every beam to its
    end (n_best = beam), and fewer rows go through the network."""
    for seed in range(6):
        model, feats = make_sat(seed, batch=8)
        rows = []
        real_step = model.step

        def counting(prev, state, memory):
            rows.append(prev.shape[0])
            return real_step(prev, state, memory)

        model.step = counting
        best = beam_search(model, feats, start_id=START, end_id=END, beam_size=4, max_len=12)
        settled = sum(rows)
        rows.clear()
        full = beam_search(model, feats, start_id=START, end_id=END, beam_size=4, max_len=12, n_best=4)
        for a, b in zip(best, full):
            assert_same_hyp(a[0], b[0], exact=False, atol=1e-5)
        assert settled <= sum(rows)
        assert rows[0] == 8  # the first step runs once per image: its 4 beams start the same
        assert rows[1] <= 8 * 4 and rows[1:] == sorted(rows[1:], reverse=True)  # finished images left
    assert settled < sum(rows)  # (the last seed) the early exit saved work


def test_an_images_beams_share_its_memory_and_give_the_captions_of_copies():
    """A SAT decoder shares an image's grid among its beams (``shares_memory``): every step after the first gets
    k rows of state per row of memory, also as images leave the batch; with a copy per beam (the engine's way for
    the other architectures) the captions, scores and attention are the same."""
    for seed in (0, 3):
        model, feats = make_sat(seed, batch=6)
        assert model.shares_memory
        seen = []
        real_step = model.step

        def recording(prev, state, memory):
            seen.append((prev.shape[0], memory[0].shape[0], memory[1].shape[0]))
            return real_step(prev, state, memory)

        model.step = recording
        kw = dict(start_id=START, end_id=END, beam_size=3, max_len=10, n_best=3, length_penalty=0.7)
        shared = beam_search(model, feats, **kw)
        assert seen[0] == (6, 6, 6) and all(rows == 3 * m == 3 * k for rows, m, k in seen[1:])
        assert seen[-1][1] < 6  # images left, and their memory with them
        seen.clear()
        model.shares_memory = False
        copied = beam_search(model, feats, **kw)
        assert all(rows == m for rows, m, _ in seen)
        for a, b in zip(shared, copied, strict=True):
            for x, y in zip(a, b, strict=True):
                assert_same_hyp(x, y, exact=False, atol=1e-6)


def test_guided_search_and_ensembles_share_the_memory_too():
    """The guided (constrained) search, which also drops a done image's rows at once when the memory is shared, and
    an ensemble of SAT decoders give with one grid per image what they give with a copy per row."""
    from captioner.decoding.constrained import constrained_beam_search
    from captioner.models.ensemble import Ensemble

    model, feats = make_sat(1, batch=6)
    ensemble = Ensemble([model, make_sat(2)[0]]).eval()
    assert ensemble.shares_memory
    groups = [[[5]], [[6], [7]], [], [[8]], [[9], [5, 6]], [[10]]]
    kw = dict(start_id=START, end_id=END, beam_size=3, max_len=10, n_best=2, length_penalty=0.5)
    for m in (model, ensemble):
        shared = constrained_beam_search(m, feats, groups, **kw)
        shared_beam = beam_search(m, feats, **kw)
        m.shares_memory = False
        try:
            copied = constrained_beam_search(m, feats, groups, **kw)
            copied_beam = beam_search(m, feats, **kw)
        finally:
            del m.shares_memory  # back to the class's
        for a, b in zip(shared + shared_beam, copied + copied_beam, strict=True):
            for x, y in zip(a, b, strict=True):
                assert_same_hyp(x, y, exact=False, atol=1e-6)


def test_n_best_lists_are_sorted_distinct_and_scored():
    model, feats = make_sat(4, batch=4)
    for n in (1, 3, 5):
        results = beam_search(model, feats, start_id=START, end_id=END, beam_size=5, max_len=8, n_best=n)
        assert len(results) == feats.shape[0]
        for b, hyps in enumerate(results):
            assert len(hyps) == n
            norms = [h.norm_score for h in hyps]
            assert norms == sorted(norms, reverse=True)
            assert len({tuple(h.tokens) for h in hyps}) == n
            for h in hyps:
                assert END not in h.tokens
                assert h.score == pytest.approx(
                    sat_sequence_score(model, feats[b:b + 1], h.tokens, h.finished), abs=1e-4)
    # the head of a longer n-best list is the shorter list (same beam)
    three = beam_search(model, feats, start_id=START, end_id=END, beam_size=5, max_len=8, n_best=3)
    one = beam_search(model, feats, start_id=START, end_id=END, beam_size=5, max_len=8, n_best=1)
    for a, b in zip(three, one):
        assert a[0].tokens == b[0].tokens


def test_n_best_via_decode_and_capped_by_beam():
    model, feats = make_sat(5, batch=3)
    res = decode(model, feats, start_id=START, end_id=END, beam_size=4, n_best=4, max_len=8)
    assert [len(h) for h in res] == [4, 4, 4]
    capped = beam_search(model, feats, start_id=START, end_id=END, beam_size=2, n_best=5, max_len=8)
    assert [len(h) for h in capped] == [2, 2, 2]


def test_decode_restores_training_mode_and_uses_eval():
    model, feats = make_sat(0, batch=3)
    model.train()
    a = decode(model, feats, start_id=START, end_id=END, beam_size=3, max_len=8)
    assert model.training
    model.eval()
    b = decode(model, feats, start_id=START, end_id=END, beam_size=3, max_len=8)
    assert not model.training
    assert [h[0].tokens for h in a] == [h[0].tokens for h in b]  # dropout was off in both


# ---------------------------------------------------------------------------------------
# attention


def _check_attention(h: Hypothesis) -> None:
    if not h.tokens:
        assert h.attention is None
        return
    assert h.attention is not None
    assert tuple(h.attention.shape) == (len(h.tokens), P)
    assert (h.attention >= 0).all()
    torch.testing.assert_close(h.attention.sum(-1), torch.ones(len(h.tokens)), rtol=0, atol=1e-5)


def test_attention_per_word_for_every_search():
    model, feats = make_sat(2, batch=5)
    kw = dict(start_id=START, end_id=END, max_len=8)
    for h in greedy_search(model, feats, **kw):
        _check_attention(h)
    for hyps in beam_search(model, feats, beam_size=3, n_best=3, **kw):
        for h in hyps:
            _check_attention(h)
    for group in sample(model, feats, num_captions=2, seed=0, **kw):
        for h in group:
            _check_attention(h)


def test_beam_attention_is_the_attention_of_its_own_path():
    """Re-running the decoder along a beam hypothesis reproduces its attention rows."""
    model, feats = make_sat(0, batch=3)
    for b, hyps in enumerate(beam_search(model, feats, start_id=START, end_id=END, beam_size=3,
                                         n_best=3, max_len=8)):
        for h in hyps:
            if not h.tokens:
                continue
            with torch.no_grad():
                memory = model.encode(feats[b:b + 1])
                state = model.init_state(memory)
                prev, rows = torch.tensor([START]), []
                for w in h.tokens:
                    _, state, att = model.step(prev, state, memory)
                    rows.append(att[0])
                    prev = torch.tensor([w])
            torch.testing.assert_close(h.attention, torch.stack(rows), rtol=0, atol=1e-5)


def test_empty_caption_has_no_attention():
    # a decoder that always says <end> at once
    table = torch.full((V_HAND, V_HAND, V_HAND), -20.0)
    table[..., END] = 0.0
    model, feats = TableDecoder(table), torch.zeros(2, 1, 1)
    g = greedy_search(model, feats, start_id=START, end_id=END, max_len=5)
    bs = beam_search(model, feats, start_id=START, end_id=END, beam_size=1, max_len=5)
    for h in g + [x[0] for x in bs]:
        assert h.tokens == [] and h.finished and h.attention is None
        assert h.norm_score == h.score == 0.0


# ---------------------------------------------------------------------------------------
# sampling


def test_sample_is_reproducible_with_a_seed():
    model, feats = make_sat(1, batch=4)
    kw = dict(start_id=START, end_id=END, max_len=8, num_captions=3)
    a = sample(model, feats, seed=123, **kw)
    b = sample(model, feats, seed=123, **kw)
    c = sample(model, feats, seed=7, **kw)
    tok = lambda res: [[h.tokens for h in g] for g in res]  # noqa: E731
    assert tok(a) == tok(b)
    for ga, gb in zip(a, b):
        for x, y in zip(ga, gb):
            assert_same_hyp(x, y)
    assert tok(a) != tok(c)


def test_sample_num_samples_per_image_and_scores():
    model, feats = make_sat(2, batch=3)
    res = sample(model, feats, start_id=START, end_id=END, max_len=8, num_captions=5, seed=0)
    assert len(res) == 3 and all(len(g) == 5 for g in res)
    for b, group in enumerate(res):
        for h in group:
            assert END not in h.tokens and len(h.tokens) <= 8
            assert h.finished == (len(h.tokens) < 8)
            assert h.norm_score == h.score
            assert h.score == pytest.approx(sat_sequence_score(model, feats[b:b + 1], h.tokens, h.finished),
                                            abs=1e-4)
    # the draws of one image are not copies of each other
    assert any(len({tuple(h.tokens) for h in g}) > 1 for g in res)


@pytest.mark.parametrize("kwargs", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-9)])
def test_sample_degenerate_settings_equal_greedy(kwargs):
    for seed in (0, 3):
        model, feats = make_sat(seed, batch=4)
        greedy = greedy_search(model, feats, start_id=START, end_id=END, max_len=8)
        res = sample(model, feats, start_id=START, end_id=END, max_len=8, num_captions=3, seed=1, **kwargs)
        for g, group in zip(greedy, res):
            for h in group:
                assert h.tokens == g.tokens and h.finished == g.finished
                assert h.score == pytest.approx(g.score, abs=1e-6)
                if g.attention is not None:
                    torch.testing.assert_close(h.attention, g.attention)


def test_sample_top_k_restricts_the_vocabulary():
    model, feats = make_sat(0, batch=4)
    memory = model.encode(feats)
    with torch.no_grad():
        first = model.step(torch.full((4,), START), model.init_state(memory), memory)[0]
    allowed = first.topk(2, dim=-1).indices  # (B, 2)
    res = sample(model, feats, start_id=START, end_id=END, max_len=1, num_captions=20, seed=0, top_k=2)
    for b, group in enumerate(res):
        firsts = {h.tokens[0] if h.tokens else END for h in group}
        assert firsts <= set(allowed[b].tolist())
        assert len(firsts) == 2  # and both are drawn



def test_banned_words_are_never_chosen_and_beam1_still_equals_greedy():
    torch.manual_seed(3)
    vocab_size = 12
    model = SATDecoder(SATConfig(vocab_size=vocab_size, feature_dim=8, embed_dim=16, hidden_dim=16,
                                 attention_dim=16)).eval()
    feats = torch.randn(6, 4, 8)
    plain = greedy_search(model, feats, start_id=1, end_id=2, max_len=8)
    used = {t for h in plain for t in h.tokens}
    banned = tuple(sorted(used))[:2]  # ban words the unconstrained search does use
    assert banned
    greedy = greedy_search(model, feats, start_id=1, end_id=2, max_len=8, banned=banned)
    beam1 = beam_search(model, feats, start_id=1, end_id=2, beam_size=1, max_len=8, banned=banned)
    beam3 = beam_search(model, feats, start_id=1, end_id=2, beam_size=3, max_len=8, banned=banned, n_best=3)
    sampled = sample(model, feats, start_id=1, end_id=2, max_len=8, banned=banned, num_captions=4, seed=0)
    for h in greedy + [h for hs in beam1 + beam3 + sampled for h in hs]:
        assert not set(h.tokens) & set(banned)
    assert [h.tokens for h in greedy] == [hs[0].tokens for hs in beam1]
    assert [h.score for h in greedy] == pytest.approx([hs[0].score for hs in beam1])


def test_sampled_captions_of_an_image_do_not_depend_on_the_rest_of_the_batch():
    model, feats = make_sat(4, batch=4)
    kw = dict(start_id=START, end_id=END, max_len=8, num_captions=4, seed=11)
    together = sample(model, feats, **kw)
    tok = lambda group: [h.tokens for h in group]  # noqa: E731
    for b in range(4):  # alone, at its own position (seed_offset), it draws the same captions
        (alone,) = sample(model, feats[b:b + 1], seed_offset=b, **kw)
        assert tok(alone) == tok(together[b])
    assert tok(sample(model, feats[1:2], **kw)[0]) != tok(together[1])  # another position, another stream


def test_sample_runs_in_eval_mode_and_restores_the_mode():
    model, feats = make_sat(5, batch=2)
    model.train()
    a = sample(model, feats, start_id=START, end_id=END, max_len=8, num_captions=2, seed=3)
    assert model.training
    model.eval()
    b = sample(model, feats, start_id=START, end_id=END, max_len=8, num_captions=2, seed=3)
    assert [[h.tokens for h in g] for g in a] == [[h.tokens for h in g] for g in b]


# ---------------------------------------------------------------------------------------
# no_repeat_ngram


def _repeats(tokens: list[int], size: int) -> bool:
    grams = [tuple(tokens[i:i + size]) for i in range(len(tokens) - size + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("size", [1, 2])
def test_exhaustive_beam_with_no_repeat_ngram_is_the_ranking_of_the_captions_without_repeats(size):
    """Nothing pruned but the blocked words: the n-best list is the brute-force ranking of exactly the
    captions that repeat no n-gram, with the model's own scores."""
    max_len = 4
    truth = [t for t in brute_force(max_len, 0.5) if not _repeats(t[2], size)]
    everything = brute_force(max_len, 0.5)
    assert len(truth) < len(everything)  # the blocking removes some
    hyps = beam_search(TableDecoder(), torch.zeros(1, 1, 1), start_id=START, end_id=END,
                       beam_size=len(everything) + 10, max_len=max_len, length_penalty=0.5,
                       n_best=len(everything) + 10, no_repeat_ngram=size)[0]
    assert sorted(tuple(h.tokens) for h in hyps) == sorted(tuple(t[2]) for t in truth)
    assert [h.tokens for h in hyps[:12]] == [t[2] for t in truth[:12]]
    by_tokens = {tuple(t[2]): t for t in truth}
    for h in hyps:
        assert h.score == pytest.approx(by_tokens[tuple(h.tokens)][1], abs=1e-5)


def test_no_repeat_ngram_in_greedy_and_beam_one_is_greedy():
    repeated_before = 0
    for seed in range(6):
        model, feats = make_sat(seed)
        plain = greedy_search(model, feats, start_id=START, end_id=END, max_len=10)
        repeated_before += sum(_repeats(h.tokens, 2) for h in plain)
        greedy = greedy_search(model, feats, start_id=START, end_id=END, max_len=10, no_repeat_ngram=2)
        beam1 = decode(model, feats, start_id=START, end_id=END, beam_size=1, max_len=10, no_repeat_ngram=2)
        beam_one = beam_search(model, feats, start_id=START, end_id=END, beam_size=1, max_len=10, no_repeat_ngram=2)
        beam3 = beam_search(model, feats, start_id=START, end_id=END, beam_size=3, max_len=10, n_best=3,
                            no_repeat_ngram=2)
        for i, (g, d, b, b3) in enumerate(zip(greedy, beam1, beam_one, beam3)):
            assert not _repeats(g.tokens, 2) and all(not _repeats(h.tokens, 2) for h in b3)
            assert g.tokens == d[0].tokens == b[0].tokens
            assert g.score == pytest.approx(b[0].score, abs=1e-5)
            # the scores stay the model's own log-probabilities of the words chosen
            assert g.score == pytest.approx(sat_sequence_score(model, feats[i:i + 1], g.tokens, g.finished), abs=1e-4)
    assert repeated_before > 0  # these random models do repeat themselves without the option
