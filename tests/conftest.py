"""Shared fixtures: the synthetic shapes dataset prepared and encoded once per test session."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# the suite runs commands in subprocesses beside itself on 2 cores: OpenMP threads that spin while they wait
# would slow every process sharing the cores (set before any test module imports torch; `captioner train`
# would otherwise spin, and note a busy machine on stderr before the messages tests read there)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> SyntheticData:
    return prepare_synthetic(tmp_path_factory.mktemp("synthetic"))


# Hypothesis (tests/test_fuzz.py): a fixed number of examples per property, derandomized so that a CI
# run is reproducible; no deadline (timing is not what these tests check). CAPTIONER_FUZZ_EXAMPLES=2000
# runs a deeper search locally.
from hypothesis import HealthCheck, settings  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("CAPTIONER_FUZZ_EXAMPLES", "200"))
settings.register_profile("captioner", max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.load_profile("captioner")
