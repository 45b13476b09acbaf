"""The one inference path (issue 8): DecodingSettings, typed CaptionResults that own per-image
errors, n-best lists that carry the beam's own scores, worker decoding, streaming."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.decoding.search import generate
from captioner.decoding.settings import DecodingSettings
from captioner.inference.captioner import ENCODE_AHEAD, Captioner
from captioner.inference.results import CaptionResult
from captioner.runtime.devices import autocast


@pytest.fixture(scope="module")
def bundled():
    return Captioner.from_pretrained()


@pytest.fixture(scope="module")
def photo_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("inference")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(7):
        # smooth colour fields with a blob: closer to a photo than noise, so captions differ
        y, x = np.mgrid[0:120, 0:160]
        img = np.stack([(x * (i + 1)) % 256, (y * 3 + 40 * i) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)
        img[30:90, 40 + 10 * i:100 + 10 * i] = rng.integers(0, 255, 3)
        p = d / f"p{i}.jpg"
        Image.fromarray(img).save(p)
        paths.append(str(p))
    return paths


def _teacher_forced_logprob(model: Captioner, words: list[str], feats: torch.Tensor) -> float:
    """log p(caption, <end> | image) by running the decoder's step over the caption's own words, in the precision
    the model decodes in."""
    v, dec = model.vocab, model.decoder
    ids = [v.stoi[w] for w in words] + [v.end_id]
    with torch.inference_mode(), autocast(model.device, model.decoder_precision):
        memory = dec.encode(feats)
        state = dec.init_state(memory)
        prev = torch.tensor([v.start_id])
        total = 0.0
        for t in ids:
            logp, state, _ = dec.step(prev, state, memory)
            total += float(logp[0, t])
            prev = torch.tensor([t])
    return total


def test_n_best_is_sorted_distinct_and_carries_the_beams_scores(bundled, photo_paths):
    results = bundled.caption(photo_paths[:3], beam_size=5, n_best=5)
    feats = bundled.encoder.encode_arrays(np.stack([bundled.encoder.preprocess([Image.open(p).convert("RGB")])[0]
                                                    for p in photo_paths[:3]]))
    for r, f in zip(results, feats):
        assert r.ok and len(r.n_best) == 5
        scores = [c.score for c in r.n_best]
        assert scores == sorted(scores, reverse=True)
        assert len({c.caption for c in r.n_best}) == 5  # distinct
        assert r.n_best[0].caption == r.caption and r.n_best[0].score == r.score
        lp = bundled.settings.length_penalty  # the bundled model ranks by score / length ** 1.0
        for c in r.n_best:  # each score is the model's own log-probability of that caption (+ <end>), normalised
            words = c.caption.split()
            want = _teacher_forced_logprob(bundled, words, f[None]) / (len(words) + 1) ** lp
            assert c.score == pytest.approx(want, abs=2e-3)


def test_results_are_typed_and_errors_stay_in_their_result(bundled, photo_paths, tmp_path):
    truncated = open(photo_paths[0], "rb").read()[:200]
    (tmp_path / "text.jpg").write_text("hello")
    inputs = [photo_paths[0], truncated, str(tmp_path / "text.jpg"), Image.open(photo_paths[1]), photo_paths[2]]
    res = bundled.caption(inputs)
    assert [type(r) for r in res] == [CaptionResult] * 5
    assert [r.ok for r in res] == [True, False, False, True, True]
    assert res[1].source == "image 1" and res[1].caption is None and res[1].error
    assert str(tmp_path / "text.jpg") in res[2].source and "image" in res[2].error.lower()
    assert res[1].to_dict() == {"source": "image 1", "error": res[1].error}
    good = res[0].to_dict()
    assert good["caption"] == res[0].caption and good["n_best"] == [{"caption": res[0].caption, "score": res[0].score}]
    assert good["grid"] == [7, 7] and "attention" not in good
    # the same image gives the same caption wherever it sits among failures
    assert bundled.caption(photo_paths[0])[0].caption == res[0].caption


def test_worker_processes_give_the_same_results_as_this_process(bundled, photo_paths, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    paths = photo_paths + [str(bad)]
    inline = bundled.caption(paths, batch_size=3, workers=0, n_best=2, return_attention=True)
    workers = bundled.caption(paths, batch_size=3, workers=2, n_best=2, return_attention=True)
    assert [r.to_dict() for r in inline] == [r.to_dict() for r in workers]
    assert [r.ok for r in workers] == [True] * 7 + [False]


def test_results_stream_batch_by_batch(bundled, photo_paths):
    calls = []
    real = bundled.encoder.encode_arrays

    def counting(batch):
        calls.append(len(batch))
        return real(batch)

    bundled.encoder.encode_arrays = counting
    try:
        it = bundled.iter_captions(photo_paths, batch_size=1, workers=0, concepts="off")
        first = next(it)
        # the first result came after its batch (the encoder may have run up to ENCODE_AHEAD batches ahead),
        # not after all of them
        assert first.ok and 1 <= len(calls) <= 1 + ENCODE_AHEAD < len(photo_paths)
        rest = list(it)
        assert len(rest) == len(photo_paths) - 1 and calls == [1] * len(photo_paths)
    finally:
        del bundled.encoder.encode_arrays


def test_seeded_samples_depend_on_the_image_position_among_readable_images(bundled, photo_paths):
    a = bundled.caption(photo_paths[:4], sample=True, num_captions=2, seed=7, batch_size=3)
    b = bundled.caption([photo_paths[0], b"junk", *photo_paths[1:4]], sample=True, num_captions=2, seed=7, batch_size=2)
    kept = [r.samples for r in b if r.ok]
    # the same words; the scores agree up to float32 matmuls over batches of other sizes
    assert [[c.caption for c in s] for s in (r.samples for r in a)] == [[c.caption for c in s] for s in kept]
    for sa, sb in zip((r.samples for r in a), kept):
        assert [c.score for c in sa] == pytest.approx([c.score for c in sb], abs=5e-4)
    assert all(r.n_best == r.samples[:1] and r.caption == r.samples[0].caption for r in a)


def test_decoding_settings_defaults_overrides_and_refusals(bundled):
    s = bundled.settings
    assert s == DecodingSettings.from_model(bundled.config) and s.beam_size == 3 and s.max_len == 30
    assert s.replace(n_best=5).beam_size == 5  # an n-best list needs n beams
    assert s.replace(beam_size=None) == s  # None keeps the default
    assert s.replace(sample=True, num_captions=3).num_captions == 3
    with pytest.raises(ValueError, match="beam size 51: must be from 1 to 50"):
        s.replace(beam_size=51)
    with pytest.raises(ValueError, match="maximum caption length 0"):
        s.replace(max_len=0)
    with pytest.raises(ValueError, match="num_captions"):
        s.replace(sample=True, n_best=2)
    with pytest.raises(ValueError, match="add sample=True"):
        s.replace(temperature=0.5)
    with pytest.raises(ValueError, match="top-p"):
        s.replace(sample=True, top_p=0.0)
    assert DecodingSettings(**s.to_dict()) == s
    # a model's beam-search defaults (length penalty, no-repeat n-grams) give way when sampling ...
    beamy = DecodingSettings(length_penalty=1.0, no_repeat_ngram=2)
    drawn = beamy.replace(sample=True, num_captions=2)
    assert (drawn.length_penalty, drawn.no_repeat_ngram, drawn.num_captions) == (0.0, 0, 2)
    with pytest.raises(ValueError, match="no-repeat n-gram size applies to a beam search, not to sampling"):  # ... but asked for explicitly, they are refused
        beamy.replace(sample=True, no_repeat_ngram=3)
    with pytest.raises(ValueError, match="no-repeat n-gram size -1"):
        s.replace(no_repeat_ngram=-1)


def test_the_same_settings_decode_the_same_way_everywhere(bundled, photo_paths):
    """caption() and decode_features() (what evaluate and validation use) agree for one settings object."""
    s = bundled.settings.replace(beam_size=4, max_len=12, n_best=2)
    via_images = bundled.caption(photo_paths[:3], s)
    arrays = np.stack([bundled.encoder.preprocess([Image.open(p).convert("RGB")])[0] for p in photo_paths[:3]])
    with autocast(bundled.device, bundled.decoder_precision):  # as caption() decodes
        hyps = generate(bundled.decoder, bundled.vocab, bundled.encoder.encode_arrays(arrays), s)
    for r, h in zip(via_images, hyps):
        assert [c.caption for c in r.n_best] == [" ".join(bundled.vocab.decode(x.tokens)) for x in h]
        assert all(len(c.caption.split()) <= 12 for c in r.n_best)


def test_bytes_and_file_sources_are_named(bundled, photo_paths):
    data = open(photo_paths[3], "rb").read()
    res = bundled.caption([data, io.BytesIO(data)])
    assert [r.source for r in res] == ["image 0", "image 1"] and res[0].caption == res[1].caption


def test_batched_beam_search_equals_per_image_with_the_bundled_model(bundled, photo_paths):
    """Issue 8: the batched search gives each image the caption and score it gets alone (within 1e-5)."""
    from captioner.decoding.search import decode
    from captioner.decoding.settings import banned_ids

    arrays = np.stack([bundled.encoder.preprocess([Image.open(p).convert("RGB")])[0] for p in photo_paths])
    feats = bundled.encoder.encode_arrays(arrays)
    kw = dict(start_id=bundled.vocab.start_id, end_id=bundled.vocab.end_id, beam_size=3, max_len=30,
              banned=banned_ids(bundled.vocab))
    batched = decode(bundled.decoder, feats, **kw)
    for i, hyps in enumerate(batched):
        alone = decode(bundled.decoder, feats[i:i + 1], **kw)[0]
        assert hyps[0].tokens == alone[0].tokens
        assert abs(hyps[0].score - alone[0].score) <= 1e-5


# ----------------------------------------------------------------------------- issue 21


class _Broken(torch.nn.Module):
    """A decoder over a vocabulary of 8 words whose log-probabilities for the images whose first feature is
    negative are ``value`` (NaN, +inf) or, ``value`` = -inf, -inf for every word; the others say word 4 then <end>."""

    has_attention = False

    def __init__(self, value: float, below: float = 0.0):
        super().__init__()
        self.value, self.below = value, below

    def encode(self, features):
        return (features,)

    def init_state(self, memory):
        return (torch.zeros(memory[0].shape[0]),)

    def step(self, prev, state, memory):
        B = prev.shape[0]
        logp = torch.full((B, 8), -20.0)
        logp[:, 4] = torch.where(state[0] == 0, -0.1, -5.0)
        logp[:, 2] = torch.where(state[0] == 0, -5.0, -0.1)
        broken = memory[0][:, 0, 0] < self.below
        if self.value == float("-inf"):
            logp[broken] = float("-inf")
        else:
            logp[broken, 5] = self.value  # one word: enough to spoil the distribution
        return logp, (state[0] + 1,), None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("how", [dict(beam_size=1), dict(beam_size=3), dict(beam_size=3, n_best=3),
                                 dict(sample=True), dict(sample=True, seed=4, num_captions=2, top_p=0.9)])
def test_non_finite_log_probabilities_are_an_error_for_every_search(value, how):
    """Issue 21, defect 3: a caption with "score": null (or "" at beam 1, or an internal error when sampling)."""
    from captioner.data.text import Vocab
    from captioner.decoding.search import NonFiniteError

    vocab = Vocab.build([["a", "b", "c", "d"]])
    settings = DecodingSettings(max_len=5).replace(**how)
    feats = torch.ones(3, 2, 4)
    ok = generate(_Broken(value), vocab, feats, settings)  # no broken image: fine
    assert all(h and np.isfinite([x.score for x in h]).all() for h in ok)
    assert settings.sample or all(h[0].tokens == [4] for h in ok)
    feats[1] = -1.0
    with pytest.raises(NonFiniteError) as err:
        generate(_Broken(value), vocab, feats, settings)
    assert str(err.value).startswith("the model: its weights give non-finite log-probabilities (NaN or infinity)")
    assert isinstance(err.value, ValueError) and str(err.value.naming("m/best")).startswith("m/best: its weights")


def test_captioner_names_the_model_whose_weights_give_non_finite_probabilities(bundled, photo_paths):
    broken = Captioner(_Broken(float("nan"), below=float("inf")), bundled.vocab, {**bundled.config, "decoding": {}})
    broken._encoder = bundled.encoder
    assert bundled.config["name"] == "flickr8k-sat"  # a model built in Python is named by its config
    with pytest.raises(ValueError, match=r"^flickr8k-sat: its weights give non-finite log-probabilities"):
        broken.decode_features(torch.ones(2, 49, 1280))
    broken.source = "runs/x/best"  # from_pretrained: the directory it was given
    with pytest.raises(ValueError, match=r"^runs/x/best: its weights give non-finite log-probabilities"):
        broken.caption(photo_paths[:2])


@pytest.mark.parametrize(("kw", "setting"), [
    (dict(beam_size=0), "beam size 0"),
    (dict(beam_size=-1), "beam size -1"),
    (dict(beam_size="3"), "beam size '3'"),
    (dict(beam_size=2.0), "beam size 2.0"),
    (dict(sample=True, seed=-1), "seed -1"),
    (dict(sample=True, seed=2**64), f"seed {2**64}"),
    (dict(sample=True, seed="7"), "seed '7'"),
])
def test_python_decoding_settings_out_of_range_are_a_value_error_naming_the_setting(bundled, photo_paths, kw,
                                                                                     setting):
    """Issue 21, defect 10: beam_size=0 or -1 silently meant greedy, '3' was a TypeError, seed=-1 was taken."""
    with pytest.raises(ValueError, match=f"^{setting}: must be ".replace("(", r"\(")):
        bundled.caption(photo_paths[0], **kw)


@pytest.mark.parametrize("args", [["--sample", "--seed", "-1"], ["--sample", "--seed", "99999999999999999999"],
                                  ["--seed", "-1"]])
def test_cli_seed_out_of_range_names_the_seed(photo_paths, capsys, args):
    from captioner.cli.main import main

    status = main(["caption", photo_paths[0], *args])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err.startswith(f"error: seed {args[-1]}: must be from 0 to "), err
    assert "Traceback" not in err


def test_images_searched_again_over_several_batches_keep_their_order_and_captions(bundled, photo_paths):
    """With concepts on, the images to search again are gathered over batches: the results still come in
    input order, and each is the caption its image gets when captioned alone."""
    together = bundled.caption(photo_paths, batch_size=2, workers=0, concepts="auto", concept_threshold=0.05,
                               concept_margin=10.0)
    alone = [bundled.caption(p, workers=0, concepts="auto", concept_threshold=0.05, concept_margin=10.0)[0]
             for p in photo_paths]
    assert [r.source for r in together] == list(photo_paths)
    assert [r.caption for r in together] == [r.caption for r in alone]
    assert [r.concepts for r in together] == [r.concepts for r in alone]


def test_a_decoder_that_would_wait_encodes_the_chunks_the_encoders_thread_has_not_started(bundled, photo_paths,
                                                                                          monkeypatch):
    """With the cores shared (an inference runtime's own thread for the encoder), the caller encodes a batch's
    chunks that the encoder's thread has not started instead of waiting: with a slow encoder thread, some chunks
    are encoded on each thread, and the captions are those of an unshared run, in order."""
    import threading
    import time

    from captioner.inference import captioner as inference

    want = [r.caption for r in bundled.caption(photo_paths, batch_size=4, workers=0)]
    real = bundled.encoder
    ran: list[str] = []

    class SlowThread:  # the encoder, slow on its own thread
        spec = real.spec

        def encode_arrays(self, chunk):
            name = threading.current_thread().name
            ran.append(name)
            if name.startswith("captioner-encoder"):
                time.sleep(0.3)
            return real.encode_arrays(chunk)

    monkeypatch.setattr(inference, "ENCODER_BATCH", 1)
    monkeypatch.setattr(bundled, "_encoder", SlowThread())
    monkeypatch.setattr(bundled, "_all_threads", max(2, torch.get_num_threads()))  # as share_cores sets it
    threads = torch.get_num_threads()
    try:
        got = [r.caption for r in bundled.caption(photo_paths, batch_size=4, workers=0)]
    finally:
        torch.set_num_threads(threads)
    assert got == want
    assert len(ran) == len(photo_paths)  # each image encoded once
    here = sum(not n.startswith("captioner-encoder") for n in ran)
    assert 0 < here < len(ran)
