"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE, computed the COCO way.

    result = compute_metrics(references, candidates)   # {image_id: [refs]}, {image_id: caption}
    result.scores        # {"BLEU-1": 0.71, ..., "CIDEr-D": 0.93}, in [0, 1] (CIDEr-D can exceed 1)
    result.as_percent()  # x100, rounded to 2 decimals, for tables
    result.unavailable   # {"SPICE": "needs Stanford CoreNLP jars (...) which are not present"}

Everything goes through pycocoevalcap exactly as the COCO caption evaluation does: both
references and candidates are tokenized by Stanford's PTBTokenizer (a Java program), the
punctuation tokens in ``PTBTokenizer.PUNCTUATIONS`` are dropped, and the tokenized captions
are scored by ``Bleu(4)``, ``Meteor``, ``Rouge`` and ``Cider`` (pycocoevalcap's ``Cider`` is
CIDEr-D: clipped n-gram counts plus a Gaussian length penalty, so it is reported as "CIDEr-D").
SPICE runs only if its Stanford CoreNLP jars have been downloaded (see :func:`spice_available`).

That is for English captions. PTBTokenizer is English-only: when the references do not look English
(other languages, other scripts), captions are tokenized with the project's own tokenizer, the one the
model was trained with (Japanese and Chinese per character; see
:mod:`captioner.evaluation.tokenization`), BLEU, ROUGE-L and CIDEr-D are computed on those tokens, and
METEOR and SPICE (English-only) are listed in :attr:`MetricsResult.unavailable`.

Without Java nothing crashes: a warning is logged once, captions are tokenized by
:func:`ptb_tokenize_fallback` (a pure-Python imitation of PTBTokenizer that gives the same
tokens for ordinary captions) and BLEU, ROUGE-L and CIDEr-D are computed; METEOR and SPICE
are listed in :attr:`MetricsResult.unavailable` with the reason.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _meteor_module
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models as _stanford_models

from captioner.evaluation.tokenization import (  # noqa: F401 (PTB_JAR, ptb_tokenize_fallback: re-exported)
    PTB_JAR,
    PTB_PUNCTUATIONS,
    TOKENIZERS,
    choose_tokenizer,
    ptb_tokenize_fallback,
    tokenize_captions,
)

logger = logging.getLogger(__name__)

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE")
BLEU_NAMES = METRIC_NAMES[:4]
JAVA_METRICS = ("METEOR", "SPICE")  # metrics whose scorer itself is a Java program
ENGLISH_ONLY = {  # metrics that need English captions, and why
    "METEOR": "METEOR is English-only here (its stems, synonyms and paraphrases are English, `-l en`)",
    "SPICE": "SPICE parses captions with an English parser",
}

NO_JAVA_WARNING = (
    "Java not found: METEOR (and the PTB tokenizer) need Java 8+; install a JRE. "
    "Computing BLEU, ROUGE-L, CIDEr-D with a pure-Python tokenizer instead."
)

# Where pycocoevalcap keeps its jars (it is a namespace package, so go through its modules).
METEOR_DIR = Path(_meteor_module.__file__).parent
SPICE_DIR = Path(_stanford_models.__file__).parent
SPICE_JAR = SPICE_DIR / "spice-1.0.jar"
SPICE_CORENLP_JARS = (
    SPICE_DIR / _stanford_models.SPICELIB / f"{_stanford_models.JAR}.jar",
    SPICE_DIR / _stanford_models.SPICELIB / f"{_stanford_models.JAR}-models.jar",
)

_warned: set[str] = set()


@dataclass
class MetricsResult:
    """Corpus-level scores, optional per-image scores, and the metrics that could not run."""

    scores: dict[str, float]  # metric name -> corpus score, in METRIC_NAMES order
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)  # id -> metric -> score
    unavailable: dict[str, str] = field(default_factory=dict)  # metric name -> reason
    tokenizer: str = "ptb"  # how captions were tokenized: "ptb" (COCO's, English) or "captioner" (any language)

    def as_percent(self) -> dict[str, float]:
        """Scores x100, rounded to 2 decimals (the way caption papers report them)."""
        return {name: round(100.0 * value, 2) for name, value in self.scores.items()}


# ----------------------------------------------------------------------------------------
# Java and SPICE availability
# ----------------------------------------------------------------------------------------


def _resolve_java(java: str | None) -> str | None:
    """Absolute path of the java executable (a name looked up on PATH, or a path), or None."""
    return shutil.which(java or "java")


