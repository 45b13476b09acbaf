"""Issue 21, group A, defect 2: every file the project reads must be a regular file of a sane size.

A named pipe blocked the reader forever and /dev/zero streamed until memory ran out: each reader is
tried here with a FIFO (released by the test if the reader blocks, so a failure cannot hang the suite),
and the commands with /dev/zero under a memory cap."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.config import load_config
from captioner.data.corpus import Corpus
from captioner.data.features import FeatureStore
from captioner.data.prepare import prepare_corpus
from captioner.data.text import Vocab
from captioner.encoders.network import get_encoder_spec
from captioner.files import FileTooLargeError, NotRegularFileError, open_regular, read_bytes
from captioner.inference.modeldir import load_model_dir, save_model_dir
from captioner.models.sat import SATConfig, SATDecoder
from captioner.training.config import TrainConfig
from tests.test_config_yaml import run_capped

WORDS = ["a", "red", "blue", "circle", "square"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    vocab = Vocab.build([WORDS])
    decoder = SATDecoder(SATConfig(vocab_size=len(vocab), feature_dim=1280, embed_dim=8, hidden_dim=8,
                                   attention_dim=8, dropout=0.0))
    return save_model_dir(tmp_path_factory.mktemp("model") / "tiny", decoder, vocab,
                          {"encoder": get_encoder_spec("efficientnet-lite0").to_dict()})


def fifo_instead_of(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def refused_without_hanging(fn, fifo: Path) -> str:
    """``fn()`` must raise a ValueError at once; if it blocks on the FIFO, the test opens the FIFO's other end
    to release it, and fails."""
    outcome: dict = {}

    def target():
        try:
            fn()
            outcome["error"] = None
        except Exception as e:  # noqa: BLE001 - reported below
            outcome["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # the reader now sees end of file
        os.close(fd)
        t.join(10)
        pytest.fail(f"blocked reading the named pipe {fifo}")
    error = outcome["error"]
    assert isinstance(error, ValueError), repr(error)
    assert str(fifo) in str(error) and "not a regular file" in str(error), str(error)
    return str(error)


def test_21_2_a_fifo_as_config_vocab_or_corpus_is_refused(tmp_path):
    fifo = fifo_instead_of(tmp_path / "p")
    refused_without_hanging(lambda: load_config(TrainConfig, fifo), fifo)
    refused_without_hanging(lambda: Vocab.load(fifo), fifo)
    refused_without_hanging(lambda: Corpus.load(fifo), fifo)


@pytest.mark.parametrize("name", ["config.json", "vocab.json", "model.safetensors"])
def test_21_2_a_fifo_in_a_model_directory_is_refused(model_dir, tmp_path, name):
    copy = Path(shutil.copytree(model_dir, tmp_path / "m"))
    fifo = fifo_instead_of(copy / name)
    if name != "model.safetensors":
        refused_without_hanging(lambda: load_model_dir(copy), fifo)
        return
    # safetensors opens the file holding the GIL: a thread blocked there would stop this process, so a child
    code = f"from captioner.inference.modeldir import load_model_dir\nload_model_dir({str(copy)!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and f"{fifo}: the model's weights file is a named pipe (FIFO), not a regular file" in r.stderr


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from captioner.data.readers import read_folder
    from captioner.data.synthetic import make_shapes_dataset
    from captioner.encoders.extract import extract_features

    root = tmp_path_factory.mktemp("store")
    csv = make_shapes_dataset(root / "shapes", 2, seed=0)
    corpus = read_folder(root / "shapes" / "images", csv)
    extract_features(corpus.image_root, [it.image for it in corpus.items], root / "features", progress=False,
                     workers=0)
    return root / "features"


@pytest.mark.parametrize("name", ["meta.json", "index.json", "features.npy", "status.npy"])
def test_21_2_a_fifo_in_a_feature_store_is_refused(store, tmp_path, name):
    copy = Path(shutil.copytree(store, tmp_path / "s"))
    refused_without_hanging(lambda: FeatureStore.open(copy), fifo_instead_of(copy / name))


@pytest.mark.parametrize("source", ["captions.csv", "captions.json", "captions.jsonl"])
def test_21_2_a_fifo_as_a_dataset_caption_file_is_refused(tmp_path, source):
    (tmp_path / "images").mkdir()
    fifo = fifo_instead_of(tmp_path / source)
    fmt = {"captions.csv": "kaggle", "captions.json": "karpathy", "captions.jsonl": "folder"}[source]
    refused_without_hanging(lambda: prepare_corpus(fmt, fifo, images=tmp_path / "images", out=tmp_path / "out"),
                            fifo)
    refused_without_hanging(lambda: prepare_corpus("auto", fifo, images=tmp_path / "images", out=tmp_path / "o2"),
                            fifo)


def test_the_file_helper_checks_kind_and_size_before_reading(tmp_path):
    with pytest.raises(NotRegularFileError, match="is a character device, not a regular file"):
        open_regular("/dev/zero", "the thing")
    with pytest.raises(NotRegularFileError, match="is a folder"):
        open_regular(tmp_path)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2000)
    with pytest.raises(FileTooLargeError, match=r"big: the file is 2.0 KiB, more than the 1000 bytes"):
        read_bytes(big, "the file", 1000)
    assert read_bytes(big, "the file", 2000) == b"x" * 2000
    if Path("/proc/self/environ").exists():  # a regular file that says it is empty, and is not
        with pytest.raises(FileTooLargeError):
            read_bytes("/proc/self/cmdline", "the file", 3)


def test_21_2_train_config_dev_zero_and_model_config_dev_zero_exit_2_at_once(model_dir, tmp_path):
    """/dev/zero as the training config (killed at 22 GB before) and as a model's config.json (9.8 GB in 20 s)."""
    r, seconds = run_capped("train", "--config", "/dev/zero", timeout=60)
    assert r.returncode == 2 and "/dev/zero" in r.stderr and "not a regular file" in r.stderr, r.stderr[-2000:]
    assert seconds < 30
    copy = Path(shutil.copytree(model_dir, tmp_path / "m"))
    (copy / "config.json").unlink()
    (copy / "config.json").symlink_to("/dev/zero")
    picture = tmp_path / "p.npy"
    np.save(picture, np.zeros(3))
    r, seconds = run_capped("caption", "--model", str(copy), str(picture), timeout=60)
    assert r.returncode == 2 and "config.json" in r.stderr and "not a regular file" in r.stderr, r.stderr[-2000:]
    assert seconds < 30
