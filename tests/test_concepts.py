"""Concepts and open vocabulary: the ImageNet -> caption-word mapping, the concept head of the EfficientNet-Lite
encoders, words added to a trained model (captioner.models.extension, extension.safetensors, `captioner vocab`)
and what a model directory written before them does now (exactly what it did)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from captioner.cli.main import main
from captioner.data.text import Vocab, join_tokens
from captioner.decoding.search import generate
from captioner.encoders.concepts import MAPPING_FILE, ConceptMapError, concept_head, read_mapping
from captioner.encoders.network import ImageEncoder, get_encoder_spec
from captioner.inference.captioner import Captioner
from captioner.inference import guidance
from captioner.inference.guidance import Guide, MentionError
from captioner.inference.modeldir import resolve_model_path
from captioner.models import available_architectures, build_decoder
from captioner.models.extension import ExtensionError, extended_view, output_layer, transfer
from captioner.runtime.devices import autocast

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CHELSEA, COFFEE = EXAMPLES / "chelsea.png", EXAMPLES / "coffee.png"
WORDS = ["a", "cat", "dog", "horse", "car", "truck", "red", "blue", "on", "the", "grass", "man", "woman", "sits"]
ENCODER = get_encoder_spec("efficientnet-lite0").to_dict()
SIZES = {  # tiny decoders of each architecture, over Lite0 features
    "sat": dict(embed_dim=16, hidden_dim=16, attention_dim=16),
    "bahdanau-gru": dict(embed_dim=16, proj_dim=16, hidden_dim=16, attention_dim=16),
    "gru-residual": dict(embed_dim=16, hidden_dim=16, heads=2),
    "merge": dict(word_vectors="", freeze_embeddings=False, embed_dim=16, hidden_dim=16, num_layers=1),
    "transformer": dict(embed_dim=16, d_model=16, heads=2, num_layers=1, ff_dim=32),
}


def test_every_architecture_has_sizes_here():
    assert sorted(SIZES) == available_architectures()


def make_vocab() -> Vocab:
    return Vocab.build([WORDS])


def make_decoder(arch: str = "sat", seed: int = 0, feature_dim: int = 1280):
    torch.manual_seed(seed)
    model = build_decoder(arch, dict(vocab_size=len(make_vocab()), feature_dim=feature_dim, **SIZES[arch]))
    with torch.no_grad():  # outputs that depend on the input (the default init is nearly constant)
        model.embed.weight.normal_(0.0, 1.0)
        output_layer(model).weight.normal_(0.0, 1.0)
    return model.eval()


def rgb(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


@pytest.fixture(scope="module")
def lite0() -> ImageEncoder:
    return ImageEncoder(get_encoder_spec("efficientnet-lite0"))


@pytest.fixture(scope="module")
def example_features(lite0) -> torch.Tensor:
    """Lite0 grids of chelsea.png (a cat) and coffee.png (a cup of espresso)."""
    return lite0.encode([rgb(CHELSEA), rgb(COFFEE)])


# ---------------------------------------------------------------------------------------
# the mapping file


def test_the_mapping_file_maps_the_1000_classes_to_caption_words():
    m = read_mapping()
    assert m.version >= 1 and len(m.class_word) == len(m.class_names) == 1000
    assert list(m.words) == sorted(set(m.words)) and all(w.isalpha() and w.islower() for w in m.words)

    def word(c: int) -> str:
        return m.words[m.class_word[c]] if m.class_word[c] >= 0 else ""

    assert [word(c) for c in (281, 282, 285)] == ["cat"] * 3  # tabby, tiger cat, Egyptian cat
    assert (word(967), word(963), word(21)) == ("coffee", "pizza", "bird")  # espresso; 21 "kite" is the raptor
    assert {word(c) for c in range(151, 269)} == {"dog"}  # every dog breed
    assert m.class_names[281] == "tabby" and "Egyptian cat" in m.classes_of("cat")
    assert sum(1 for c in m.class_word if c < 0) > 0  # some classes no caption would name: no word


def _damaged(tmp_path: Path, edit) -> tuple[Path, int]:
    """A copy of the mapping file with ``edit(lines) -> line number damaged`` applied."""
    lines = MAPPING_FILE.read_text(encoding="utf-8").splitlines()
    n = edit(lines)
    path = tmp_path / "imagenet_words.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, n


def _row(lines: list[str], index: int) -> int:
    return next(i for i, line in enumerate(lines) if line.startswith(f"{index}\t"))


def _wrong_index(lines):
    i = _row(lines, 5)
    lines[i] = "6" + lines[i][1:]
    return i + 1


def _two_words(lines):
    i = _row(lines, 281)
    lines[i] = lines[i].rsplit("\t", 1)[0] + "\ttabby cat"
    return i + 1


def _missing_row(lines):
    del lines[_row(lines, 999)]
    return 0


@pytest.mark.parametrize("edit, says", [(_wrong_index, "with index 5"), (_two_words, "tabby cat'"),
                                        (_missing_row, "1000 classes, found 999")])
def test_a_damaged_mapping_file_is_refused_naming_the_file_and_line(tmp_path, edit, says):
    path, line = _damaged(tmp_path, edit)
    with pytest.raises(ConceptMapError) as e:
        read_mapping(path)
    message = str(e.value)
    assert message.startswith(str(path)) and says in message
    if line:
        assert f"line {line}:" in message


# ---------------------------------------------------------------------------------------
# the concept head of the real EfficientNet-Lite0


def test_lite0_sees_a_cat_in_chelsea_and_coffee_in_the_cup(example_features):
    head = concept_head("efficientnet-lite0")
    conf = head.confidences(example_features)
    assert conf.shape == (2, len(head.words)) and bool(((conf >= 0) & (conf <= 1 + 1e-6)).all())
    cat, coffee = head.concepts(conf)
    assert cat[0][0] == "cat" and cat[0][1] >= 0.5
    assert coffee[0][0] == "coffee" and coffee[0][1] >= 0.5
    assert concept_head("no-such-encoder") is None


def test_the_head_is_the_networks_own_classifier(lite0, example_features):
    """Its class probabilities are those of the packaged network run whole (pooling and _fc included)."""
    head = concept_head("efficientnet-lite0")
    whole = get_encoder_spec("efficientnet-lite0").build().net.eval()  # not batch-norm folded
    x = torch.as_tensor(lite0.preprocess([rgb(CHELSEA), rgb(COFFEE)])).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        probs = whole((x - lite0._mean) * lite0._inv_std).softmax(-1)
    assert probs.argmax(-1).tolist()[0] in (281, 282, 285) and probs.argmax(-1).tolist()[1] == 967
    torch.testing.assert_close(probs @ head._to_words, head.confidences(example_features), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------
# words a trained model was never taught


def test_transfer_gives_convex_combinations_of_the_nearest_known_words():
    decoder, vocab = make_decoder(), make_vocab()
    ext = transfer(decoder, vocab, ["kitten", "lorry", "giraffe"])
    assert ext.words == ["kitten", "lorry", "giraffe"] and len(ext) == 3
    assert ext.neighbours["kitten"][0][0] == "cat" and ext.neighbours["lorry"][0][0] == "truck"
    E, out = decoder.embed.weight.detach(), output_layer(decoder)
    for i, w in enumerate(ext.words):
        names, weights = zip(*ext.neighbours[w])
        weights = torch.tensor(weights)
        assert bool((weights >= 0).all()) and float(weights.sum()) == pytest.approx(1.0, abs=1e-5)
        assert list(weights) == sorted(weights, reverse=True)  # nearest first
        rows = torch.tensor([vocab.stoi[n] for n in names])
        torch.testing.assert_close(ext.embed[i], weights @ E[rows], atol=1e-5, rtol=0)
        torch.testing.assert_close(ext.out_weight[i], weights @ out.weight.detach()[rows], atol=1e-5, rtol=0)
        torch.testing.assert_close(ext.out_bias[i], weights @ out.bias.detach()[rows], atol=1e-5, rtol=0)


def test_transfer_refuses_a_known_word_and_one_the_word_vectors_lack():
    decoder, vocab = make_decoder(), make_vocab()
    with pytest.raises(ExtensionError, match="cat: already in the model's vocabulary"):
        transfer(decoder, vocab, ["giraffe", "cat"])
    with pytest.raises(ExtensionError, match="qzxwvq: not a word the word vectors glove-6b-50d know"):
        transfer(decoder, vocab, ["qzxwvq"])


@pytest.mark.parametrize("arch", available_architectures())
def test_an_extended_view_shares_the_weights_and_leaves_the_decoder_as_it_was(arch):
    decoder, vocab = make_decoder(arch, feature_dim=8), make_vocab()
    V, name = len(vocab), decoder.output_name
    feats = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))
    prev = torch.tensor([vocab.start_id, vocab.stoi["cat"], vocab.stoi["dog"]])

    def step(model, words):
        with torch.inference_mode():
            memory = model.encode(feats)
            return model.step(words, model.init_state(memory), memory)[0]

    before = step(decoder, prev)
    ext = transfer(decoder, vocab, ["kitten", "lorry", "giraffe"])
    view = extended_view(decoder, ext, torch.tensor([2, 0]))  # giraffe is word V, kitten V + 1
    mine = dict(decoder.named_parameters())
    for key, p in view.named_parameters():
        if key.split(".")[0] in ("embed", name):
            assert p.shape[0] == V + 2 and torch.equal(p[:V], mine[key][:V])
        else:
            assert p.data_ptr() == mine[key].data_ptr(), key
    torch.testing.assert_close(view.embed.weight[V:], ext.embed[[2, 0]], rtol=0, atol=0)
    assert decoder.embed.num_embeddings == V and output_layer(decoder).out_features == V
    assert decoder.cfg.vocab_size == V and getattr(view, name) is not getattr(decoder, name)
    wide = step(view, torch.tensor([V, V + 1, vocab.stoi["cat"]]))  # the new words are words of the view
    assert wide.shape == (3, V + 2) and bool(torch.isfinite(wide).all())
    shifted = step(view, prev)[:, :V] - before  # the same scores over the base words, renormalised
    torch.testing.assert_close(shifted, shifted[:, :1].expand_as(shifted), atol=1e-5, rtol=0)
    assert torch.equal(step(decoder, prev), before)  # the decoder itself: unchanged


# ---------------------------------------------------------------------------------------
# model directories with added words


@pytest.fixture
def tiny(tmp_path) -> tuple[Captioner, Path]:
    """A tiny decoder over Lite0 features with two added words, saved."""
    decoder, vocab = make_decoder(), make_vocab()
    cap = Captioner(decoder, vocab, {"encoder": ENCODER, "decoding": {"beam_size": 2, "max_len": 6}},
                    extension=transfer(decoder, vocab, ["kitten", "giraffe"]))
    return cap, cap.save_pretrained(tmp_path / "tiny")


def test_an_extension_survives_save_and_load(tiny, tmp_path):
    cap, path = tiny
    record = json.loads((path / "config.json").read_text())["vocab_extension"]
    assert record["words"] == ["kitten", "giraffe"] and record["vectors"] == "glove-6b-50d"
    again = Captioner.from_pretrained(path)
    a, b = cap.guide.extension, again.guide.extension
    assert b.words == a.words and again.guide.vocab.itos == cap.vocab.itos + ["kitten", "giraffe"]
    for key, t in a.tensors().items():
        assert torch.equal(b.tensors()[key], t), key
    assert [n for n, _ in b.neighbours["kitten"]] == [n for n, _ in a.neighbours["kitten"]]
    # saved again without it: the stale file goes with the record
    plain = Captioner(again.decoder, again.vocab, {k: v for k, v in again.config.items() if k != "vocab_extension"})
    plain.save_pretrained(path)
    assert not (path / "extension.safetensors").exists()
    assert "vocab_extension" not in json.loads((path / "config.json").read_text())
    assert len(Captioner.from_pretrained(path).guide.extension) == 0


def test_images_that_need_different_added_words_are_searched_at_once_as_each_alone(tiny, monkeypatch):
    """The guided re-search: one search for images needing other added words (and none), each image's captions and
    scores those of a search of it alone, whose vocabulary holds only the added words it needs."""
    cap, _ = tiny
    guide, V = cap.guide, len(cap.vocab)
    s = cap.decoding_settings(beam_size=3, n_best=2, max_len=6, concepts="off")
    feats = torch.randn(3, 49, 1280, generator=torch.Generator().manual_seed(3))
    groups = [[[V]], [[V + 1]], [[cap.vocab.stoi["cat"]]]]  # kitten, giraffe, cat
    alone = [guide._constrained(feats[b:b + 1], [g], [set()], s)[0] for b, g in enumerate(groups)]
    calls = []
    real = guidance.constrained_beam_search
    monkeypatch.setattr(guidance, "constrained_beam_search", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    first = cap.decode_features(feats, s)
    decoded = [guidance.Decoded([list(h) for h in first], None, [(b, feats[b], g, set(), 1.0)])
               for b, g in enumerate(groups)]  # three batches of one image each
    guide.search_again(decoded, s.replace(concept_margin=guidance.MAX_MARGIN))
    assert calls == [3]
    for b, (d, want, g) in enumerate(zip(decoded, alone, groups)):
        got = d.hyps[b]
        assert [h.tokens for h in got] == [h.tokens for h in want] and got[0].tokens and g[0][0] in got[0].tokens
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5, rel=0)


def test_vocab_extend_and_show_through_the_cli(tiny, tmp_path, capsys):
    _, path = tiny
    out = tmp_path / "more"
    assert main(["vocab", "extend", str(path), "--out", str(out), "--words", "zebra,giraffe,cat"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["added"], report["already_known"], report["extension_words"]) == (1, 2, 3)
    assert main(["vocab", "show", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["vocabulary"] == len(make_vocab()) and shown["added"] == 3
    assert list(shown["added_words"]) == ["kitten", "giraffe", "zebra"] and shown["added_words"]["kitten"][0] == "cat"
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(path / "model.safetensors")).keys()
    assert main(["vocab", "extend", str(path), "--out", str(out), "--words", "qzxwvq"]) == 2
    assert "qzxwvq: not known to the word vectors" in capsys.readouterr().err
    # and the extended model says the added word when asked to
    assert main(["caption", str(CHELSEA), "--model", str(out), "--mention", "zebra", "--json", "--quiet"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert "zebra" in line["caption"].split() and line["concepts"][0]["word"] == "cat"


def _shape(path: Path, config: dict) -> None:
    t = load_file(str(path / "extension.safetensors"))
    save_file({**t, "embed": torch.zeros(2, t["embed"].shape[1] + 1)}, str(path / "extension.safetensors"))


def _nan(path: Path, config: dict) -> None:
    t = load_file(str(path / "extension.safetensors"))
    t["out_bias"][1] = float("nan")
    save_file(t, str(path / "extension.safetensors"))


def _known_word(path: Path, config: dict) -> None:
    config["vocab_extension"]["words"] = ["kitten", "cat"]


def _no_record(path: Path, config: dict) -> None:
    del config["vocab_extension"]


def _no_file(path: Path, config: dict) -> None:
    (path / "extension.safetensors").unlink()


@pytest.mark.parametrize("damage, says", [
    (_shape, "embed must be floating point of shape (2, 16)"), (_nan, "out_bias holds NaN or infinite values"),
    (_known_word, "vocab_extension 'cat' is in vocab.json already"),
    (_no_record, "config.json names no vocab_extension"), (_no_file, "missing, but config.json names")])
def test_a_damaged_extension_is_a_clear_error_and_exit_2(tiny, capsys, damage, says):
    _, path = tiny
    config = json.loads((path / "config.json").read_text())
    damage(path, config)
    (path / "config.json").write_text(json.dumps(config))
    assert main(["caption", str(CHELSEA), "--model", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and says in err
    with pytest.raises(ValueError, match="extension|vocab_extension"):
        Captioner.from_pretrained(path)


# ---------------------------------------------------------------------------------------
# the bundled model: written before concepts, mentions and extensions


@pytest.fixture(scope="module")
def bundled(lite0) -> Captioner:
    cap = Captioner.from_pretrained()
    cap._encoder = lite0  # share the one built encoder
    return cap


@pytest.fixture(scope="module")
def before(tmp_path_factory, lite0) -> Captioner:
    """The bundled model's directory as written before concepts existed: its decoding defaults without the
    concept settings, no vocabulary extension."""
    src, out = resolve_model_path("flickr8k-sat"), tmp_path_factory.mktemp("before")
    config = json.loads((src / "config.json").read_text())
    config.pop("vocab_extension", None)
    config["decoding"] = {k: v for k, v in config["decoding"].items() if not k.startswith("concept")}
    (out / "config.json").write_text(json.dumps(config))
    for name in ("model.safetensors", "vocab.json"):
        shutil.copyfile(src / name, out / name)
    cap = Captioner.from_pretrained(out)
    cap._encoder = lite0
    return cap


def test_a_model_directory_from_before_captions_exactly_as_before(before, example_features):
    assert "vocab_extension" not in before.config and len(before.guide.extension) == 0
    s = before.settings
    assert s.concepts == "off" and s.mention == () and not s.guided  # no concept is used by default
    with autocast(before.device, before.decoder_precision):  # the search as it was, in the decoder's precision
        want = generate(before.decoder, before.vocab, example_features, s)
    got = before.decode_features(example_features)
    assert [[(h.tokens, h.score) for h in hs] for hs in got] == [[(h.tokens, h.score) for h in hs] for hs in want]
    results = before.caption([CHELSEA, COFFEE])
    assert [r.caption for r in results] == [join_tokens(before.vocab.decode(hs[0].tokens)) for hs in want]
    assert "dog" in results[0].caption  # the cat, as it was called before concepts


def test_the_bundled_model_names_the_cat_with_its_defaults(bundled):
    """Its defaults turn concepts on (chosen on Flickr8k val and coco-dev), and its extension holds the concept
    words its captions never taught it."""
    assert bundled.settings.concepts == "auto" and len(bundled.guide.extension) > 100
    assert "giraffe" not in bundled.guide.extension.words  # no ImageNet class says giraffe
    cat, coffee = bundled.caption([CHELSEA, COFFEE])
    assert "cat" in cat.words and "dog" not in cat.words
    assert {"coffee", "cup"} & set(coffee.words)
    plain = bundled.caption([CHELSEA, COFFEE], concepts="off")  # as before: what the concepts changed
    assert "dog" in plain[0].words and not {"coffee", "cup"} & set(plain[1].words)
    assert [r.concepts for r in plain] == [cat.concepts, coffee.concepts] and cat.concepts[0][0] == "cat"


def test_captions_list_their_concepts(bundled, capsys):
    (r,) = bundled.caption(CHELSEA)
    assert r.concepts[0][0] == "cat" and r.concepts[0][1] >= 0.5
    assert r.to_dict()["concepts"][0] == {"word": "cat", "confidence": r.concepts[0][1]}
    assert main(["caption", str(COFFEE), "--json", "--quiet"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["concepts"][0]["word"] == "coffee" and 0.5 <= line["concepts"][0]["confidence"] <= 1


def test_an_encoder_without_a_classifier_gives_no_concepts_and_decodes_as_before():
    decoder, vocab = make_decoder(feature_dim=8), make_vocab()
    cap = Captioner(decoder, vocab, {"encoder": {**ENCODER, "name": "no-classifier"}, "decoding": {"max_len": 6}})
    feats = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))
    hyps, concepts = cap._decode(feats, cap.decoding_settings(concepts="auto"), 0)
    assert concepts is None
    assert [h[0].tokens for h in hyps] == [h[0].tokens for h in cap.decode_features(feats)]


def test_the_words_a_caption_must_hold(bundled):
    """Mentions first, then the confident concepts (their plurals satisfy them), at most max_concepts."""
    guide, v = bundled.guide, bundled.vocab
    seen = [[("cat", 0.9), ("dog", 0.6), ("sofa", 0.3)], [("coffee", 0.4)]]
    groups, weakest = guide.word_groups(bundled.decoding_settings(concepts="auto", concept_threshold=0.5), seen, 2)
    assert groups == [[[v.stoi["cat"], v.stoi["cats"]]], []] and weakest == [0.9, 1.0]
    groups, weakest = guide.word_groups(bundled.decoding_settings(concepts="auto", max_concepts=2, concept_threshold=0.3,
                                                         mention=("man",)), seen, 2)
    assert groups[0] == [[v.stoi["man"]], [v.stoi["cat"], v.stoi["cats"]], [v.stoi["dog"], v.stoi["dogs"]]]
    assert groups[1] == [[v.stoi["man"]], [v.stoi["coffee"]]] and weakest == [0.6, 0.4]
    assert guide.word_groups(bundled.decoding_settings(concepts="off"), seen, 2) == ([[], []], [1.0, 1.0])


def test_a_mention_the_model_cannot_learn_is_refused(bundled, example_features):
    with pytest.raises(MentionError, match="qzxwvq: not a word the word vectors glove-6b-50d know"):
        bundled.decode_features(example_features, mention=("qzxwvq",))
    guide, taught = bundled.guide, bundled.guide.extension
    try:  # learnt on the fly from the word vectors, and kept for the next request
        hyps = bundled.decode_features(example_features, mention=("giraffe",), n_best=2)
        assert all("giraffe" in guide.vocab.decode(h.tokens) for hs in hyps for h in hs)
        assert guide.extension.words[:-1] == taught.words and guide.vocab.itos[-1] == "giraffe"
    finally:  # the module's model as it was
        guide.extension = taught
        guide.vocab = guide._out_vocab()


def test_a_special_token_is_not_a_word_to_mention(bundled, example_features):
    for token in ("<unk>", "<start>", "<pad>"):
        with pytest.raises(MentionError, match="special token"):
            bundled.decode_features(example_features, mention=(token,))
