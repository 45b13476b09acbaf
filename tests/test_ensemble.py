"""Ensembles: several models decoded as one (captioner.models.ensemble), from a model directory that names its
members or from --model given several times (captioner.inference.ensemble_dir)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.cli.main import main
from captioner.data.corpus import Corpus
from captioner.data.text import Vocab, join_tokens
from captioner.decoding.constrained import constrained_beam_search
from captioner.decoding.search import generate, greedy_search, sample
from captioner.decoding.settings import DecodingSettings
from captioner.inference.captioner import Captioner
from captioner.inference.ensemble_dir import load_model, write_ensemble
from captioner.inference.guidance import Guide
from captioner.inference.modeldir import ModelDirError, load_model_dir, resolve_model_path, validate_model_config
from captioner.models import build_decoder
from captioner.models.ensemble import Ensemble, EnsembleExtension
from captioner.models.extension import extended_view, output_layer, transfer
from captioner.training.config import DataConfig, OptimConfig, TrainConfig
from captioner.training.loop import train

WORDS = ["a", "cat", "dog", "red", "blue", "on", "the", "grass", "sits"]
SIZES = {
    "sat": dict(embed_dim=12, hidden_dim=12, attention_dim=12),
    "transformer": dict(embed_dim=12, d_model=12, heads=2, num_layers=1, ff_dim=16),
    "merge": dict(word_vectors="", freeze_embeddings=False, embed_dim=12, hidden_dim=12, num_layers=1),
    "bahdanau-gru": dict(embed_dim=12, proj_dim=12, hidden_dim=12, attention_dim=12),
}
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def vocab() -> Vocab:
    return Vocab.build([WORDS])


def decoder(arch: str, seed: int, feature_dim: int = 8):
    torch.manual_seed(seed)
    model = build_decoder(arch, dict(vocab_size=len(vocab()), feature_dim=feature_dim, **SIZES[arch]))
    with torch.no_grad():  # outputs that depend on the input (the default init is nearly constant)
        model.embed.weight.normal_(0.0, 1.0)
        output_layer(model).weight.normal_(0.0, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def feats() -> torch.Tensor:
    return torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(0))


def _flat(hyps) -> list:
    return [[(h.tokens, h.score) for h in hs] for hs in hyps]


def _score(model, features: torch.Tensor, tokens: list[int], v: Vocab) -> float:
    """The model's summed log-probability of ``tokens`` then <end>, for one image, step by step."""
    with torch.no_grad():
        memory = model.encode(features)
        state, total = model.init_state(memory), 0.0
        prev = torch.tensor([v.start_id])
        for t in [*tokens, v.end_id]:
            logp, state, _ = model.step(prev, state, memory)
            total += float(logp[0, t])
            prev = torch.tensor([t])
    return total


# ---------------------------------------------------------------------------------------
# the decoder


def test_an_ensemble_of_one_decodes_exactly_as_the_model_itself(feats):
    single, v = decoder("sat", 0), vocab()
    one = Ensemble([single]).eval()
    for s in (DecodingSettings(beam_size=1, max_len=8), DecodingSettings(beam_size=3, n_best=3, max_len=8),
              DecodingSettings(sample=True, num_captions=3, seed=5, max_len=8)):
        assert _flat(generate(one, v, feats, s)) == _flat(generate(single, v, feats, s))


def test_each_step_gives_the_mean_of_the_members_log_probabilities_and_attention(feats):
    members = [decoder("sat", 0), decoder("transformer", 1), decoder("merge", 2)]
    ens = Ensemble(members).eval()
    prev = torch.tensor([4, 5, 6])
    with torch.no_grad():
        logp, state, att = ens.step(prev, ens.init_state(ens.encode(feats)), ens.encode(feats))
        outs = [m.step(prev, m.init_state(m.encode(feats)), m.encode(feats)) for m in members]
    assert torch.allclose(logp, sum(o[0] for o in outs) / 3, atol=1e-6)
    assert torch.allclose(att, (outs[0][2] + outs[1][2]) / 2, atol=1e-6)  # merge has no attention: left out
    assert len(state) == sum(len(o[1]) for o in outs)
    assert ens.has_attention and not Ensemble([decoder("merge", 2), decoder("merge", 3)]).has_attention


