"""Tests for captioner.data.text (tokenizer, vocabulary, length report)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from captioner.data.text import (
    END,
    PAD,
    SPECIALS,
    START,
    UNK,
    Vocab,
    join_tokens,
    length_report,
    tokenize,
    vocabulary_warnings,
)


# --------------------------------------------------------------------------- tokenize


@pytest.mark.parametrize(
    ("raw", "tokens"),
    [
        ("A black dog is running after a white dog in the snow .",
         ["a", "black", "dog", "is", "running", "after", "a", "white", "dog", "in", "the", "snow"]),
        ("Florida men 's basketball player # 33 shooting basketball .",
         ["florida", "men", "s", "basketball", "player", "#", "33", "shooting", "basketball"]),
        ("A person riding transit ( catching ? ) a paper bag .",
         ["a", "person", "riding", "transit", "(", "catching", ")", "a", "paper", "bag"]),
        ("an at&t headphone", ["an", "at&t", "headphone"]),
        ("two young children RIF=ding sleds", ["two", "young", "children", "rif=ding", "sleds"]),
        ("three lambs : one white , one black",
         ["three", "lambs", ":", "one", "white", "one", "black"]),
        ("A dog's toy", ["a", "dogs", "toy"]),
        ('He said "hi"; she left!', ["he", "said", "hi", "she", "left"]),
        ("a t-shirt and a well-known  place",
         ["a", "t", "shirt", "and", "a", "well", "known", "place"]),
        ("en\u2013dash", ["en", "dash"]),
        ("  Tabs\tand\nnewlines  ", ["tabs", "and", "newlines"]),
        ("Caf\u00e9 na\u00efve", ["caf\u00e9", "na\u00efve"]),
        ("snake_case", ["snakecase"]),
        ("", []),
        (" . , ! ", []),
    ],
)
def test_tokenize_is_karpathy_compatible(raw: str, tokens: list[str]) -> None:
    assert tokenize(raw) == tokens


# --------------------------------------------------------------------------- Vocab


def _corpus() -> list[list[str]]:
    return [
        ["a", "dog", "runs"],
        ["a", "cat", "runs"],
        ["a", "dog", "sleeps"],
        ["the", "bird"],
    ]


def test_build_orders_by_frequency_then_alphabetically() -> None:
    v = Vocab.build(_corpus())
    assert v.itos[:4] == list(SPECIALS)
    # a:3, dog:2, runs:2, then the count-1 words alphabetically
    assert v.itos[4:] == ["a", "dog", "runs", "bird", "cat", "sleeps", "the"]
    assert (v.pad_id, v.start_id, v.end_id, v.unk_id) == (0, 1, 2, 3)
    assert v.stoi[PAD] == 0 and v.stoi[START] == 1 and v.stoi[END] == 2 and v.stoi[UNK] == 3
    assert len(v) == 11
    assert "dog" in v and "zebra" not in v
    assert all(v.stoi[w] == i for i, w in enumerate(v.itos))


def test_build_is_deterministic_regardless_of_input_order() -> None:
    assert Vocab.build(_corpus()).itos == Vocab.build(list(reversed(_corpus()))).itos


def test_build_min_freq_and_max_size() -> None:
    assert Vocab.build(_corpus(), min_freq=2).itos[4:] == ["a", "dog", "runs"]
    v = Vocab.build(_corpus(), max_size=2)
    assert v.itos[4:] == ["a", "dog"] and len(v) == 6
    assert Vocab.build(_corpus(), max_size=0).itos == list(SPECIALS)
    assert Vocab.build(_corpus(), min_freq=2, max_size=10).itos[4:] == ["a", "dog", "runs"]
    with pytest.raises(ValueError):
        Vocab.build(_corpus(), min_freq=0)
    with pytest.raises(ValueError):
        Vocab.build(_corpus(), max_size=-1)


def test_build_ignores_special_tokens_in_input() -> None:
    v = Vocab.build([[UNK, "a", PAD]])
    assert v.itos == [*SPECIALS, "a"]


def test_encode_adds_specials_and_maps_unknown() -> None:
    v = Vocab.build(_corpus())
    a, dog = v.stoi["a"], v.stoi["dog"]
    assert v.encode(["a", "dog", "zebra"]) == [v.start_id, a, dog, v.unk_id, v.end_id]
    assert v.encode(["a", "dog"], add_special=False) == [a, dog]
    assert v.encode([]) == [v.start_id, v.end_id]


def test_encode_truncation_keeps_end() -> None:
    v = Vocab.build(_corpus())
    ids = v.encode(["a", "dog", "runs", "a", "cat"], max_len=2)
    assert ids == [v.start_id, v.stoi["a"], v.stoi["dog"], v.end_id]
    assert v.encode(["a", "dog"], max_len=0) == [v.start_id, v.end_id]
    assert v.encode(["a", "dog"], max_len=5) == v.encode(["a", "dog"])
    with pytest.raises(ValueError):
        v.encode(["a"], max_len=-1)


def test_decode_stops_at_end_and_skips_pad_and_start() -> None:
    v = Vocab.build(_corpus())
    ids = [v.start_id, v.stoi["a"], v.pad_id, v.stoi["dog"], v.end_id, v.stoi["cat"], v.pad_id]
    assert v.decode(ids) == ["a", "dog"]
    assert v.decode(ids, strip_special=False) == [START, "a", PAD, "dog", END, "cat", PAD]
    assert v.decode([v.unk_id]) == [UNK]
    assert v.decode(v.encode(["a", "dog", "runs"])) == ["a", "dog", "runs"]
    with pytest.raises(ValueError, match="out of range"):
        v.decode([len(v)])


def test_invalid_itos_rejected() -> None:
    with pytest.raises(ValueError):
        Vocab(["a", "b"])
    with pytest.raises(ValueError):
        Vocab([*SPECIALS, "a", "a"])


def test_save_load_roundtrip(tmp_path: Path) -> None:
    v = Vocab.build(_corpus(), min_freq=1, max_size=5)
    path = tmp_path / "sub" / "vocab.json"
    v.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "captioner-vocab" and data["version"] == 1
    assert data["itos"] == v.itos and data["min_freq"] == 1 and data["max_size"] == 5
    loaded = Vocab.load(path)
    assert loaded == v and loaded.stoi == v.stoi
    assert [p.name for p in path.parent.iterdir()] == ["vocab.json"]  # no temp file left


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"format": "other", "version": 1, "itos": []}', "'format'"),
        ('{"format": "captioner-vocab", "version": 2, "itos": []}', "'version'"),
        ('{"format": "captioner-vocab", "version": 1}', "'itos'"),
        ('{"format": "captioner-vocab", "version": 1, "itos": ["a", "b"]}', "must start with"),
        (
            '{"format": "captioner-vocab", "version": 1,'
            ' "itos": ["<pad>", "<start>", "<end>", "<unk>", "a", "a"]}',
            "duplicate",
        ),
        (
            '{"format": "captioner-vocab", "version": 1,'
            ' "itos": ["<pad>", "<start>", "<end>", "<unk>"], "min_freq": 0}',
            "'min_freq'",
        ),
    ],
)
def test_load_bad_vocab_names_file_and_problem(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "vocab.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as err:
        Vocab.load(path)
    assert str(path) in str(err.value)
    assert problem in str(err.value)


def test_load_missing_vocab_names_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ValueError, match="not found") as err:
        Vocab.load(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("word", "shown"),
    [
        ("dog\ncat: a fake line", r"'dog\ncat: a fake line'"),
        ("dog\r", r"'dog\r'"),
        ("two words", "'two words'"),
        ("tab\there", r"'tab\there'"),
        ("bell\x07", r"'bell\x07'"),
        ("nel\x85", r"'nel\x85'"),
        ("line\u2028sep", r"'line\u2028sep'"),
        ("\ud800", r"'\ud800'"),
    ],
)
def test_load_refuses_words_with_control_characters_or_whitespace(tmp_path: Path, word: str, shown: str) -> None:
    """Issue 21: a word holding a newline printed a fake output line (`captioner caption`)."""
    path = tmp_path / "vocab.json"
    itos = ["<pad>", "<start>", "<end>", "<unk>", "a", word]
    path.write_text(json.dumps({"format": "captioner-vocab", "version": 1, "itos": itos}), encoding="utf-8")
    with pytest.raises(ValueError) as err:
        Vocab.load(path)
    assert str(err.value).startswith(f"{path}: not a valid vocabulary file: 'itos' entry 5 ({shown}) ")
    assert "control character or whitespace" in str(err.value)


def test_load_keeps_words_of_any_script_with_joiners(tmp_path: Path) -> None:
    """Zero-width joiners (Persian, Indic scripts, emoji sequences) are format characters, not controls."""
    words = ["\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "\U0001f469\u200d\U0001f4bb", "été", "猫"]
    path = tmp_path / "vocab.json"
    itos = ["<pad>", "<start>", "<end>", "<unk>", *words]
    path.write_text(json.dumps({"format": "captioner-vocab", "version": 1, "itos": itos}), encoding="utf-8")
    assert Vocab.load(path).itos == itos


# --------------------------------------------------------------------------- length_report


def test_length_report() -> None:
    lists = [["w"] * n for n in range(1, 21)]  # lengths 1..20
    rep = length_report(lists, max_len=16)
    assert rep == {"captions": 20, "max_len": 16, "truncated": 4, "longest": 20, "p95": 19}
    assert length_report([], 5) == {
        "captions": 0, "max_len": 5, "truncated": 0, "longest": 0, "p95": 0,
    }


# --------------------------------------------------------------------------- any script (issue 21, defect 9)


@pytest.mark.parametrize(
    ("raw", "tokens"),
    [
        # scripts written without spaces: one token per character, punctuation dropped
        ("一只红色的猫在桌子上。", ["一", "只", "红", "色", "的", "猫", "在", "桌", "子", "上"]),
        ("赤い円が青い四角の上にある", list("赤い円が青い四角の上にある")),
        ("Ｔシャツを着た男性が３匹の犬と歩く", ["t", "シ", "ャ", "ツ", "を", "着", "た", "男", "性", "が", "3", "匹",
                                         "の", "犬", "と", "歩", "く"]),  # NFKC: full-width letters/digits
        ("ｼｬﾂ", ["シ", "ャ", "ツ"]),  # half-width katakana become full-width
        ("แมวสีขาว", ["แ", "ม", "ว", "สี", "ข", "า", "ว"]),  # Thai: combining vowels stay on their letter
        # scripts written with spaces: words, with their combining marks
        ("एक काला कुत्ता", ["एक", "काला", "कुत्ता"]),
        ("검은 고양이가 앉아 있다", ["검은", "고양이가", "앉아", "있다"]),
        ("قطة سوداء", ["قطة", "سوداء"]),
        ("Eine Straße ÜBER dem Fluss", ["eine", "straße", "über", "dem", "fluss"]),
        # French and Italian elisions are split at the apostrophe (also a typographic one)
        ("Un chat à côté d'un chien", ["un", "chat", "à", "côté", "d", "un", "chien"]),
        ("L\u2019homme qu'il voit jusqu'à l'eau", ["l", "homme", "qu", "il", "voit", "jusqu", "à", "l", "eau"]),
        ("dell'acqua", ["dell", "acqua"]),
        # decomposed accents are composed (NFKC), not stripped
        ("e\u0301te\u0301 cafe\u0301", ["\u00e9t\u00e9", "caf\u00e9"]),
        # emoji are tokens of their own; skin tones, ZWJ sequences and flags stay whole
        ("a dog 🐶 on the beach 🏖️", ["a", "dog", "🐶", "on", "the", "beach", "🏖"]),
        ("dog🐶cat", ["dog", "🐶", "cat"]),
        ("👍🏽 👨\u200d👩\u200d👧 🇫🇷🇩🇪", ["👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "🇩🇪"]),
    ],
)
def test_tokenize_any_script(raw: str, tokens: list[str]) -> None:
    assert tokenize(raw) == tokens


def test_tokenize_is_idempotent_on_its_output() -> None:
    """A caption a model writes (tokens joined by spaces) tokenizes back to the same tokens: what evaluation
    relies on when it scores non-English captions with this tokenizer."""
    for raw in ("Un chat à côté d'un chien 🐶", "赤い円が青い四角の上にある。", "แมวสีขาว", "👍🏽 👨\u200d👩\u200d👧 🇫🇷",
                "a dog's (toy) at&t", "एक काला कुत्ता"):
        tokens = tokenize(raw)
        assert tokenize(" ".join(tokens)) == tokens, raw


def _old_tokenize(caption: str) -> list[str]:
    """The tokenizer before issue 21, verbatim: English tokenization must not change."""
    dashes = str.maketrans({c: " " for c in "-\u2010\u2011\u2012\u2013\u2014\u2015"})
    return re.sub(r"[^\w\s()#&:=]|_", "", caption.lower().translate(dashes)).split()


_ENGLISH_WORDS = (
    "a an the man woman dog dogs dog's men 's it's don't isn't o'clock rock n' roll y'all c'mon s'mores ma'am "
    "two 2 1,000 3:30 3.5 #33 at&t t-shirt well-known black-and-white ( ) [ ] { } . , ; ! ? \" ' ` ... -- - _ "
    "snake_case e.g. u.s. mr. (catching ?) rif=ding : = & @ * / \\ + % $ | < > ~ ^ café naïve dog’s “quoted” "
    "Tabs\tand\nnewlines en\u2013dash em\u2014dash A BIG Skateboarder's frisbee's 10-year-old 50's ok."
).split(" ")


def test_english_tokenization_is_unchanged_on_a_large_generated_sample() -> None:
    rng = random.Random(21)
    for _ in range(20000):
        caption = " ".join(rng.choice(_ENGLISH_WORDS) for _ in range(rng.randint(1, 18)))
        if rng.random() < 0.3:  # words glued to punctuation, as people type them
            caption = caption.replace(" .", ".").replace(" ,", ",").replace(" '", "'")
        assert tokenize(caption) == _old_tokenize(caption), caption


# --------------------------------------------------------------------------- vocabulary warnings


def test_vocabulary_warnings_for_sentences_as_tokens_and_long_tokens() -> None:
    sentences = [[f"赤い円が青い四角の上にある{i}"] for i in range(300)]
    problems = vocabulary_warnings(sentences)
    text = " ".join(problems)
    assert "seen once" in text and "one token long" in text and "longer than" not in text
    long_words = [["a", "dog", "and", "x" * 40 + str(i % 50)] for i in range(300)]
    assert any("longer than 24 characters" in p for p in vocabulary_warnings(long_words))


def test_no_vocabulary_warning_for_ordinary_captions() -> None:
    rng = random.Random(0)
    words = "a the dog cat man runs sits on in with red blue ball grass".split()
    captions = [[rng.choice(words) for _ in range(rng.randint(5, 12))] for _ in range(500)]
    captions += [["a", "rare", "word"]]
    assert vocabulary_warnings(captions) == []
    assert vocabulary_warnings([]) == [] and vocabulary_warnings([["one"], ["two"]]) == []


def test_join_tokens_writes_scripts_without_spaces_without_spaces() -> None:
    """How a caption's tokens are shown: spaces between words, none around characters of Chinese, Japanese,
    Thai...; the text tokenizes back to the same tokens."""
    assert join_tokens(["a", "dog", "'s", "toy"]) == "a dog 's toy"
    assert join_tokens(tokenize("赤い円が青い四角の上にある。")) == "赤い円が青い四角の上にある"
    assert join_tokens(tokenize("Ｔシャツを着た男性が３匹の犬と歩く")) == "tシャツを着た男性が3匹の犬と歩く"
    for raw in ("Un chat à côté d'un chien 🐶 猫🐶", "แมวสีขาว 2 ตัว", "👍🏽 👨\u200d👩\u200d👧 🇫🇷", "a dog's (toy) at&t",
                "ab猫cd 3匹"):
        assert tokenize(join_tokens(tokenize(raw))) == tokenize(raw), raw


@example("A'\u0300")  # a mark kept from its letter by a dropped apostrophe: the token is composed again
@given(st.text(max_size=40) | st.text(alphabet="ab d'l’éー赤い円🐶\u200d\u0301\u0e35 ", max_size=20))
def test_tokenize_properties_on_any_text(text: str) -> None:
    tokens = tokenize(text)
    assert all(t and not any(c.isspace() for c in t) for t in tokens), tokens
    assert tokenize(" ".join(tokens)) == tokens
    assert tokenize(join_tokens(tokens)) == tokens