def _java_major_version(version_text: str) -> int | None:
    """8 for 'java version "1.8.0_292"', 17 for 'openjdk version "17.0.2"'; None if unparsable."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_text)
    if match is None:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2) is not None:  # the pre-Java-9 "1.x" scheme
        major = int(match.group(2))
    return major


def java_available(java: str | None = None) -> tuple[bool, str]:
    """Whether ``java`` (default: "java" on PATH) runs and is Java 8+; returns (ok, reason)."""
    requested = java or "java"
    exe = _resolve_java(java)
    if exe is None:
        where = "" if ("/" in requested or "\\" in requested) else " on PATH"
        return False, f"Java executable {requested!r} not found{where}"
    try:
        proc = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`{exe} -version` failed: {exc}"
    output = (proc.stderr or proc.stdout or "").strip()
    first_line = output.splitlines()[0] if output else ""
    if proc.returncode != 0:
        return False, f"`{exe} -version` exited with status {proc.returncode}: {first_line}"
    major = _java_major_version(first_line)
    if major is not None and major < 8:
        return False, f"{exe} is Java {major}; Java 8+ is needed ({first_line})"
    return True, f"{exe}: {first_line or 'unknown version'}"


def spice_available(java: str | None = None) -> tuple[bool, str]:
    """Whether SPICE can run: its jar and Stanford CoreNLP 3.6.0 jars present, and Java works.

    pycocoevalcap downloads the CoreNLP jars on first use of ``Spice()``; we never do (the
    machine may be offline), so they must be fetched beforehand with
    ``python -m pycocoevalcap.spice.get_stanford_models``.
    """
    missing = [str(path) for path in (SPICE_JAR, *SPICE_CORENLP_JARS) if not path.is_file()]
    if missing:
        return False, (
            f"needs Stanford CoreNLP jars ({', '.join(missing)}) which are not present; "
            "fetch them with `python -m pycocoevalcap.spice.get_stanford_models` (needs internet)"
        )
    ok, reason = java_available(java)
    if not ok:
        return False, f"needs Java 8+: {reason}"
    return True, f"SPICE jars found in {SPICE_DIR}; {reason}"


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


# ----------------------------------------------------------------------------------------
# METEOR process handling
# ----------------------------------------------------------------------------------------


class _Meteor(_meteor_module.Meteor):
    """pycocoevalcap's Meteor, with a configurable java executable and a real ``close``.

    The parent's ``__del__`` takes ``self.lock``, which ``compute_score`` never releases if it
    raises (e.g. the JVM died): garbage collection would then hang. ``close`` does not lock,
    is idempotent, and kills and reaps the JVM.
    """

    def __init__(self, java_exe: str) -> None:  # replaces the parent's, which runs "java"
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        self.meteor_cmd = [java_exe, "-jar", "-Xmx2G", _meteor_module.METEOR_JAR,
                           "-", "-", "-stdio", "-l", "en", "-norm"]  # fmt: skip
        self.meteor_p: subprocess.Popen[bytes] | None = subprocess.Popen(
            self.meteor_cmd, cwd=METEOR_DIR,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
        )  # fmt: skip
        self.lock = threading.Lock()

    def stderr_tail(self, limit: int = 2000) -> str:
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace").strip()[-limit:]
        return ""

    def close(self) -> None:
        proc, self.meteor_p = self.meteor_p, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    if stream is not None:
                        stream.close()
        self._stderr.close()

    def __del__(self) -> None:
        if hasattr(self, "meteor_p"):
            self.close()


# ----------------------------------------------------------------------------------------
# compute_metrics
# ----------------------------------------------------------------------------------------


def _preview(ids: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def _check_inputs(references: Mapping[Any, Sequence[str]], candidates: Mapping[Any, str]) -> None:
    if not candidates and not references:
        raise ValueError("nothing to evaluate: references and candidates are both empty")
    no_refs = [i for i in candidates if i not in references]
    no_cand = [i for i in references if i not in candidates]
    if no_refs or no_cand:
        problems = []
        if no_refs:
            problems.append(f"{len(no_refs)} candidate id(s) without references: "
                            f"{_preview(no_refs)}")  # fmt: skip
        if no_cand:
            problems.append(f"{len(no_cand)} reference id(s) without a candidate: "
                            f"{_preview(no_cand)}")  # fmt: skip
        raise ValueError(
            "references and candidates must have the same image ids; " + "; ".join(problems)
        )
    for image_id, refs in references.items():
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references[{image_id!r}] must be a list of strings, got {refs!r}")
        if len(refs) == 0:
            raise ValueError(f"references[{image_id!r}] is empty: every image needs a reference")
    for image_id, caption in candidates.items():
        if not isinstance(caption, str):
            raise TypeError(f"candidates[{image_id!r}] must be a string, got {caption!r}")


def _select_metrics(metrics: Sequence[str] | None) -> list[str]:
    if metrics is None:
        return list(METRIC_NAMES)
    requested = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in requested if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
    return [m for m in METRIC_NAMES if m in requested]


def _java_for(java: str | None, wanted: Sequence[str], unavailable: dict[str, str]) -> str | None:
    """The java executable, or None (with a warning, and the Java metrics wanted marked unavailable)."""
    java_ok, java_reason = java_available(java)
    if java_ok:
        return _resolve_java(java)
    _warn_once(f"{NO_JAVA_WARNING} ({java_reason})")
    for name in JAVA_METRICS:
        if name in wanted:
            unavailable[name] = f"needs Java 8+, which is not available: {java_reason}"
    return None


def _english_only(wanted: Sequence[str], unavailable: dict[str, str]) -> None:
    """For captions that are not English: the English-only metrics wanted are marked unavailable; no Java."""
    for name, reason in ENGLISH_ONLY.items():
        if name in wanted:
            unavailable[name] = f"{reason}; not computed for captions that are not English (tokenizer 'captioner')"
    return None


def compute_metrics(
    references: Mapping[str, Sequence[str]],
    candidates: Mapping[str, str],
    *,
    metrics: Sequence[str] | None = None,
    java: str | None = None,
    tokenizer: str = "auto",
) -> MetricsResult:
    """Score ``candidates`` (one caption per image id) against ``references`` (several per id).

    ``metrics`` picks a subset of :data:`METRIC_NAMES` (default: all). ``java`` is the java
    executable, a name on PATH or a path (default "java"); if it cannot run, BLEU, ROUGE-L and
    CIDEr-D use the pure-Python tokenizer and METEOR/SPICE go to ``unavailable``. A Java
    scorer that fails at run time is also reported in ``unavailable`` (and logged).
    Note that CIDEr-D's idf comes from the references being scored: on a single image it
    is always 0. ``tokenizer`` is how captions are tokenized (:mod:`~captioner.evaluation.tokenization`):
    "ptb" (COCO's, English), "captioner" (the project's, any language; METEOR and SPICE are then
    unavailable) or "auto" (default: "ptb" if the references look English, else "captioner").
    """
    wanted = _select_metrics(metrics)
    _check_inputs(references, candidates)
    chosen = choose_tokenizer(tokenizer, references)
    ids = list(candidates)
    raw_refs = {i: list(references[i]) for i in ids}
    raw_cands = {i: [candidates[i]] for i in ids}

    scores: dict[str, float] = {}
    per_image: dict[Any, dict[str, float]] = {i: {} for i in ids}
    unavailable: dict[str, str] = {}

    java_exe = _java_for(java, wanted, unavailable) if chosen == "ptb" else _english_only(wanted, unavailable)

    meteor: _Meteor | None = None
    try:
        if java_exe is not None and "METEOR" in wanted:
            meteor = _Meteor(java_exe)  # its JVM loads the paraphrase table meanwhile
        gts, res = (tokenize_captions(c, chosen, java_exe) for c in (raw_refs, raw_cands))

        def record(
            name: str, corpus: float, image_scores: Sequence[float], order: Sequence[Any]
        ) -> None:
            scores[name] = float(corpus)
            for image_id, value in zip(order, image_scores):
                per_image[image_id][name] = float(value)

        with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints as it goes
            if any(name in wanted for name in BLEU_NAMES):
                bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
                for n, name in enumerate(BLEU_NAMES):
                    if name in wanted:
                        record(name, bleu[n], bleu_per_image[n], list(gts))
            if meteor is not None:
                try:
                    score, image_scores = meteor.compute_score(gts, res)
                    record("METEOR", score, image_scores, list(gts))
                except Exception as exc:  # a dead or confused JVM: report, don't lose the rest
                    unavailable["METEOR"] = f"METEOR failed: {exc!r}; {meteor.stderr_tail()}"
                    logger.warning("METEOR failed: %s", unavailable["METEOR"])
            if "ROUGE-L" in wanted:
                score, image_scores = Rouge().compute_score(gts, res)
                record("ROUGE-L", score, image_scores, list(gts))
            if "CIDEr-D" in wanted:
                if any(ref for refs in gts.values() for ref in refs):
                    score, image_scores = Cider().compute_score(gts, res)
                    record("CIDEr-D", score, image_scores, list(gts))
                else:  # pycocoevalcap's Cider would crash on max() of no document frequencies
                    unavailable["CIDEr-D"] = "every reference is empty after tokenization"
            if "SPICE" in wanted and java_exe is not None:
                _run_spice(gts, res, java_exe, record, unavailable)
    finally:
        if meteor is not None:
            meteor.close()

    ordered = {name: scores[name] for name in METRIC_NAMES if name in scores}
    return MetricsResult(scores=ordered, per_image=per_image, unavailable=unavailable, tokenizer=chosen)


_Recorder = Callable[[str, float, Sequence[float], Sequence[Any]], None]


def _run_spice(gts: dict[Any, list[str]], res: dict[Any, list[str]], java_exe: str,
               record: _Recorder, unavailable: dict[str, str]) -> None:  # fmt: skip
    """SPICE via pycocoevalcap, which runs "java" from PATH (hard-coded), if it can run."""
    ok, reason = spice_available(java_exe)
    path_java = _resolve_java(None)
    if ok and (path_java is None or Path(path_java).resolve() != Path(java_exe).resolve()):
        ok, reason = False, f"pycocoevalcap's SPICE always runs `java` from PATH, not {java_exe}"
    if not ok:
        unavailable["SPICE"] = reason
        return
    from pycocoevalcap.spice.spice import Spice

    try:
        score, image_scores = Spice().compute_score(gts, res)
    except Exception as exc:
        unavailable["SPICE"] = f"SPICE failed: {exc!r}"
        logger.warning("SPICE failed: %s", unavailable["SPICE"])
        return
    # Spice returns per-image scores in sorted id order (not gts order, unlike the others).
    record("SPICE", score, [s["All"]["f"] for s in image_scores], sorted(gts))