def test_beam_1_is_greedy_and_the_n_best_are_scored_as_the_members_mean(feats):
    v = vocab()
    members = [decoder("sat", 0), decoder("bahdanau-gru", 1)]
    ens = Ensemble(members).eval()
    ids = dict(start_id=v.start_id, end_id=v.end_id)
    greedy = greedy_search(ens, feats, DecodingSettings(max_len=8), **ids)
    beam1 = generate(ens, v, feats, DecodingSettings(beam_size=1, max_len=8, allow_unk=True))
    assert [h.tokens for h in greedy] == [hs[0].tokens for hs in beam1]
    nbest = generate(ens, v, feats, DecodingSettings(beam_size=4, n_best=3, max_len=8, length_penalty=0.0))
    for b, hs in enumerate(nbest):
        assert len(hs) == 3 and [h.score for h in hs] == sorted((h.score for h in hs), reverse=True)
        for h in hs:
            if h.finished:
                want = sum(_score(m, feats[b:b + 1], h.tokens, v) for m in members) / 2
                assert h.score == pytest.approx(want, abs=1e-4)


def test_sampling_from_an_ensemble_is_seeded(feats):
    v = vocab()
    ens = Ensemble([decoder("sat", 0), decoder("transformer", 1)]).eval()
    s = DecodingSettings(sample=True, num_captions=4, seed=11, max_len=8)
    first, again = generate(ens, v, feats, s), generate(ens, v, feats, s)
    assert _flat(first) == _flat(again)
    other = generate(ens, v, feats, s.replace(seed=12))
    assert _flat(other) != _flat(first)
    ids = dict(start_id=v.start_id, end_id=v.end_id)
    drawn = sample(ens, feats[:1], s, **ids)[0]
    for h in drawn:  # a sample's score is the ensemble's own log-probability of its words
        if h.finished:
            assert h.score == pytest.approx(_score(ens, feats[:1], h.tokens, v), abs=1e-4)


def test_attention_maps_of_an_ensemble(feats):
    v = vocab()
    mixed = Ensemble([decoder("sat", 0), decoder("merge", 1)]).eval()
    (h,), = generate(mixed, v, feats[:1], DecodingSettings(beam_size=2, max_len=8))
    assert h.attention.shape == (len(h.tokens), feats.shape[1])
    assert torch.allclose(h.attention.sum(-1), torch.ones(len(h.tokens)), atol=1e-5)  # a mean of distributions
    blind = Ensemble([decoder("merge", 1), decoder("merge", 2)]).eval()
    (h,), = generate(blind, v, feats[:1], DecodingSettings(beam_size=2, max_len=8))
    assert h.attention is None


def test_guided_search_places_the_asked_for_word_in_an_ensembles_caption(feats):
    v = vocab()
    ens = Ensemble([decoder("sat", 0), decoder("transformer", 1)]).eval()
    grass = v.stoi["grass"]
    hyps = constrained_beam_search(ens, feats, [[[grass]]] * len(feats), DecodingSettings(beam_size=2, max_len=8),
                                   start_id=v.start_id, end_id=v.end_id)
    assert all(grass in hs[0].tokens for hs in hyps)


def test_words_added_to_an_ensemble_get_each_members_own_rows(feats):
    v = vocab()
    members = [decoder("sat", 0), decoder("sat", 1)]
    ens = Ensemble(members).eval()
    ext = transfer(ens, v, ["kitten", "giraffe"])
    assert isinstance(ext, EnsembleExtension) and ext.words == ["kitten", "giraffe"]
    for m, part in zip(members, ext.parts):
        own = transfer(m, v, ["kitten", "giraffe"])
        assert torch.equal(part.out_weight, own.out_weight) and torch.equal(part.embed, own.embed)
    assert not torch.equal(ext.parts[0].out_weight, ext.parts[1].out_weight)
    view = extended_view(ens, ext, torch.tensor([1]))  # giraffe joins as word V
    prev = torch.tensor([len(v), 4, 5])
    with torch.no_grad():
        mem = view.encode(feats)
        logp, _, _ = view.step(prev, view.init_state(mem), mem)
        own = [extended_view(m, p, torch.tensor([1])) for m, p in zip(members, ext.parts)]
        want = sum(o.step(prev, o.init_state(o.encode(feats)), o.encode(feats))[0] for o in own) / 2
    assert logp.shape == (3, len(v) + 1) and torch.allclose(logp, want, atol=1e-6)
    guide = Guide(ens, v, {"decoding": {}})
    (hs,), _ = guide.generate(feats[:1], DecodingSettings(beam_size=2, max_len=8, mention=("zebra",)))
    assert "zebra" in guide.vocab.decode(hs[0].tokens)
    assert isinstance(guide.extension, EnsembleExtension) and len(guide.extension.parts) == 2


