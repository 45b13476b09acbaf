"""Caption quality of the int8 encoder (--runtime onnx-int8) against fp32, for issue 20's decision.

    .venv/bin/python scripts/int8_quality.py --out work/int8-quality \\
        --data f8k-val=work/f8k-eval/corpus.json:val --data coco-dev=work/coco-dev/corpus.json:test \\
        --calibration-corpus work/f8k-eval/corpus.json --calibration-split train

For each ``--data NAME=CORPUS:SPLIT``: feature stores of that split with the fp32 runtime (``--reference``,
default onnx: equal to torch within 1e-3) and with onnx-int8, then ``captioner evaluate`` of the model on both
(beam 3 by default), and the CIDEr-D difference. The int8 encoder is calibrated once on ``--calibration DIR``,
or on ``--calibration-n`` images of ``--calibration-split`` of ``--calibration-corpus`` (spread evenly over
its sorted names, linked into OUT/calibration). Prints one JSON object; int8 may become the default only if it
loses at most 0.5 CIDEr-D on Flickr8k val and on coco-dev (issue 20). The Flickr8k test split is refused
unless ``--allow-test`` (it is scored once, for the record, after the decision).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CAPTIONER = str(Path(sys.executable).with_name("captioner"))
BOUND = 0.5  # CIDEr-D points int8 may lose (issue 20)


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def calibration_folder(a: argparse.Namespace, out: Path) -> str:
    if a.calibration:
        return a.calibration
    if not a.calibration_corpus:
        sys.exit("give --calibration DIR or --calibration-corpus CORPUS (with --calibration-split)")
    corpus = json.loads(Path(a.calibration_corpus).read_text())
    names = sorted(it["image"] for it in corpus["items"] if it["split"] == a.calibration_split)
    step = max(1, len(names) // a.calibration_n)
    folder = out / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    root = Path(corpus["image_root"])
    for name in names[::step][:a.calibration_n]:
        link = folder / Path(name).name
        if not link.exists():
            link.symlink_to((root / name).resolve())
    return str(folder)


def cider(metrics_dir: Path, beam: int) -> float:
    """CIDEr-D in points (x100: the scale of the 0.5 bound) from ``captioner evaluate``'s metrics.json."""
    m = json.loads((metrics_dir / "metrics.json").read_text())
    return 100 * float(m["beams"][str(beam)]["CIDEr-D"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="working folder (stores, evaluations)")
    p.add_argument("--data", action="append", required=True, metavar="NAME=CORPUS:SPLIT")
    p.add_argument("--model", default="flickr8k-sat")
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--reference", default="onnx", choices=["onnx", "torch"], help="the fp32 runtime")
    p.add_argument("--calibration", default=None, help="a folder of calibration images")
    p.add_argument("--calibration-corpus", default=None)
    p.add_argument("--calibration-split", default="train")
    p.add_argument("--calibration-n", type=int, default=300)
    p.add_argument("--allow-test", action="store_true", help="allow Flickr8k's test split (scored once)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    calib = calibration_folder(a, out)
    result: dict = {"model": a.model, "beam": a.beam, "reference": a.reference, "calibration": calib,
                    "load_start": round(os.getloadavg()[0], 2), "data": {}}
    for spec in a.data:
        name, _, rest = spec.partition("=")
        corpus, _, split = rest.rpartition(":")
        if split == "test" and "flickr8k" in json.loads(Path(corpus).read_text()).get("name", "") \
                and not a.allow_test:
            sys.exit(f"{spec}: Flickr8k's test split is scored once, after the decision; use val (or --allow-test)")
        row = {}
        for rt in (a.reference, "onnx-int8"):
            store = out / f"{name}-{rt}"
            flags = ["--calibration", calib] if rt == "onnx-int8" else []
            secs = run([CAPTIONER, "features", "--corpus", corpus, "--splits", split, "--out", str(store),
                        "--runtime", rt, "--quiet", *flags])
            ev = out / f"eval-{name}-{rt}"
            run([CAPTIONER, "evaluate", "--model", a.model, "--corpus", corpus, "--features", str(store),
                 "--split", split, "--beam", str(a.beam), "--out", str(ev)])
            row[rt] = {"cider_d": round(cider(ev, a.beam), 2), "features_seconds": round(secs, 1)}
        loss = row[a.reference]["cider_d"] - row["onnx-int8"]["cider_d"]
        row["int8_loss"] = round(loss, 2)
        row["within_bound"] = loss <= BOUND
        result["data"][name] = row
        print(json.dumps({name: row}), file=sys.stderr, flush=True)
    result["int8_may_be_default"] = all(r["within_bound"] for r in result["data"].values())
    result["load_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
