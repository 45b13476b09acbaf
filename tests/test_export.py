"""`captioner export MODEL OUT --format onnx`: every architecture, trained on the synthetic shapes, is
exported; the exported graphs run in ONNX Runtime through the standalone script's own functions (imported from
OUT) and give exactly the toolkit's captions, greedy and beam 3 (with and without a length penalty and n-gram
blocking), and features within a stated tolerance of torch's."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx  # noqa: F401  (the 'fast' extra, which `make test` installs: the export needs both)
import onnxruntime
import pytest
import torch

from captioner.cli.main import main
from captioner.data.corpus import Corpus
from captioner.data.images import load_image
from captioner.data.text import join_tokens
from captioner.encoders.concepts import concept_head
from captioner.encoders.network import ImageEncoder, get_encoder_spec, image_to_array
from captioner.encoders.tail import tail_state
from captioner.export.graphs import export_encoder
from captioner.inference.captioner import Captioner
from captioner.models import available_architectures

FEATURE_TOLERANCE = 1e-4  # ONNX Runtime's encoder against torch's, absolute (features reach about 6)
CONCEPT_TOLERANCE = 1e-5  # the concept confidences (probabilities)
TUNED_FEATURE_TOLERANCE = 1e-3  # a tuned encoder with randomly moved weights: larger features (as the runtime's bound)
N_IMAGES = 24
SEARCHES = [dict(beam_size=1), dict(beam_size=3),
            dict(beam_size=3, n_best=3, length_penalty=1.4, no_repeat_ngram=2)]
ALLOWED_IMPORTS = {"argparse", "json", "re", "sys", "pathlib", "numpy", "PIL", "onnxruntime", "__future__"}


@pytest.fixture(scope="module")
def exported(trained_arch, tmp_path_factory):
    """``exported(arch)`` -> (model directory, export folder): the session's trained model of ``arch``
    (tests/conftest.py), exported through the CLI once for this module."""
    done: dict[str, tuple[Path, Path]] = {}

    def make(arch: str) -> tuple[Path, Path]:
        if arch not in done:
            best = trained_arch(arch)[0] / "best"
            out = tmp_path_factory.mktemp(f"export-{arch}") / "onnx"
            with contextlib.redirect_stdout(io.StringIO()):
                assert main(["export", str(best), str(out), "--format", "onnx"]) == 0
            done[arch] = (best, out)
        return done[arch]

    return make


@pytest.fixture(scope="module")
def test_images(synthetic) -> list[str]:
    root = synthetic.root / "shapes" / "images"
    return [str(root / it.image) for it in Corpus.load(synthetic.corpus).split("test")[:N_IMAGES]]


def _script(out: Path, arch: str):
    spec = importlib.util.spec_from_file_location(f"caption_onnx_{arch.replace('-', '_')}", out / "caption_onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", available_architectures())
def test_exported_model_captions_as_the_toolkit(arch, exported, test_images):
    model_dir, out = exported(arch)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arch"] == arch and manifest["opset"] >= 17
    for name in ("encoder.onnx", "decoder_encode.onnx", "decoder_step.onnx", "vocab.json", "decoding.json",
                 "concepts.json", "caption_onnx.py"):
        assert (out / name).is_file(), name
    assert manifest["check"]["max_abs_diff"]["log_probs"] < 1e-3
    _assert_captions_as_the_toolkit(model_dir, out, test_images, arch)


def test_exported_ensemble_captions_as_the_toolkit(exported, test_images, tmp_path):
    """An ensemble directory (`captioner ensemble`) exports as one decoder: its members' graphs in one step."""
    members = [exported(arch)[0] for arch in ("sat", "transformer")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["ensemble", *map(str, members), "--out", str(tmp_path / "ens")]) == 0
        assert main(["export", str(tmp_path / "ens"), str(tmp_path / "onnx")]) == 0
    _assert_captions_as_the_toolkit(tmp_path / "ens", tmp_path / "onnx", test_images, "ensemble")


def _assert_captions_as_the_toolkit(model_dir: Path, out: Path, test_images: list[str], label: str) -> None:
    script = _script(out, label)
    onnx_model = script.ExportedModel(out)
    # torch's features, and the decoder in float32 as the exported graphs compute
    toolkit = Captioner.from_pretrained(model_dir, runtime="torch", precision="fp32")
    spec = toolkit.encoder.spec
    # the script resizes exactly as the toolkit does, and its encoder computes torch's features
    arrays = np.stack([onnx_model.to_array(script.load_image(p)) for p in test_images])
    assert np.array_equal(arrays, np.stack([image_to_array(load_image(p), spec) for p in test_images]))
    feats, conf = onnx_model.encode_images(arrays)
    want = toolkit.encoder.encode_arrays(arrays).numpy()
    assert feats.shape == want.shape
    assert np.abs(feats - want).max() < FEATURE_TOLERANCE
    want_conf = toolkit.guide.confidences(torch.from_numpy(want))
    assert np.abs(conf - want_conf.numpy()).max() < CONCEPT_TOLERANCE
    assert [[w for w, _ in c] for c in onnx_model.concepts(conf)] == [[w for w, _ in c] for c in
                                                                      toolkit.guide.concepts(want_conf)]
    for search in SEARCHES:
        settings = script.settings_from(onnx_model.defaults, **search)
        got = list(script.caption_images(onnx_model, test_images, settings, batch_size=10))
        # the toolkit's plain beam search (as `captioner caption --concepts off`) on torch's features
        hyps = toolkit.decode_features(torch.from_numpy(want), concepts="off", **search)
        expected = [[(join_tokens(toolkit.vocab.decode(h.tokens)), h.norm_score) for h in image] for image in hyps]
        assert [r["caption"] for r in got] == [e[0][0] for e in expected], (label, search)
        for g, e in zip(got, expected):
            assert [h["caption"] for h in g["n_best"]] == [c for c, _ in e]
            assert np.allclose([h["score"] for h in g["n_best"]], [s for _, s in e], atol=2e-4)
    # the captions depend on the image (a model that says one thing would match trivially)
    assert len({r["caption"] for r in got}) > 1


