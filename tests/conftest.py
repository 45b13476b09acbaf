"""Shared fixtures: the synthetic shapes dataset prepared and encoded once per test session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# the suite runs commands in subprocesses beside itself on 2 cores: OpenMP threads that spin while they wait
# would slow every process sharing the cores (set before any test module imports torch; `captioner train`
# would otherwise spin, and note a busy machine on stderr before the messages tests read there)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# the encoders ONNX Runtime runs are exported into $XDG_CACHE_HOME/captioner: a folder of this session's, not the
# user's cache (the commands the tests start in subprocesses inherit it)
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="captioner-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)


@dataclass
class SyntheticData:
    root: Path
    corpus: Path  # corpus.json
    vocab: Path  # vocab.json
    features: Path  # feature store dir


def prepare_synthetic(root: Path, n_images: int = 400, seed: int = 0) -> SyntheticData:
    from captioner.data.corpus import all_tokens
    from captioner.data.readers import read_folder
    from captioner.data.synthetic import make_shapes_dataset
    from captioner.data.text import Vocab
    from captioner.encoders.extract import extract_features

    csv = make_shapes_dataset(root / "shapes", n_images, seed=seed)
    corpus = read_folder(root / "shapes" / "images", csv)
    corpus.save(root / "corpus.json")
    Vocab.build(all_tokens(corpus.split("train"))).save(root / "vocab.json")
    extract_features(corpus.image_root, [it.image for it in corpus.items], root / "features", progress=False,
                     workers=0)
    return SyntheticData(root, root / "corpus.json", root / "vocab.json", root / "features")


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """The cache folder ($XDG_CACHE_HOME/captioner: exported encoders, hints) in this test's own temporary folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "captioner"


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> SyntheticData:
    return prepare_synthetic(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def sat_two_epochs(synthetic, tmp_path_factory) -> tuple[Path, dict]:
    """(run directory, summary) of tests/test_train.py's small_config (sat, lr 3e-3, batch 32) trained for 2 epochs,
    once per session, in this process. Read-only for the tests (they start from it or compare with it)."""
    from captioner.training.loop import train

    from .test_train import small_config

    out = tmp_path_factory.mktemp("sat-two-epochs") / "run"
    return out, train(small_config(synthetic, out, epochs=2))


# Sizes small enough for a 6-epoch run in seconds; the optimiser settings are the trainer's
# defaults except lr 3e-3 and batch 32. merge keeps its defaults' frozen GloVe vectors.
ARCH_SIZES = {
    "sat": ["model.embed_dim=48", "model.hidden_dim=96", "model.attention_dim=48", "model.dropout=0.1"],
    "bahdanau-gru": ["model.embed_dim=48", "model.proj_dim=48", "model.hidden_dim=96", "model.attention_dim=48",
                     "model.dropout=0.1"],
    "gru-residual": ["model.embed_dim=48", "model.hidden_dim=96", "model.heads=2", "model.dropout=0.1"],
    "merge": ["model.hidden_dim=96", "model.dropout=0.1"],
    "transformer": ["model.embed_dim=64", "model.d_model=64", "model.heads=4", "model.num_layers=2",
                    "model.ff_dim=128", "model.dropout=0.1"],
}


@pytest.fixture(scope="session")
def trained_arch(synthetic, tmp_path_factory):
    """``trained_arch(arch)`` -> (run directory, training log): each architecture trained once per session through
    ``captioner train`` (in this process) on the synthetic data, 6 epochs at lr 3e-3, batch 32 (the models
    tests/test_architectures.py judges; tests/test_train.py judges the sat one too). Read-only for the tests."""
    import contextlib
    import io

    from captioner.cli.main import main

    runs: dict[str, tuple[Path, str]] = {}

    def train(arch: str) -> tuple[Path, str]:
        if arch not in runs:
            run = tmp_path_factory.mktemp(f"run-{arch}")
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                status = main(["train", f"arch={arch}", f"out_dir={run}", f"data.corpus={synthetic.corpus}",
                               f"data.features={synthetic.features}", "data.max_len=12", "optim.epochs=6",
                               "optim.lr=3e-3", "optim.batch_size=32", "progress=false", *ARCH_SIZES[arch]])
            assert status == 0, log.getvalue()[-2000:]
            runs[arch] = (run, log.getvalue())
        return runs[arch]

    return train


# Hypothesis (tests/test_fuzz.py): a fixed number of examples per property, derandomized so that a CI
# run is reproducible; no deadline (timing is not what these tests check). CAPTIONER_FUZZ_EXAMPLES=2000
# runs a deeper search locally.
from hypothesis import HealthCheck, settings  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("CAPTIONER_FUZZ_EXAMPLES", "200"))
settings.register_profile("captioner", max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.load_profile("captioner")
