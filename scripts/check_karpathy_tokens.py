"""Dataset-scale check: the tokenizer reproduces the token lists of a Karpathy split file.

    python scripts/check_karpathy_tokens.py [../shared/datasets/flickr8k/dataset_flickr8k.json ...]

For every sentence of each file, compares ``captioner.data.text.tokenize(raw)`` with the file's own
``tokens`` and prints one JSON object per file: sentences, how many agree, and the first disagreements.
Exit status 1 if any sentence disagrees. (Flickr8k: 40000 of 40000 agree.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from captioner.data.text import tokenize

DEFAULT = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "flickr8k" / "dataset_flickr8k.json"


def check(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    sentences = [s for image in data["images"] for s in image["sentences"]]
    wrong = [{"raw": s["raw"], "file": s["tokens"], "ours": tokenize(s["raw"])} for s in sentences
             if tokenize(s["raw"]) != s["tokens"]]
    return {"file": str(path), "sentences": len(sentences), "agree": len(sentences) - len(wrong),
            "first_disagreements": wrong[:10]}


def main() -> int:
    results = [check(Path(p)) for p in (sys.argv[1:] or [DEFAULT])]
    for result in results:
        print(json.dumps(result, ensure_ascii=False, indent=1))
    return 0 if all(r["agree"] == r["sentences"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