def test_tuned_encoder_exports_with_concepts_from_its_pretrained_units():
    """A fine-tuned encoder (its last units' weights changed): the exported graph gives the tuned grid, and the
    concepts from the pretrained units (as ImageEncoder.encode_all), not from the tuned grid."""
    spec = get_encoder_spec("efficientnet-lite0")
    gen = torch.Generator().manual_seed(0)
    tuned = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if k.endswith("weight") else v
             for k, v in tail_state(spec.build(), 2).items()}
    encoder = ImageEncoder(spec, tuned=tuned, tuned_units=2)
    head = concept_head(spec.name)
    data, info = export_encoder(encoder.net, spec, head)
    assert [o["name"] for o in info["outputs"]] == ["features", "concept_confidences"]
    images = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    feats, conf = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"images": images})
    grid, pooled = encoder.encode_all(images)
    assert pooled is not None
    assert np.abs(feats - grid.numpy()).max() < TUNED_FEATURE_TOLERANCE
    assert np.abs(conf - head.confidences(pooled).numpy()).max() < CONCEPT_TOLERANCE
    assert np.abs(conf - head.confidences(grid).numpy()).max() > 0.01  # the tuned grid would say otherwise


def test_encoder_pooled_to_a_grid_exports():
    """``encoder.grid`` (the net's 7x7 grid at 224 px pooled to 5x5: bins of unequal sizes) exports and computes
    torch's features."""
    spec = get_encoder_spec("efficientnet-lite0", grid=5)
    encoder = ImageEncoder(spec)
    data, info = export_encoder(encoder.net, spec, None)
    assert info["outputs"][0]["shape"] == ["batch", 25, 1280]
    images = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    (feats,) = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"images": images})
    assert np.abs(feats - encoder.encode_arrays(images).numpy()).max() < FEATURE_TOLERANCE


def test_script_imports_nothing_but_onnxruntime_numpy_pillow():
    source = (Path(__file__).parent.parent / "src/captioner/export/caption_onnx.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS


def test_script_runs_without_torch_and_prints_the_toolkit_captions(exported, test_images, capsys):
    """The script as a process in which torch and captioner cannot be imported, against `captioner caption`."""
    best, out = exported("sat")
    blocker = ("import runpy, sys; sys.modules['torch'] = None; sys.modules['captioner'] = None; "
               f"sys.argv = ['caption_onnx.py', *sys.argv[1:]]; runpy.run_path({str(out / 'caption_onnx.py')!r}, "
               "run_name='__main__')")
    images = test_images[:4]
    proc = subprocess.run([sys.executable, "-c", blocker, *images, "--json", "--beam", "3"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    capsys.readouterr()
    assert main(["caption", *images, "--model", str(best), "--json", "--beam", "3", "--concepts",
                 "off", "--quiet", "--precision", "fp32"]) == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [g["caption"] for g in got] == [e["caption"] for e in expected]
    assert all(g["concepts"] and {"word", "confidence"} <= set(g["concepts"][0]) for g in got)


def test_script_reports_unreadable_images_and_bad_folders(exported, test_images, tmp_path, capsys):
    _, out = exported("sat")
    script = _script(out, "sat")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    capsys.readouterr()
    assert script.main(["--model-dir", str(out), test_images[0], str(broken)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(test_images[0] + ": ") and "broken.png: not an image file" in captured.err
    assert script.main(["--model-dir", str(tmp_path), test_images[0]]) == 2
    assert "manifest.json: missing" in capsys.readouterr().err
    assert script.main(["--model-dir", str(out), "--beam", "0", test_images[0]]) == 2
    assert "beam_size 0" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["no-model", "out-exists", "format"])
def test_export_refuses_bad_input_with_exit_2(case, tmp_path, capsys):
    model, out, fmt = "flickr8k-sat", tmp_path / "out", "onnx"
    if case == "no-model":
        model = str(tmp_path / "no-such-model")
    elif case == "out-exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        fmt = "tflite"
    capsys.readouterr()
    assert main(["export", model, str(out), "--format", fmt]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert {"no-model": "no such model directory", "out-exists": "already exists",
            "format": "not an export format"}[case] in err
    assert (out / "keep.txt").read_text() == "mine" if case == "out-exists" else not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))  # nothing half-written left behind
