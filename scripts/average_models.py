"""Average the weights of several model directories into one ("model soup"): models fine-tuned from
the same starting point (e.g. stage 2 run with different seeds) average into one model.

    python scripts/average_models.py runs/soup-s1/best runs/soup-s2/best runs/soup-s3/best --out runs/soup

The first directory's config (decoding defaults, encoder, training record) is kept; the averaged
model has no metrics until `captioner evaluate` scores it.
"""

from __future__ import annotations

import argparse
import sys

from captioner.inference.modeldir import ModelDirError, average_model_dirs, save_model_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dirs", nargs="+")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    try:
        decoder, vocab, cfg = average_model_dirs(a.model_dirs)
        save_model_dir(a.out, decoder, vocab, cfg)
    except (ModelDirError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"averaged {len(a.model_dirs)} models into {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
