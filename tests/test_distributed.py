"""Feature extraction under torchrun: ranks share the rows of one store, which ends up equal to a
single-process extraction (same files, same bytes), and a killed multi-process run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.runtime.distributed import Group, env_world, process_group
from captioner.data.features import DONE, FeatureStore, FeatureStoreError
from captioner.encoders.extract import extract_features

N_IMAGES = 40
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from captioner.data.readers import read_folder
    from captioner.data.synthetic import make_shapes_dataset

    root = tmp_path_factory.mktemp("ddp")
    csv = make_shapes_dataset(root / "shapes", N_IMAGES, size=96, seed=5)
    read_folder(root / "shapes" / "images", csv).save(root / "corpus.json")
    return root / "corpus.json"


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """One process, one thread: torchrun gives each of its processes one thread (OMP_NUM_THREADS=1),
    and the same thread count means the same arithmetic, so the stores can be compared byte for byte."""
    from captioner.data.corpus import Corpus

    c = Corpus.load(corpus)
    out = tmp_path_factory.mktemp("single") / "store"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract_features(c.image_root, [it.image for it in c.items], out, workers=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def torchrun(*args: str, nproc: int = 2) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CAPTIONER_DEBUG")}
    return subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "-m", "captioner", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun starts each rank in its own session,
    so killing torchrun's process group would leave the ranks running)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    tree, grew = {pid}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    for p in [*(tree - {pid}), pid]:  # the ranks first, so the launcher cannot react
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"torchrun still running after {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def assert_same_store(got: Path, want: Path) -> float:
    """Same files and layout; features equal up to float16 rounding (returns the largest difference)."""
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    for name in ("index.json", "status.npy"):
        assert (got / name).read_bytes() == (want / name).read_bytes(), name
    meta_got, meta_want = (json.loads((p / "meta.json").read_text()) for p in (got, want))
    assert meta_got == meta_want  # fingerprint, shape, encoder, complete: true
    assert (got / "errors.jsonl").read_text() == ""
    a, b = (np.asarray(FeatureStore.open(p, require_complete=True).features, np.float32) for p in (got, want))
    assert a.shape == b.shape == (N_IMAGES, 49, 1280)
    # float16 keeps 11 significant bits: one rounding step is at most |x| * 2**-10
    assert np.all(np.abs(a - b) <= np.maximum(np.abs(a), np.abs(b)) * 2.0 ** -10 + 2.0 ** -14)
    return float(np.abs(a - b).max())


def test_two_ranks_give_the_single_process_store(corpus, reference, tmp_path):
    out = tmp_path / "store"
    code, stdout, err = finish(torchrun("features", "--corpus", str(corpus), "--out", str(out), "--workers", "0",
                                        "--batch-size", "4", "--quiet"))
    assert code == 0, err[-3000:]
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # one summary (rank 0's), with the totals of both ranks
    assert lines[0]["ranks"] == 2 and lines[0]["computed"] == N_IMAGES and lines[0]["complete"] is True
    # measured here: 0.0, the two features.npy byte-identical (same thread count, per-image arithmetic);
    # only float16 rounding is allowed, as another CPU may batch its convolutions differently
    diff = assert_same_store(out, reference)
    print(json.dumps({"max_abs_difference_torchrun_2_vs_single": diff}))


def test_a_killed_torchrun_extraction_resumes(corpus, reference, tmp_path):
    out = tmp_path / "store"
    args = ("features", "--corpus", str(corpus), "--out", str(out), "--workers", "0", "--quiet")
    proc = torchrun(*args, "--batch-size", "1")
    try:
        deadline = time.monotonic() + 120
        n_done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "meta.json").exists():
                try:
                    n_done = int((np.load(out / "status.npy", mmap_mode="r") == DONE).sum())
                except (ValueError, OSError):
                    pass
                if n_done >= 2:
                    break
            time.sleep(0.005)
        alive = proc.poll() is None
    finally:
        kill_tree(proc.pid)  # the launcher and both ranks at once, as when the machine goes down
        proc.communicate()
    assert alive, "the extraction ended before it could be killed"
    status = np.load(out / "status.npy")
    n_done = int((status == DONE).sum())
    assert 0 < n_done < N_IMAGES
    assert json.loads((out / "meta.json").read_text())["complete"] is False

    code, stdout, err = finish(torchrun(*args, "--batch-size", "4"))
    assert code == 0, err[-3000:]
    summary = json.loads(stdout.splitlines()[-1])
    assert summary["already_done"] == n_done and summary["computed"] == N_IMAGES - n_done
    print(json.dumps({"max_abs_difference_killed_and_resumed_vs_single": assert_same_store(out, reference)}))


def test_rank_0_refusing_a_store_stops_every_rank(corpus, reference, tmp_path):
    out = tmp_path / "store"
    extract_features(corpus.parent / "shapes" / "images", ["00000.png"], out, workers=0, progress=False)
    code, _, err = finish(torchrun("features", "--corpus", str(corpus), "--out", str(out), "--workers", "0"))
    assert code != 0  # torchrun reports failed ranks with its own status (1) and its own traceback
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors and all("this store was made from other images" in e for e in errors)
    # rank 0's own message; rank 1 gets it too instead of waiting for files that never come (unless
    # torchrun, seeing rank 0 fail, stops it before it prints)
    shared = [e for e in errors if e.endswith("(rank 0 stopped; so does rank 1)")]
    own = [e for e in errors if e not in shared]
    assert len(own) == 1 and own[0].endswith("or --overwrite") and len(shared) <= 1
    assert "exitcode  : 2" in err  # a user's mistake (status 2), not a crash
    assert "Traceback" not in err.split(" failed (exitcode")[0]  # the ranks printed one line each, no traceback


# ------------------------------------------------------------------ without torchrun


def test_outside_torchrun_a_command_is_rank_0_of_1(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert env_world() == (0, 1)
    with process_group() as g:
        assert g == Group(0, 1)
        assert g.broadcast({"a": 1}) == {"a": 1} and g.sum([1, 2.5]) == [1, 2.5]
        assert g.on_rank0(lambda: 7) == 7
        with pytest.raises(KeyError):  # alone, rank 0's own error as it is
            g.on_rank0(lambda: {}["x"])
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="expected whole numbers"):
        env_world()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="0 <= RANK < WORLD_SIZE"):
        env_world()


def test_feature_extraction_refuses_ranks_on_several_nodes(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(FeatureStoreError, match="on one machine .* `torchrun --standalone --nproc_per_node N`"):
        extract_features(tmp_path, ["a.png"], tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
