"""The decoder alone in float32 and in bfloat16 (issue 20): the bundled model's beam search on stored grids.

    .venv/bin/python bench/decoder_precision.py [--features work/f8k-lite0] [--n 192] [--batch 48] [--threads 2]

Decodes the first N grids of a feature store (Lite0 224 px, as `captioner features` makes) with the bundled model:
beam 3, length penalty 1.4, no repeated bigram, max 20 words, concepts off (the search alone), in batches, under
``--precision`` fp32 and bf16 (what `caption --precision auto` gives on a CPU with bfloat16 instructions), in
``--rounds`` alternating rounds. Prints one JSON object: per precision each round's images/s and CPU ms per image
(``process_time``: what a busy machine changes least), and how many of bf16's captions differ from fp32's.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from captioner.data.features import FeatureStore
from captioner.decoding.search import decode
from captioner.decoding.settings import banned_ids
from captioner.inference.captioner import Captioner
from captioner.runtime.devices import autocast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", default="work/f8k-lite0")
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = Captioner.from_pretrained(runtime="torch")
    feats = torch.from_numpy(np.array(FeatureStore.open(a.features).features[:a.n])).float()
    kw = dict(start_id=model.vocab.start_id, end_id=model.vocab.end_id, beam_size=3, max_len=20,
              length_penalty=1.4, no_repeat_ngram=2, banned=banned_ids(model.vocab))
    res: dict = {"bench": "decoder_precision", "images": len(feats), "batch": a.batch, "threads": a.threads,
                 "load_average_before": round(os.getloadavg()[0], 2)}
    words: dict[str, list] = {}
    for precision in ("fp32", "bf16"):  # a warm-up: each precision's cached weights made before the timing
        with autocast(torch.device("cpu"), precision):
            decode(model.decoder, feats[:2], **kw)
    for _ in range(a.rounds):
        for precision in ("fp32", "bf16"):
            t0, c0 = time.perf_counter(), time.process_time()
            with autocast(torch.device("cpu"), precision):
                out = [h[0].tokens for i in range(0, len(feats), a.batch)
                       for h in decode(model.decoder, feats[i:i + a.batch], **kw)]
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            res.setdefault(precision, []).append({"images_per_s": round(len(feats) / wall, 1),
                                                  "cpu_ms_per_image": round(cpu / len(feats) * 1e3, 2)})
            words[precision] = out
    res["bf16_captions_differing"] = sum(a != b for a, b in zip(words["fp32"], words["bf16"]))
    res["load_average_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