def test_an_ensembles_images_needing_other_added_words_are_searched_apart(feats, monkeypatch):
    """An ensemble's step is the mean of its members' log-probabilities, which renormalising after it does not give
    (inference/guidance.py): its images that need different added words are searched again one set of words at a
    time, each getting what a search of it alone gives."""
    from captioner.inference import guidance

    v = vocab()
    ens = Ensemble([decoder("sat", 0), decoder("sat", 1)]).eval()
    guide = Guide(ens, v, {"decoding": {}}, transfer(ens, v, ["kitten", "giraffe"]))
    V, s = len(v), DecodingSettings(beam_size=2, max_len=6, concept_margin=10.0)
    groups = [[[V]], [[V + 1]], [[v.stoi["cat"]]]]  # kitten, giraffe, cat
    alone = [guide._constrained(feats[b:b + 1], [g], [set()], s)[0] for b, g in enumerate(groups)]
    calls = []
    real = guidance.constrained_beam_search
    monkeypatch.setattr(guidance, "constrained_beam_search", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    first = guide.generate(feats, s.replace(concepts="off"))[0]
    decoded = [guidance.Decoded([list(h) for h in first], None, [(b, feats[b], g, set(), 1.0)])
               for b, g in enumerate(groups)]
    guide.search_again(decoded, s)
    assert sorted(calls) == [1, 1, 1]
    for b, (d, want) in enumerate(zip(decoded, alone)):
        assert _flat([d.hyps[b]]) == _flat([want])


# ---------------------------------------------------------------------------------------
# model directories and the commands (tiny models trained on the synthetic shapes)


@pytest.fixture(scope="module")
def runs(synthetic, tmp_path_factory) -> list[Path]:
    """Two tiny SAT models trained for 2 epochs from different seeds: their ``best`` directories."""
    out = []
    for seed in (0, 1):
        run = tmp_path_factory.mktemp(f"ens-run{seed}")
        train(TrainConfig(arch="sat", model=dict(embed_dim=24, hidden_dim=32, attention_dim=24, dropout=0.1),
                          data=DataConfig(corpus=str(synthetic.corpus), features=str(synthetic.features), max_len=12),
                          optim=OptimConfig(lr=3e-3, batch_size=32, epochs=2, early_stop=0), out_dir=str(run),
                          progress=False, seed=seed))
        out.append(run / "best")
    return out


@pytest.fixture(scope="module")
def ensemble_dir(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ens") / "pair"
    assert main(["ensemble", str(runs[0]), str(runs[1]), "--out", str(out), "--beam", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def images(synthetic) -> list[str]:
    corpus = Corpus.load(synthetic.corpus)
    return [str(corpus.image_root / it.image) for it in corpus.split("test")[:4]]


def _evaluate(synthetic, tmp_path: Path, *models: str) -> dict:
    args = ["evaluate", *[x for m in models for x in ("--model", m)], "--corpus", str(synthetic.corpus), "--features",
            str(synthetic.features), "--split", "test", "--beam", "3", "--limit", "20", "--out", str(tmp_path)]
    assert main(args) == 0
    return json.loads((tmp_path / "metrics.json").read_text())


def test_evaluate_decodes_several_models_as_one(runs, synthetic, tmp_path, capsys):
    a, b = map(str, runs)
    pair = _evaluate(synthetic, tmp_path / "pair", a, b)
    assert pair["model"] == f"{a} + {b}" and pair["images"] == 20
    assert 0 < pair["beams"]["3"]["CIDEr-D"]
    assert capsys.readouterr().out.startswith("**ens-run00-best + ens-run10-best on test")  # named by their runs
    # a model twice is the model itself (the mean of equal log-probabilities)
    assert _evaluate(synthetic, tmp_path / "twice", a, a)["beams"] == _evaluate(synthetic, tmp_path / "a", a)["beams"]


def test_an_ensemble_directory_is_a_model_directory(runs, ensemble_dir, images, tmp_path):
    cfg = json.loads((ensemble_dir / "config.json").read_text())
    assert cfg["arch"] == "ensemble" and cfg["decoding"]["beam_size"] == 2 and "model" not in cfg
    members = cfg["ensemble"]["members"]
    assert len(members) == 2 and all(m.startswith("members/") for m in members)
    assert all((ensemble_dir / m / "model.safetensors").is_file() for m in members)
    validate_model_config(cfg, ensemble_dir / "config.json", vocab_size=len(Vocab.load(ensemble_dir / "vocab.json")))
    decoder, _, loaded = load_model_dir(ensemble_dir)
    assert isinstance(decoder, Ensemble) and len(decoder) == 2 and loaded["encoder"] == cfg["encoder"]
    model = Captioner.from_pretrained(ensemble_dir)
    on_the_fly = Captioner.from_pretrained([str(r) for r in runs])
    got = [r.caption for r in model.caption(images)]
    assert all(got) and got == [r.caption for r in on_the_fly.caption(images, beam_size=2)]
    again = Captioner.from_pretrained(model.save_pretrained(tmp_path / "saved"))
    assert [r.caption for r in again.caption(images)] == got
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["ensemble"]["members"] == members
    three = load_model([ensemble_dir, runs[0]])[0]  # an ensemble's directory counts as its members
    assert isinstance(three, Ensemble) and len(three) == 3


@pytest.mark.parametrize("edit, says", [
    (lambda c: c.update(model={}), "no 'model' entry"),
    (lambda c: c.update(arch="sat"), "an ensemble's arch is 'ensemble'"),
    (lambda c: c["ensemble"].update(members=[]), "a list of 1 to 16"),
    (lambda c: c["ensemble"].update(members=["m"] * 17), "a list of 1 to 16"),
    (lambda c: c["ensemble"].update(weights=[1, 2]), "unknown field(s) ['weights']"),
    (lambda c: c["ensemble"].update(members=["a\\b"]), "with / between folders"),
    (lambda c: c["decoding"].update(beam_size=0), "decoding.beam_size"),
    (lambda c: c.update(version=99), "newer captioner"),
])
def test_an_ensembles_config_is_schema_checked(edit, says):
    cfg = {"format": "captioner-model", "version": 1, "arch": "ensemble", "ensemble": {"members": ["members/a"]},
           "decoding": {"beam_size": 3}}
    validate_model_config(json.loads(json.dumps(cfg)), "e/config.json")
    edit(cfg)
    with pytest.raises(ModelDirError, match=re.escape(says)):
        validate_model_config(cfg, "e/config.json")


def test_caption_with_two_models_through_the_cli(runs, images, tmp_path, capsys):
    args = ["caption", *images[:2], "--model", str(runs[0]), "--model", str(runs[1]), "--quiet"]
    assert main([*args, "--json", "--n-best", "2", "--beam", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all(x["caption"] and len(x["n_best"]) == 2 for x in lines)
    figure = tmp_path / "att.png"
    assert main([*args[:2], *args[3:], "--attention", str(figure)]) == 0
    assert Image.open(figure).size[0] > 0 and "attention figure" in capsys.readouterr().out
    assert main([*args, "--sample", "--seed", "3", "--num-captions", "2", "--json"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "--sample", "--seed", "3", "--num-captions", "2", "--json"]) == 0
    assert capsys.readouterr().out == first


def test_a_mention_works_for_an_ensemble(ensemble_dir, images, capsys):
    assert main(["caption", images[0], "--model", str(ensemble_dir), "--mention", "kitten", "--json", "--quiet"]) == 0
    assert "kitten" in json.loads(capsys.readouterr().out)["caption"].split()


def test_vocab_extend_and_show_an_ensemble(ensemble_dir, images, tmp_path, capsys):
    out = tmp_path / "more"
    assert main(["vocab", "extend", str(ensemble_dir), "--out", str(out), "--words", "zebra,giraffe"]) == 0
    assert json.loads(capsys.readouterr().out)["extension_words"] == 2
    members = json.loads((out / "config.json").read_text())["ensemble"]["members"]
    for m in members:  # each member its own rows
        assert json.loads((out / m / "config.json").read_text())["vocab_extension"]["words"] == ["zebra", "giraffe"]
        assert (out / m / "extension.safetensors").is_file()
    assert main(["vocab", "show", str(out), "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["added_words"]) == ["zebra", "giraffe"]
    model = Captioner.from_pretrained(out)
    (r,) = model.caption(images[:1], mention=("giraffe",))
    assert "giraffe" in r.words


def test_members_adding_different_words_get_each_others(runs, tmp_path):
    a = tmp_path / "a"
    assert main(["vocab", "extend", str(runs[0]), "--out", str(a), "--words", "zebra"]) == 0
    out = write_ensemble([a, runs[1]], tmp_path / "pair")
    ext = load_model(out)[3]
    assert ext.words == ["zebra"] and len(ext.parts) == 2
    members = json.loads((out / "config.json").read_text())["ensemble"]["members"]
    # the second member was given the word, its own rows written in its own directory
    assert json.loads((out / members[1] / "config.json").read_text())["vocab_extension"]["words"] == ["zebra"]
    assert "vocab_extension" not in json.loads((runs[1] / "config.json").read_text())  # its source is left as it was
    own = transfer(load_model_dir(runs[1])[0], load_model_dir(runs[1])[1], ["zebra"])
    assert torch.allclose(ext.parts[1].out_weight, own.out_weight)


# ---------------------------------------------------------------------------------------
# what is refused


def _copy(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit:
        edit(dst)
    return dst


def _swap_vocab_entries(d: Path) -> None:
    data = json.loads((d / "vocab.json").read_text())
    itos = data["itos"]
    itos[5], itos[6] = itos[6], itos[5]
    (d / "vocab.json").write_text(json.dumps(data))


def _other_resize(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["encoder"]["resize"] = "center-crop"
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, says", [(_swap_vocab_entries, "vocab.json entry 5 is"),
                                        (_other_resize, "encoder.resize is 'center-crop'")])
def test_members_that_do_not_share_vocabulary_or_encoder_are_refused(runs, images, tmp_path, capsys, edit, says):
    other = _copy(runs[1], tmp_path / "other", edit)
    with pytest.raises(ModelDirError, match=says):
        load_model([runs[0], other])
    assert main(["caption", images[0], "--model", str(runs[0]), "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and "Traceback" not in err
    assert main(["ensemble", str(runs[0]), str(other), "--out", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("member, says", [("../outside", "leaves the ensemble's directory"),
                                          ("/abs/path", "is absolute"), (".", "leaves the ensemble's directory"),
                                          ("members/missing", "missing"), ("link", "leads outside")])
def test_member_paths_must_stay_inside_the_directory(ensemble_dir, runs, tmp_path, capsys, member, says):
    d = _copy(ensemble_dir, tmp_path / "ens")
    os.symlink(runs[0], d / "link")
    cfg = json.loads((d / "config.json").read_text())
    cfg["ensemble"]["members"][1] = member
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match=says):
        Captioner.from_pretrained(d)
    assert main(["vocab", "show", str(d)]) == 2
    assert says in capsys.readouterr().err


def test_a_vocabulary_beside_the_members_must_be_theirs(ensemble_dir, tmp_path):
    d = _copy(ensemble_dir, tmp_path / "ens", _swap_vocab_entries)
    with pytest.raises(ModelDirError, match="does not belong to the ensemble"):
        load_model_dir(d)


# ---------------------------------------------------------------------------------------
# the bundled model as an ensemble keeps its concept defaults


def test_the_bundled_model_twice_names_the_cat_as_the_bundled_model_does(tmp_path):
    bundled = resolve_model_path("flickr8k-sat")
    out = write_ensemble([bundled, bundled], tmp_path / "twice")
    single, pair = Captioner.from_pretrained(bundled), Captioner.from_pretrained(out)
    assert pair.settings == single.settings and pair.settings.concepts == "auto"
    assert pair.guide.extension.words == single.guide.extension.words
    pair._encoder = single.encoder  # one encoder built for both
    chelsea = EXAMPLES / "chelsea.png"
    (a,), (b,) = single.caption([chelsea]), pair.caption([chelsea])
    assert "cat" in b.words and b.caption == a.caption and b.score == pytest.approx(a.score, abs=1e-5)
    assert join_tokens(b.words) == b.caption


# ---------------------------------------------------------------------------------------
# serve


def test_serve_takes_several_models_as_one(runs, images, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from captioner.serving.app import create_app
    from captioner.serving.config import ServeConfig
    from captioner.serving.server import display_name

    models = [str(r) for r in runs]
    model = Captioner.from_pretrained(models)
    assert display_name(model, models) == " + ".join(models)
    with TestClient(create_app(model, ServeConfig(warm_up=False), name="pair")) as c:
        (info,) = c.get("/v1/models").json()["models"]
        assert info["architecture"] == "ensemble" and info["attention"] is True
        r = c.post("/v1/captions", files=[("images", ("a.png", Path(images[0]).read_bytes(), "image/png"))])
        assert r.status_code == 200 and r.json()["results"][0]["caption"] == model.caption(images[0])[0].caption
    other = _copy(runs[1], tmp_path / "other", _swap_vocab_entries)
    assert main(["serve", "--port", "0", "--model", models[0], "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "vocab.json entry 5 is" in err and "Traceback" not in err
