"""What captioning an image gives back: :class:`CaptionResult`, and its one JSON rendering.

Python (``CaptionResult.to_dict()``), ``captioner caption --json`` and the REST API all render a result
with :meth:`CaptionResult.to_dict`; they differ only in the name of the image's key ("source",
"image", "filename") and in how much detail they ask for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from captioner.checks import json_safe


@dataclass
class Caption:
    caption: str
    score: float  # the model's log-probability of the caption (normalised by the length penalty, if any)


@dataclass
class CaptionResult:
    """One image's captions, or why it has none (``error``)."""

    source: str  # the path, or "image K" for bytes and PIL images
    caption: str | None = None
    score: float | None = None
    n_best: list[Caption] = field(default_factory=list)  # beam search: best first, distinct
    samples: list[Caption] | None = None  # sampling: the captions drawn
    words: list[str] = field(default_factory=list)
    attention: list[list[float]] | None = None  # per word, its weights over the grid (row-major)
    grid: tuple[int, int] | None = None
    image_size: tuple[int, int] | None = None  # (width, height) as decoded
    error: str | None = None
    attention_figure: str | None = None  # where the CLI wrote this image's figure
    # what the encoder's ImageNet classifier sees, as caption words: [(word, confidence)], most confident first
    # (None: the model's encoder has no classifier)
    concepts: list[tuple[str, float]] | None = None
    image: Any = field(default=None, repr=False, compare=False)  # the decoded PIL image, with keep_images

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self, key: str = "source", name: str | None = None, *, detail: bool = True, n_best: bool = True,
                attention: bool | None = None, attention_digits: int | None = None) -> dict:
        """This result as JSON (no NaN: a non-finite number becomes null).

        ``key``/``name``: the image's key and name (default ``"source"``/:attr:`source`; an error message
        names the image by ``name`` too). ``detail``: also the words, the grid and the image size.
        ``n_best``: the n-best list. ``attention``: the words' attention (None: when there is some;
        True: always, null when there is none), rounded to ``attention_digits``. The samples and the
        attention figure come whenever the result has them."""
        if self.error is not None:
            if name is None:
                return {key: self.source, "error": self.error}
            prefix = f"{self.source}: "
            return {key: name, "error": f"{name}: {self.error.removeprefix(prefix)}"}
        name = self.source if name is None else name
        d: dict[str, Any] = {key: name, "caption": self.caption, "score": self.score}
        if n_best:
            d["n_best"] = [dataclasses.asdict(c) for c in self.n_best]
        if detail:
            d.update(words=self.words, grid=list(self.grid) if self.grid else None,
                     image_size=list(self.image_size) if self.image_size else None)
        if self.concepts is not None:
            d["concepts"] = [{"word": w, "confidence": c} for w, c in self.concepts]
        if self.samples is not None:
            d["samples"] = [dataclasses.asdict(c) for c in self.samples]
        if attention or (attention is None and self.attention is not None):
            d["attention"] = (None if self.attention is None else self.attention if attention_digits is None
                              else [[round(x, attention_digits) for x in row] for row in self.attention])
        if self.attention_figure is not None:
            d["attention_figure"] = self.attention_figure
        return json_safe(d)
