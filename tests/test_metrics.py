"""Tests for captioner.evaluation.metrics: agreement with pycocoevalcap, the no-Java fallback, edge cases."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captioner.evaluation import metrics as M
from captioner.evaluation.metrics import (
    METRIC_NAMES,
    MetricsResult,
    compute_metrics,
    java_available,
    ptb_tokenize_fallback,
    spice_available,
)

JAVA_OK, JAVA_REASON = java_available()
needs_java = pytest.mark.skipif(not JAVA_OK, reason=f"Java is not available: {JAVA_REASON}")
NO_JAVA = "/nonexistent/bin/java"
PURE_PYTHON_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D")

# Four images, 2-5 references each, candidates from near-perfect to empty.
REFERENCES = {
    "img1": [
        "A man riding a brown horse on a beach.",
        "A person rides a horse along the shore.",
        "Man on horseback near the ocean waves.",
        "A rider and his horse walking by the sea!",
        "The man's horse is trotting on the sand.",
    ],
    "img2": [
        "Two dogs playing with a frisbee in the park.",
        "A pair of dogs chase a red frisbee, outdoors.",
    ],
    "img3": [
        "A plate of pasta (with tomato sauce) on a table.",
        "Spaghetti with sauce served on a white plate.",
        "A dish of noodles and basil, ready to eat.",
    ],
    "img4": [
        "A red double-decker bus driving down a city street.",
        "The bus isn't moving; it's stuck in traffic.",
        "A big red bus on the road.",
        "Cars and a bus on a busy street.",
    ],
}
CANDIDATES = {
    "img1": "A man riding a horse on the beach.",
    "img2": "Two cats sleeping on a sofa.",
    "img3": "",
    "img4": "A red bus driving down the street.",
}


def _pycocoevalcap_scores(
    references: dict[str, list[str]], candidates: dict[str, str]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The reference implementation: pycocoevalcap used the way its COCOEvalCap does."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": candidates[i]}] for i in references})
    scores: dict[str, float] = {}
    per_image: dict[str, dict[str, float]] = {i: {} for i in gts}

    def record(name: str, corpus: float, image_scores) -> None:
        scores[name] = float(corpus)
        for image_id, value in zip(gts.keys(), image_scores):
            per_image[image_id][name] = float(value)

    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        record(f"BLEU-{n + 1}", bleu[n], bleu_per_image[n])
    meteor = Meteor()
    try:
        record("METEOR", *meteor.compute_score(gts, res))
    finally:  # Meteor 1.2 only kills its JVM in __del__, and never closes the pipes
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
        for pipe in (meteor.meteor_p.stdin, meteor.meteor_p.stdout, meteor.meteor_p.stderr):
            pipe.close()
    record("ROUGE-L", *Rouge().compute_score(gts, res))
    record("CIDEr-D", *Cider().compute_score(gts, res))
    return scores, per_image


@pytest.fixture(scope="module")
def ours() -> MetricsResult:
    if not JAVA_OK:
        pytest.skip(f"Java is not available: {JAVA_REASON}")
    return compute_metrics(REFERENCES, CANDIDATES)


@pytest.fixture(scope="module")
def theirs() -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    if not JAVA_OK:
        pytest.skip(f"Java is not available: {JAVA_REASON}")
    return _pycocoevalcap_scores(REFERENCES, CANDIDATES)


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(M, "_warned", set())


# ---------------------------------------------------------------------------------------
# Agreement with pycocoevalcap
# ---------------------------------------------------------------------------------------


@needs_java
def test_corpus_scores_match_pycocoevalcap(ours: MetricsResult, theirs) -> None:
    expected, _ = theirs
    assert list(ours.scores)[:7] == list(METRIC_NAMES[:7])  # SPICE last, if its jars exist
    for name, value in expected.items():
        assert ours.scores[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert 0.0 < ours.scores["BLEU-4"] < ours.scores["BLEU-1"] < 1.0
    assert ours.scores["CIDEr-D"] > 0.0 and 0.0 < ours.scores["METEOR"] < 1.0


@needs_java
def test_per_image_scores_match_pycocoevalcap(ours: MetricsResult, theirs) -> None:
    _, expected = theirs
    assert set(ours.per_image) == set(REFERENCES)
    for image_id, image_scores in expected.items():
        for name, value in image_scores.items():
            got = ours.per_image[image_id][name]
            assert got == pytest.approx(value, rel=1e-9, abs=1e-12), (image_id, name)
    assert ours.per_image["img3"]["CIDEr-D"] == 0.0  # the empty candidate
    assert ours.per_image["img3"]["METEOR"] == 0.0


@needs_java
def test_no_leaked_java_processes(ours: MetricsResult, theirs) -> None:
    leftovers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        state, ppid = fields[0], int(fields[1])
        comm = (stat.parent / "comm").read_text().strip() if state != "Z" else "zombie"
        if ppid == os.getpid() and (comm in {"java", "zombie"}):
            leftovers.append((stat.parent.name, comm))
    assert leftovers == []


@needs_java
def test_meteor_failure_is_reported_not_raised(tmp_path: Path) -> None:
    fake_java = tmp_path / "java"  # a real java, except that it cannot run METEOR's jar
    fake_java.write_text(
        "#!/bin/sh\n"
        'case "$*" in *meteor*) echo "simulated METEOR crash" >&2; exit 3;; esac\n'
        f'exec "{shutil.which("java")}" "$@"\n'
    )
    fake_java.chmod(0o755)
    result = compute_metrics(
        REFERENCES, CANDIDATES, metrics=["METEOR", "CIDEr-D"], java=str(fake_java)
    )
    assert list(result.scores) == ["CIDEr-D"]
    assert "METEOR failed" in result.unavailable["METEOR"]
    assert "simulated METEOR crash" in result.unavailable["METEOR"]


def test_identical_candidate_gets_perfect_bleu() -> None:
    sentences = {
        "a": "A man riding a wave on top of a surfboard.",
        "b": "Two giraffes standing next to each other in a field.",
        "c": "A cat sleeping on a laptop keyboard.",
    }
    references = {i: [s, s, s] for i, s in sentences.items()}
    result = compute_metrics(references, sentences, metrics=["BLEU-1", "BLEU-4", "ROUGE-L"])
    assert result.scores["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert result.scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert result.scores["ROUGE-L"] == pytest.approx(1.0, abs=1e-12)
    assert all(s["BLEU-4"] == pytest.approx(1.0, abs=1e-6) for s in result.per_image.values())


# ---------------------------------------------------------------------------------------
# Input validation and options
# ---------------------------------------------------------------------------------------


def test_mismatched_ids_raise_a_clear_error() -> None:
    refs = {"a": ["a dog"], "b": ["a cat"]}
    with pytest.raises(ValueError, match=r"same image ids.*without references: 'c'"):
        compute_metrics(refs, {"a": "a dog", "b": "a cat", "c": "a cow"}, java=NO_JAVA)
    with pytest.raises(ValueError, match=r"reference id\(s\) without a candidate: 'b'"):
        compute_metrics(refs, {"a": "a dog"}, java=NO_JAVA)
    many = {f"id{k}": "x" for k in range(10)}
    with pytest.raises(ValueError, match=r"10 candidate id\(s\).*'id4', \.\.\. \(5 more\)"):
        compute_metrics({}, many, java=NO_JAVA)


def test_bad_inputs_and_unknown_metric() -> None:
    with pytest.raises(ValueError, match="nothing to evaluate"):
        compute_metrics({}, {})
    with pytest.raises(ValueError, match="needs a reference"):
        compute_metrics({"a": []}, {"a": "a dog"}, java=NO_JAVA)
    with pytest.raises(TypeError, match="list of strings"):
        compute_metrics({"a": "a dog"}, {"a": "a dog"}, java=NO_JAVA)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics({"a": ["a dog"]}, {"a": "a dog"}, metrics=["BLEU-5"])


def test_metric_subset_and_quiet_output(capsys: pytest.CaptureFixture[str]) -> None:
    result = compute_metrics(REFERENCES, CANDIDATES, metrics=["CIDEr-D", "BLEU-4"])
    assert list(result.scores) == ["BLEU-4", "CIDEr-D"]
    assert result.unavailable == {}
    assert all(set(s) == {"BLEU-4", "CIDEr-D"} for s in result.per_image.values())
    assert capsys.readouterr().out == ""  # no "{'testlen': ...}" lines from Bleu


def test_all_empty_candidates_score_zero() -> None:
    empty = {i: "" for i in REFERENCES}
    result = compute_metrics(REFERENCES, empty, metrics=PURE_PYTHON_METRICS)
    for name in PURE_PYTHON_METRICS:
        assert result.scores[name] == pytest.approx(0.0, abs=1e-9), name


def test_as_percent() -> None:
    result = MetricsResult(scores={"BLEU-4": 0.123456, "CIDEr-D": 1.0549, "METEOR": 0.25})
    assert result.as_percent() == {"BLEU-4": 12.35, "CIDEr-D": 105.49, "METEOR": 25.0}
    assert result.per_image == {} and result.unavailable == {}


# ---------------------------------------------------------------------------------------
# No Java: pure-Python fallback
# ---------------------------------------------------------------------------------------


def test_without_java_computes_pure_python_metrics(
    fresh_warnings: None, caplog: pytest.LogCaptureFixture
) -> None:
    assert java_available(NO_JAVA)[0] is False
    with caplog.at_level(logging.WARNING, logger="captioner.evaluation.metrics"):
        result = compute_metrics(REFERENCES, CANDIDATES, java=NO_JAVA)
        compute_metrics(REFERENCES, CANDIDATES, java=NO_JAVA)
    assert set(result.scores) == set(PURE_PYTHON_METRICS)
    assert result.scores["BLEU-1"] > 0.3 and result.scores["CIDEr-D"] > 0.3
    assert "Java" in result.unavailable["METEOR"] and NO_JAVA in result.unavailable["METEOR"]
    assert "SPICE" in result.unavailable
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # warned once, not on every call
    assert warnings[0].startswith("Java not found: METEOR (and the PTB tokenizer) need Java 8+")


def test_without_java_on_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_warnings: None
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    ok, reason = java_available()
    assert not ok and "not found on PATH" in reason
    result = compute_metrics(REFERENCES, CANDIDATES)
    assert set(result.scores) == set(PURE_PYTHON_METRICS)
    assert "METEOR" in result.unavailable


@needs_java
def test_fallback_equals_java_on_simple_captions(fresh_warnings: None) -> None:
    references = {
        "1": ["a man riding a horse on a beach", "a person rides a horse along the shore"],
        "2": [
            "two dogs playing with a frisbee",
            "a pair of dogs chase a red frisbee",
            "dogs in a park",
        ],
        "3": ["a plate of pasta on a table", "spaghetti served on a white plate"],
    }
    candidates = {
        "1": "a man riding a horse",
        "2": "two dogs in a park",
        "3": "a white plate of food",
    }
    with_java = compute_metrics(references, candidates, metrics=PURE_PYTHON_METRICS)
    without = compute_metrics(references, candidates, metrics=PURE_PYTHON_METRICS, java=NO_JAVA)
    assert without.scores == pytest.approx(with_java.scores, rel=1e-12)
    assert without.per_image == with_java.per_image


@needs_java
def test_fallback_tokenizer_matches_ptb_on_ordinary_captions() -> None:
    captions = [
        "A man riding a wave on top of a surfboard.",
        "Two dogs' toys, (red) and \"blue\" -- on the grass!",
        "It's a dog's life; don't, can't, won't... cannot!",
        "A black-and-white photo of 1,000 people at 3:30 p.m. in the U.S.",
        "The cat is on a $5 mat, 50% off?",
        "A woman\u2019s hand holding a \u201ccell phone\u201d\u2026",
        "Mr. Smith and Dr. Jones at the zoo.",
        "WOW!! a [big] {red} ball?!",
        "the dog 's bone, rock 'n' roll",
        "  extra   spaces\tand a tab ",
        "",
    ]
    java = PTBTokenizer().tokenize({k: [{"caption": c}] for k, c in enumerate(captions)})
    for k, caption in enumerate(captions):
        assert ptb_tokenize_fallback(caption) == java[k][0], caption


def test_fallback_tokenizer_examples() -> None:
    assert ptb_tokenize_fallback("A Dog's toy, (red)!") == "a dog 's toy -lrb- red -rrb-"
    assert ptb_tokenize_fallback("He isn't gonna stop.") == "he is n't gon na stop"
    assert ptb_tokenize_fallback("A 2-year-old at 3:30, 1,000 m.") == "a 2-year-old at 3:30 1,000 m"
    assert ptb_tokenize_fallback("...") == ""


# ---------------------------------------------------------------------------------------
# SPICE
# ---------------------------------------------------------------------------------------


def test_spice_unavailable_when_jars_absent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = (
        tmp_path / "stanford-corenlp-3.6.0.jar",
        tmp_path / "stanford-corenlp-3.6.0-models.jar",
    )
    monkeypatch.setattr(M, "SPICE_CORENLP_JARS", missing)
    ok, reason = spice_available()
    assert not ok
    assert "Stanford CoreNLP" in reason and str(missing[0]) in reason
    result = compute_metrics(REFERENCES, CANDIDATES, metrics=["BLEU-1", "SPICE"])
    assert list(result.scores) == ["BLEU-1"]
    reason = result.unavailable["SPICE"]
    assert "Stanford CoreNLP" in reason or "Java" in reason  # without Java, that reason wins


def test_spice_unavailable_in_this_environment() -> None:
    if all(p.is_file() for p in M.SPICE_CORENLP_JARS):
        pytest.skip("the CoreNLP jars for SPICE are installed here")
    ok, reason = spice_available()
    assert not ok and "not present" in reason
    result = compute_metrics(REFERENCES, CANDIDATES, metrics=["SPICE"], java=NO_JAVA)
    assert "SPICE" in result.unavailable


@needs_java
def test_spice_scores_are_mapped_in_sorted_id_order(monkeypatch: pytest.MonkeyPatch) -> None:
    import pycocoevalcap.spice.spice as spice_module

    class FakeSpice:  # the real one needs the CoreNLP jars and several GB of heap
        def compute_score(self, gts, res):
            ids = sorted(gts)
            return 0.5, [{"All": {"f": float(n)}} for n, _ in enumerate(ids)]

    monkeypatch.setattr(spice_module, "Spice", FakeSpice)
    monkeypatch.setattr(M, "spice_available", lambda java=None: (True, "pretend"))
    result = compute_metrics({"b": ["x"], "a": ["y"]}, {"b": "x", "a": "y"}, metrics=["SPICE"])
    assert result.scores == {"SPICE": 0.5}
    assert result.per_image == {"b": {"SPICE": 1.0}, "a": {"SPICE": 0.0}}


# ---------------------------------------------------------------------------------------
# Captions in other languages (issue 21): scored with the project's tokenizer
# ---------------------------------------------------------------------------------------

JA_REFERENCES = {
    "a": ["赤い円が青い四角の上にある。", "青い四角が赤い円の下にある"],
    "b": ["緑の三角が黄色い円の左にある", "黄色い円が緑の三角の右にある"],
    "c": ["青い円が赤い三角の上にある", "赤い三角が青い円の下にある"],
}


def test_japanese_captions_are_scored_per_character() -> None:
    """A model's Japanese caption (its tokens: characters joined by spaces) that is a reference is perfect;
    PTB tokenization made each reference one token, and such a caption scored 0."""
    candidates = {"a": "赤 い 円 が 青 い 四 角 の 上 に あ る", "b": "黄色い円が緑の三角の右にある", "c": "青 い 円 が 赤 い 三 角 の 上 に あ る"}
    result = compute_metrics(JA_REFERENCES, candidates, metrics=["BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE"])
    assert result.tokenizer == "captioner"
    assert result.scores["BLEU-4"] == pytest.approx(1.0) and result.scores["ROUGE-L"] == pytest.approx(1.0)
    assert result.scores["CIDEr-D"] > 1.0
    assert "English" in result.unavailable["METEOR"] and "English" in result.unavailable["SPICE"]
    wrong = compute_metrics(JA_REFERENCES, {k: "緑 の 四 角" for k in JA_REFERENCES}, metrics=["BLEU-1", "CIDEr-D"])
    assert wrong.scores["CIDEr-D"] < 0.5 * result.scores["CIDEr-D"]


def test_french_captions_are_scored_with_the_tokens_the_model_was_trained_on() -> None:
    refs = {"a": ["Un cercle rouge au-dessus d'un carré bleu.", "un carré bleu au-dessous d'un cercle rouge"],
            "b": ["Un triangle vert à gauche d'un cercle jaune", "un cercle jaune à droite d'un triangle vert"]}
    cands = {"a": "un cercle rouge au dessus d un carré bleu", "b": "un cercle jaune à droite d un triangle vert"}
    result = compute_metrics(refs, cands, metrics=["BLEU-4"], java=NO_JAVA)
    assert result.tokenizer == "captioner" and result.scores["BLEU-4"] == pytest.approx(1.0)


def test_english_captions_keep_the_ptb_tokenizer_and_the_choice_can_be_forced() -> None:
    assert compute_metrics(REFERENCES, CANDIDATES, metrics=["BLEU-1"], java=NO_JAVA).tokenizer == "ptb"
    forced = compute_metrics(JA_REFERENCES, {k: v[0] for k, v in JA_REFERENCES.items()}, metrics=["BLEU-1"],
                             tokenizer="ptb", java=NO_JAVA)
    assert forced.tokenizer == "ptb"
    words = compute_metrics(REFERENCES, CANDIDATES, metrics=["BLEU-1"], tokenizer="captioner", java=NO_JAVA)
    assert words.tokenizer == "captioner"
    with pytest.raises(ValueError, match="tokenizer must be one of 'auto', 'ptb', 'captioner'"):
        compute_metrics(REFERENCES, CANDIDATES, tokenizer="spacy")


def test_auto_tokenizer_tells_english_from_other_languages() -> None:
    from captioner.evaluation.tokenization import looks_english

    english = [f"A man riding a horse, number {i}." for i in range(60)] + ["a café on the corner", "The dog’s toy"]
    assert looks_english(english)
    assert not looks_english(["un cercle rouge au-dessus d'un carré bleu"] * 60)
    assert not looks_english(["ein grünes Quadrat über einem roten Kreis"] * 3)
    assert not looks_english([f"seorang pria mengendarai kuda {i}" for i in range(60)])  # Indonesian, in ASCII
    assert not looks_english(["赤い円"])
    assert looks_english(["x", "y"])  # too little to tell: the COCO way
