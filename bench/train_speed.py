"""Training throughput: `captioner train` against a plain tutorial-style loop of the same sizes.

Both train Show, Attend and Tell (`sat`, embed/hidden/attention 512, dropout 0.5, batch 64, Adam,
gradient clipping 5) on the cached Flickr8k features, in the same process, one after the other,
on the same threads, whose OpenMP wait policy is the one `captioner train` sets (`omp_wait_policy`
in the output); the script prints ONE JSON object.

(a) ours: ``captioner.training.loop.train`` itself (length-bucketed batches read from the feature store's
    memory map, the grid's attention projection computed once per caption, no padding work).
    Timed as the difference between a run of ``--steps`` + 10 steps and a run of 10 steps, so
    start-up (loading the corpus, building the model) is not counted.
(b) reference: the loop the tutorials write (system S5's): random batches, captions sorted inside
    the batch, an LSTMCell stepped over the running captions, the attention projection of the
    grid recomputed at every time step, packed targets for the loss.

Achieved GFLOP/s are counted from the layer sizes and the words each run actually predicted
(useful work only, forward x 3 for forward + backward; the reference's recomputed projections
are not counted as work), so the GFLOP/s ratio compares equal work even though the two runs'
batches differ in caption length. The machine's ceilings are 2048x2048 matrix multiplies in float32
and in bfloat16 on the same threads.

The two sides run in ``--rounds`` alternating rounds (ours, reference, ours, ...), so a change in the
machine's speed touches both; each round's figures are listed, and ``speedup_captions_per_s`` /
``speedup_gflop_per_s`` are the medians of the rounds' ratios. ``--bf16`` adds a third side, ours with
``precision: bf16`` (autocast), and its median ratio to the reference (``speedup_bf16_captions_per_s``).

    python bench/train_speed.py --corpus work/f8k/corpus.json --features work/f8k-lite0 [--steps 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from captioner.cli.training import set_wait_policy

set_wait_policy("train")  # before torch is imported: OpenMP's threads wait as under `captioner train`

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

from captioner.data.captions import CaptionData  # noqa: E402
from captioner.data.corpus import Corpus  # noqa: E402
from captioner.data.features import FeatureStore  # noqa: E402
from captioner.data.text import Vocab  # noqa: E402
from captioner.training.config import DataConfig, OptimConfig, TrainConfig  # noqa: E402
from captioner.training.loop import train  # noqa: E402

E = H = A = 512
BATCH = 64


def sat_gflop(captions: int, words: int, P: int, C: int, V: int) -> float:
    """Useful work of training on ``captions`` captions that predict ``words`` words (<end> included):
    forward multiply-adds x 2 (FLOPs) x 3 (forward + backward)."""
    per_image = P * C * A + 2 * C * H  # W_a over the grid; init_h, init_c
    per_step = H * A + P * A + P * C + H * C + 4 * H * (E + C + H) + H * V  # W_h, w, context, f_beta, LSTM, out
    return 3 * 2 * (captions * per_image + words * per_step) / 1e9


class RefAttention(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.encoder_att, self.decoder_att, self.full_att = nn.Linear(C, A), nn.Linear(H, A), nn.Linear(A, 1)

    def forward(self, enc, h):
        att = self.full_att(torch.tanh(self.encoder_att(enc) + self.decoder_att(h).unsqueeze(1))).squeeze(2)
        alpha = F.softmax(att, dim=1)
        return (enc * alpha.unsqueeze(2)).sum(dim=1), alpha


class RefDecoder(nn.Module):
    def __init__(self, C: int, V: int):
        super().__init__()
        self.attention = RefAttention(C)
        self.embedding = nn.Embedding(V, E)
        self.init_h, self.init_c, self.f_beta = nn.Linear(C, H), nn.Linear(C, H), nn.Linear(H, C)
        self.decode_step = nn.LSTMCell(E + C, H)
        self.dropout, self.fc = nn.Dropout(0.5), nn.Linear(H, V)

    def forward(self, enc, caps, caplens):
        caplens, order = caplens.sort(descending=True)
        enc, caps = enc[order], caps[order]
        emb = self.embedding(caps)
        mean = enc.mean(dim=1)
        h, c = self.init_h(mean), self.init_c(mean)
        decode_lengths = (caplens - 1).tolist()
        B, T = enc.shape[0], max(decode_lengths)
        preds = torch.zeros(B, T, self.fc.out_features)
        alphas = torch.zeros(B, T, enc.shape[1])
        for t in range(T):
            bs = sum(1 for n in decode_lengths if n > t)
            awe, alpha = self.attention(enc[:bs], h[:bs])
            awe = torch.sigmoid(self.f_beta(h[:bs])) * awe
            h, c = self.decode_step(torch.cat([emb[:bs, t], awe], dim=1), (h[:bs], c[:bs]))
            preds[:bs, t] = self.fc(self.dropout(h))
            alphas[:bs, t] = alpha
        return preds, caps, decode_lengths, alphas


def reference_loop(data, steps: int, V: int) -> tuple[float, int, int]:
    """Seconds, captions and predicted words of ``steps`` tutorial-style training steps."""
    torch.manual_seed(0)
    C = data.store.features.shape[2]
    model = RefDecoder(C, V)
    opt = torch.optim.Adam(model.parameters(), lr=4e-4)
    rng = np.random.default_rng(0)
    seen = words = 0
    t0 = time.perf_counter()
    for step in range(steps + 5):
        if step == 5:  # after a warm-up
            t0, seen, words = time.perf_counter(), 0, 0
        idx = torch.from_numpy(rng.choice(len(data), BATCH, replace=False))
        rows = data.rows[data.owner[idx].numpy()]
        enc = torch.from_numpy(np.asarray(data.store.features[np.sort(rows)], dtype=np.float32))
        enc = enc[torch.from_numpy(np.argsort(np.argsort(rows)))]  # back to the batch's order
        caps, caplens = data.tokens[idx], data.lengths[idx]
        preds, caps, dl, alphas = model(enc, caps, caplens)
        targets = pack_padded_sequence(caps[:, 1:], dl, batch_first=True).data
        scores = pack_padded_sequence(preds, dl, batch_first=True).data
        loss = F.cross_entropy(scores, targets) + ((1.0 - alphas.sum(dim=1)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        seen += BATCH
        words += sum(dl)
    return time.perf_counter() - t0, seen, words


def ours(corpus: str, features: str, steps: int, data, precision: str = "fp32") -> tuple[float, int, int]:
    """Seconds, captions and predicted words of ``steps`` steps of ``captioner.training.loop.train``."""
    def run(n: int) -> float:
        with tempfile.TemporaryDirectory() as d:
            cfg = TrainConfig(arch="sat", model={"embed_dim": E, "hidden_dim": H, "attention_dim": A, "dropout": 0.5},
                              data=DataConfig(corpus=corpus, features=features, max_len=30),
                              optim=OptimConfig(lr=4e-4, batch_size=BATCH, epochs=1, grad_clip=5.0),
                              out_dir=str(Path(d) / "run"), progress=False, seed=0, precision=precision)
            t0 = time.perf_counter()
            train(cfg, stop_after_steps=n)
            return time.perf_counter() - t0

    short, long = run(10), run(10 + steps)
    # the batches train() ran in those steps: epoch 1's order depends only on (seed, epoch)
    batches = data.batches(BATCH, np.random.default_rng([0, 1]))[10:10 + steps]
    captions = sum(len(b) for b in batches)
    words = sum(int((data.lengths[b] - 1).sum()) for b in batches)
    return long - short, captions, words


def matmul_gflops(seconds: float = 2.0, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 2048 ** 3 * n / (time.perf_counter() - t0) / 1e9


def figures(secs: float, caps: int, words: int, P: int, C: int, V: int) -> dict:
    gflop = sat_gflop(caps, words, P, C, V)
    return {"captions_per_s": round(caps / secs, 1), "words_per_caption": round(words / caps, 2),
            "gflop_per_caption": round(gflop / caps, 3), "gflop_per_s": round(gflop / secs, 1)}


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="work/f8k/corpus.json")
    ap.add_argument("--features", default="work/f8k-lite0")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the sides (odd: a median)")
    ap.add_argument("--bf16", action="store_true", help="also ours with precision: bf16 (bfloat16 autocast)")
    a = ap.parse_args()
    load = os.getloadavg()[0]
    vocab = Vocab.load(Path(a.corpus).with_name("vocab.json"))
    data = CaptionData(Corpus.load(a.corpus), vocab, FeatureStore.open(a.features), "train", 30)
    P, C = data.store.features.shape[1:]
    ceilings = {"matmul_2048_gflop_per_s": round(matmul_gflops(), 1),
                "matmul_2048_bf16_gflop_per_s": round(matmul_gflops(dtype=torch.bfloat16), 1)}
    sides = {"captioner_train": lambda: ours(a.corpus, a.features, a.steps, data),
             "reference_loop": lambda: reference_loop(data, a.steps, len(vocab))}
    if a.bf16:
        sides["captioner_train_bf16"] = lambda: ours(a.corpus, a.features, a.steps, data, "bf16")
    rounds = {name: [] for name in sides}
    for _ in range(a.rounds):
        for name, side in sides.items():
            rounds[name].append(figures(*side(), P, C, len(vocab)))
    res = {"bench": "train_speed", "arch": "sat", "steps": a.steps, "batch": BATCH, "rounds": a.rounds,
           "threads": torch.get_num_threads(), "load_average_before": round(load, 2),
           "load_average_after": round(os.getloadavg()[0], 2), "torch": torch.__version__,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (spin, then sleep)"), **ceilings}
    for name, rows in rounds.items():  # the median round of each side, and every round's captions/s
        res[name] = {**sorted(rows, key=lambda r: r["captions_per_s"])[len(rows) // 2],
                     "rounds_captions_per_s": [r["captions_per_s"] for r in rows]}
    ref = rounds["reference_loop"]
    # work-normalised: the two runs' batches differ in caption length
    for name, key in (("captioner_train", ""), ("captioner_train_bf16", "bf16_")):
        if name in rounds:
            res[f"speedup_{key}gflop_per_s"] = round(median([o["gflop_per_s"] / r["gflop_per_s"]
                                                            for o, r in zip(rounds[name], ref)]), 2)
            res[f"speedup_{key}captions_per_s"] = round(median([o["captions_per_s"] / r["captions_per_s"]
                                                               for o, r in zip(rounds[name], ref)]), 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
