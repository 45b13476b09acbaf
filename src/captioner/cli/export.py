"""`captioner export MODEL OUT --format onnx`: a model as ONNX graphs plus a script that captions with ONNX Runtime,
numpy and Pillow only (:mod:`captioner.export`, docs/export.md)."""

from __future__ import annotations

import argparse

from captioner.cli.args import print_json


def add_parser(sub) -> None:
    s = sub.add_parser("export", help="export a model for ONNX Runtime (captions without torch)")
    s.add_argument("model", help="model directory or bundled model name")
    s.add_argument("out", help="the folder to write (must not exist yet)")
    s.add_argument("--format", default="onnx", help="export format: onnx (the only one)")
    s.add_argument("--json", action="store_true", help="print the manifest as one JSON object")
    s.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from captioner.export import export_model  # torch: not for `captioner --help`

    manifest = export_model(a.model, a.out, a.format)
    if a.json:
        print_json(manifest)
        return 0
    check = manifest.get("check")
    files = sorted([*manifest["files"], "manifest.json"])
    print(f"exported {a.model} ({manifest['arch']}) to {a.out}: {', '.join(files)}")
    if check:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in check["max_abs_diff"].items() if v is not None)
        print(f"checked in ONNX Runtime against torch: largest differences {diffs}")
    else:
        print("not checked: onnxruntime is not installed")
    print(f"caption without torch: python {a.out}/caption_onnx.py photo.jpg  (needs onnxruntime, numpy, pillow)")
    return 0
