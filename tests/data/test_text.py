"""Tests for captioner.data.text (tokenizer, vocabulary, length report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioner.data.text import END, PAD, SPECIALS, START, UNK, Vocab, length_report, tokenize


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


# --------------------------------------------------------------------------- length_report


def test_length_report() -> None:
    lists = [["w"] * n for n in range(1, 21)]  # lengths 1..20
    rep = length_report(lists, max_len=16)
    assert rep == {"captions": 20, "max_len": 16, "truncated": 4, "longest": 20, "p95": 19}
    assert length_report([], 5) == {
        "captions": 0, "max_len": 5, "truncated": 0, "longest": 0, "p95": 0,
    }
