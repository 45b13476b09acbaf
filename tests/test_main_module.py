"""``python -m captioner`` is the ``captioner`` command (what ``torchrun -m captioner`` runs)."""

from __future__ import annotations

import subprocess
import sys

from captioner import __version__


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioner", *args], capture_output=True, text=True, timeout=120)


def test_python_dash_m_captioner_runs_the_cli():
    r = run_module("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"captioner {__version__}"
    r = run_module("--help")
    assert r.returncode == 0 and "features" in r.stdout and "train" in r.stdout


def test_python_dash_m_captioner_passes_the_exit_status(tmp_path):
    # a user mistake: status 2 and a one-line message, as from the `captioner` script
    r = run_module("features", "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "not a folder" in r.stderr and "Traceback" not in r.stderr


def test_python_dash_m_captioner_does_real_work(tmp_path):
    r = run_module("synth", "--out", str(tmp_path / "s"), "--n", "3", "--size", "32")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 3
