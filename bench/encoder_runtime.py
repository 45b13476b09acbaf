"""The image encoder per runtime (issue 20): the bare network, the image pipeline, and whole commands.

    .venv/bin/python bench/encoder_runtime.py ../shared/datasets/flickr8k/Flicker8k_Dataset \\
        --corpus work/f8k-eval/corpus.json --split test --n 1000 [--runtimes torch,onnx,onnx-int8 --calibration DIR]

Prints one JSON object (bench/README.md, "encoder_runtime.py"):

- ``bare``: images/s of the encoder alone per runtime, EfficientNet-Lite0 at 224 px, batch 8, on real photos
  already resized; the median of ``--rounds`` alternating rounds of ``--seconds`` each;
- ``decode``: images/s of JPEG decoding + resizing to 224 px in one thread;
- ``startup``: ``captioner features`` on 8 images per runtime (start-up: imports, building the encoder);
- ``end_to_end``: ``captioner features`` and ``captioner caption --beam 3 --json`` as whole processes (start-up
  included) on the N photos, each runtime in the same run, in turn, ``--repeats`` rounds (the median run's figures,
  every run's seconds beside them); images/s = N / wall seconds; ``--hints-off-too``: also each inference-runtime
  command with ``CAPTIONER_HINTS=0`` (no head start for ``caption``, ``features`` through torch: encoders/head_start.py,
  encoders/quick_features.py);
- ``captions_vs_torch``: per runtime, how many captions differ from torch's and their scores (``--fp32-decoder-too``:
  also ``caption --precision fp32`` per runtime, compared with torch's in fp32);
- CPU milliseconds per image beside each rate (user + system, all threads and worker processes): what a
  busy machine changes least; on C idle cores a command cannot beat 1000 * C / cpu_ms_per_image images/s;
- the load average before and after each measure (the machine is shared: figures under load are not idle ones).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from captioner.data.images import list_images, load_image
from captioner.encoders.network import ImageEncoder, image_to_array
from captioner.encoders.runtime import with_runtime
from captioner.runtime.devices import split_precision

CAPTIONER = str(Path(sys.executable).with_name("captioner"))


def load() -> float:
    return round(os.getloadavg()[0], 2)


def pick_images(folder: Path, corpus: str | None, split: str | None, n: int) -> list[Path]:
    if corpus:
        items = json.loads(Path(corpus).read_text())["items"]
        names = sorted(it["image"] for it in items if split is None or it["split"] == split)
        files = [folder / name for name in names]
    else:
        files = sorted(list_images(folder))
    return files[:n]


def bare(encoders: dict, arrays: np.ndarray, seconds: float, rounds: int) -> dict:
    batch = arrays[:8]
    rates: dict[str, list[float]] = {name: [] for name in encoders}
    cpu: dict[str, list[float]] = {name: [] for name in encoders}
    for enc in encoders.values():
        enc.encode_arrays(batch)  # warm-up
    for _ in range(rounds):
        for name, enc in encoders.items():
            done, t0, c0 = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - t0 < seconds:
                enc.encode_arrays(batch)
                done += len(batch)
            rates[name].append(done / (time.perf_counter() - t0))
            cpu[name].append(1000 * (time.process_time() - c0) / done)  # all the process's threads
    return {name: {"images_per_s": round(statistics.median(r), 1), "rounds": [round(x, 1) for x in r],
                   "cpu_ms_per_image": round(statistics.median(cpu[name]), 2)} for name, r in rates.items()}


def decode_rate(files: list[Path], spec) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    for f in files:
        image_to_array(load_image(f), spec)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images": len(files), "images_per_s_one_process": round(len(files) / secs, 1),
            "cpu_ms_per_image": round(1000 * cpu / len(files), 2)}


def startup(folder: Path, runtimes: list[str], work: Path) -> dict:
    """`captioner features` on one batch of 8 images per runtime: mostly start-up (imports, building the encoder)."""
    few = work / "few"
    few.mkdir()
    for f in sorted(folder.iterdir())[:8]:
        (few / f.name).symlink_to(f.resolve())
    figures = {}
    for rt in runtimes:
        cmd = [CAPTIONER, "features", "--images", str(few), "--out", str(work / f"few-{rt}"), "--quiet",
               "--runtime", rt]
        before = load()
        figures[f"features --runtime {rt} (8 images)"] = figures_of(8, *run_command(cmd, None), before)
    return figures


def run_command(cmd: list[str], out_file: Path | None, env: dict | None = None) -> tuple[float, int, float]:
    """(wall seconds, exit status, CPU seconds of the command and its worker processes: user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(out_file or os.devnull, "w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True, env=env)
    rc = done.returncode
    if rc != 0:
        print(f"exit status {rc}: {' '.join(cmd)}\n{done.stderr[-1500:]}", file=sys.stderr)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - t0, rc, cpu


def figures_of(n: int, secs: float, rc: int, cpu: float, before: float) -> dict:
    """A command's figures: wall and CPU time (the CPU time is what a busy machine changes least; on C idle
    cores a command cannot beat n / (cpu / C) images/s)."""
    return {"seconds": round(secs, 2), "images_per_s": round(n / secs, 1), "exit_status": rc,
            "cpu_seconds": round(cpu, 2), "cpu_ms_per_image": round(1000 * cpu / n, 2),
            "load_before": before, "load_after": load()}


def end_to_end(folder: Path, n: int, runtimes: list[str], calibration: str | None, work: Path,
               workers: int | None, fp32_too: bool = False, repeats: int = 1,
               hints_off_too: bool = False) -> tuple[dict, dict]:
    """Each command as a whole process, ``repeats`` rounds (the commands in turn within a round); a command's figures
    are those of its median run by wall time, with every run's seconds beside them."""
    runs: dict[str, list[dict]] = {}
    outputs: dict[str, Path] = {}
    extra = ["--workers", str(workers)] if workers is not None else []
    commands = []  # (name, command line, captions file or None, environment)
    for command in ("features", "caption"):
        for rt in runtimes:
            flags = ["--runtime", rt] + (["--calibration", calibration] if rt == "onnx-int8" and calibration else [])
            if command == "features":
                cmd = [CAPTIONER, "features", "--images", str(folder), "--out", str(work / f"store-{rt}"),
                       "--overwrite", "--quiet", *flags, *extra]
                out = None
            else:
                cmd = [CAPTIONER, "caption", str(folder), "--beam", "3", "--json", "--quiet", *flags, *extra]
                out = outputs[rt] = work / f"captions-{rt}.jsonl"
            commands.append((f"{command} --runtime {rt}", cmd, out, None))
            if hints_off_too and rt != "torch":  # the same without the last run's hint
                commands.append((f"{command} --runtime {rt} (CAPTIONER_HINTS=0)", cmd, None,
                                 {**os.environ, "CAPTIONER_HINTS": "0"}))
    if fp32_too:  # the decoder in float32 too (the default is --precision auto: bfloat16 where the CPU has it)
        for rt in runtimes:
            cmd = [CAPTIONER, "caption", str(folder), "--beam", "3", "--json", "--quiet", "--runtime", rt,
                   "--precision", "fp32", *extra]
            out = outputs[f"{rt} --precision fp32"] = work / f"captions-{rt}-fp32.jsonl"
            commands.append((f"caption --runtime {rt} --precision fp32", cmd, out, None))
    for _ in range(repeats):
        for name, cmd, out, env in commands:
            before = load()
            runs.setdefault(name, []).append(figures_of(n, *run_command(cmd, out, env), before))
    figures = {}
    for name, got in runs.items():
        ranked = sorted(got, key=lambda f: f["seconds"])
        figures[name] = {**ranked[(len(ranked) - 1) // 2], "runs_seconds": [f["seconds"] for f in got]}
    return figures, outputs


def compare_captions(outputs: dict[str, Path]) -> dict:
    def read(path: Path) -> dict:
        return {d["image"]: d for d in map(json.loads, path.read_text().splitlines()) if d.get("caption")}

    report = {}
    for rt, path in outputs.items():
        base = "torch --precision fp32" if rt.endswith("--precision fp32") else "torch"
        if rt == base or base not in outputs:
            continue
        ref = read(outputs[base])
        got = read(path)
        differ = [{"image": Path(k).name, base: [ref[k]["caption"], ref[k]["score"]],
                   rt: [got[k]["caption"], got[k]["score"]]}
                  for k in ref if k in got and got[k]["caption"] != ref[k]["caption"]]
        gaps = [abs(d[base][1] - d[rt][1]) for d in differ]
        report[rt] = {"against": base, "images": len(ref), "differ": len(differ), "max_score_gap": max(gaps, default=0.0),
                      "examples": differ[:10]}
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", help="folder of photos")
    p.add_argument("--corpus", help="corpus.json: take the images of --split from it (sorted names)")
    p.add_argument("--split", default=None)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--runtimes", default="torch,onnx")
    p.add_argument("--calibration", default=None, help="image folder for onnx-int8 (the first time)")
    p.add_argument("--seconds", type=float, default=3.0, help="per runtime per round of the bare encoder")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="--workers of the commands (default theirs)")
    p.add_argument("--no-e2e", action="store_true", help="the bare encoder and decoding only")
    p.add_argument("--fp32-decoder-too", action="store_true",
                   help="also `caption --precision fp32` per runtime (the default, auto, decodes in bfloat16 where "
                        "the CPU has bfloat16 instructions); its captions are compared with torch's fp32 ones")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of the whole commands, in turn; each figure is its median run's (default 1)")
    p.add_argument("--hints-off-too", action="store_true",
                   help="also each inference-runtime command with CAPTIONER_HINTS=0")
    a = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the commands set it
    runtimes = a.runtimes.split(",")
    files = pick_images(Path(a.images), a.corpus, a.split, a.n)
    result: dict = {"n": len(files), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_start": load(),
                    "decoder_precision_of_auto": split_precision("auto", torch.device("cpu"))[1]}
    try:
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    base = ImageEncoder("efficientnet-lite0")
    encoders = {rt: with_runtime(base, rt, calibration=a.calibration if rt == "onnx-int8" else None)
                for rt in runtimes}
    arrays = np.stack([image_to_array(load_image(f), base.spec) for f in files[:8]])
    result["bare"] = bare(encoders, arrays, a.seconds, a.rounds)
    result["decode"] = decode_rate(files[:200], base.spec)
    result["load_after_bare"] = load()
    if not a.no_e2e:
        with tempfile.TemporaryDirectory(prefix="encoder-runtime-") as tmp:
            work = Path(tmp)
            folder = work / "images"
            folder.mkdir()
            for f in files:
                (folder / f.name).symlink_to(f.resolve())
            result["startup"] = startup(folder, [rt for rt in runtimes if rt != "onnx-int8"], work)
            result["end_to_end"], outputs = end_to_end(folder, len(files), runtimes, a.calibration, work, a.workers,
                                                       a.fp32_decoder_too, a.repeats, a.hints_off_too)
            result["captions_vs_torch"] = compare_captions(outputs)
    result["load_end"] = load()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
