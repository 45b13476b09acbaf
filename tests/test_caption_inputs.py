"""`captioner caption` inputs and costs: folders, stdin lists, quoted globs, unreadable files among
good ones, bounded decoding settings, and --max-pixels applied along the whole path (issue 8)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from captioner.cli.main import main
from captioner.data.images import expand_image_args
from captioner.inference.captioner import Captioner
from captioner.decoding.settings import MAX_BEAM


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """20 photos in a folder tree, a text file named .jpg, a truncated JPEG and a non-image file."""
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(20):
        sub = d / ("a" if i < 10 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (60 + i, 80, 3), dtype=np.uint8)).save(sub / f"p{i:02d}.jpg")
    (d / "notes.jpg").write_text("not a picture")
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(good, format="JPEG")
    (d / "b" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 3])
    (d / "readme.txt").write_text("not listed: not an image extension")
    return d


def test_a_folder_gives_one_json_line_per_image_and_errors_for_the_bad_ones(folder, capsys):
    assert main(["caption", str(folder), "--json", "--beam", "2"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # every line is JSON
    assert len(lines) == 22
    captions = [o for o in lines if "caption" in o]
    errors = [o for o in lines if "error" in o]
    assert len(captions) == 20 and all(o["caption"] for o in captions)
    assert sorted(o["image"].rsplit("/", 1)[1] for o in errors) == ["notes.jpg", "truncated.jpg"]
    assert [o["image"] for o in lines] == sorted(o["image"] for o in lines)  # sorted, recursive


def test_paths_from_stdin_and_quoted_globs(folder, capsys, monkeypatch):
    listed = io.StringIO("".join(f"{p}\n" for p in sorted((folder / "a").glob("*.jpg"))[:3]))
    assert expand_image_args(["-"], stdin=listed) == [str(p) for p in sorted((folder / "a").glob("*.jpg"))[:3]]
    pattern = str(folder / "**" / "p1*.jpg")
    assert [p.rsplit("/", 1)[1] for p in expand_image_args([pattern])] == [f"p{i}.jpg" for i in range(10, 20)]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{folder / 'a' / 'p00.jpg'}\n{folder / 'a' / 'p01.jpg'}\n"))
    assert main(["caption", "-", "--json", "--beam", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["caption", str(folder / "nothing-*.jpg")]) == 2


@pytest.mark.parametrize("flag", [["--beam", str(MAX_BEAM + 1)], ["--n-best", "51"], ["--max-len", "101"],
                                  ["--sample", "--num-captions", "101"]])
def test_decoding_costs_are_bounded_on_the_command_line(folder, flag, capsys):
    assert main(["caption", str(folder / "a" / "p00.jpg"), *flag]) == 2
    assert "must be from 1 to" in capsys.readouterr().err


def test_decoding_costs_are_bounded_in_python(folder):
    model = Captioner.from_pretrained()
    with pytest.raises(ValueError, match="beam size 1000: must be from 1 to 50"):
        model.caption(str(folder / "a" / "p00.jpg"), beam_size=1000)


def test_max_pixels_given_on_the_command_line_applies_to_the_whole_path(folder, capsys, monkeypatch):
    # an image above the library default but under the user's --max-pixels must be captioned
    monkeypatch.setattr("captioner.data.images.DEFAULT_MAX_PIXELS", 1000)
    assert main(["caption", str(folder / "a" / "p00.jpg"), "--max-pixels", "100000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["caption"]
    assert main(["caption", str(folder / "a" / "p00.jpg"), "--max-pixels", "1000", "--json"]) == 1
    assert "more than the limit" in json.loads(capsys.readouterr().out)["error"]


def test_a_name_that_is_not_utf8_is_captioned_and_named_reversibly(folder, tmp_path, capsys, monkeypatch):
    """Issue 21, defect 6: the JSON output named such a file with a lone surrogate (not valid Unicode)."""
    raw = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    shutil.copy(folder / "a" / "p00.jpg", os.fsdecode(raw))
    shown = str(tmp_path / "caf\ufffd.jpg")
    for workers in ("0", "1"):  # decoded here and in a worker process
        assert main(["caption", str(tmp_path), "--json", "--beam", "1", "--workers", workers]) == 0
        [line] = capsys.readouterr().out.splitlines()
        o = json.loads(line)
        assert o["image"] == shown and base64.b64decode(o["image_b64"]) == raw and o["caption"]
    assert main(["caption", os.fsdecode(raw), "--beam", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"{shown}: ")
    (tmp_path / "caf\xe9.jpg").write_text("valid UTF-8 name, not an image")  # named as it is, no _b64
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(raw + b"\n" + os.fsencode(tmp_path / "caf\xe9.jpg")
                                                                  + b"\n"), encoding="utf-8"))
    assert main(["caption", "-", "--json", "--beam", "1"]) == 1
    out, err = capsys.readouterr()
    good, bad = (json.loads(line) for line in out.splitlines())
    assert good["image"] == shown and good["caption"] and "image_b64" not in bad
    assert bad["image"] == str(tmp_path / "caf\xe9.jpg") and "not an image file" in bad["error"]
    assert "\udce9" not in out + err


def test_a_nul_in_the_stdin_list_names_its_line(folder, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{folder / 'a' / 'p00.jpg'}\n{folder / 'a'}/p\0.jpg\n"))
    assert main(["caption", "-"]) == 2
    assert "error: stdin, line 2: the path contains a NUL byte" in capsys.readouterr().err


def test_the_number_of_workers_is_bounded(folder, capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(["caption", str(folder / "a" / "p00.jpg"), "--workers", "65"])
    assert exit_status.value.code == 2 and "--workers: must be from 0 to 64, got 65" in capsys.readouterr().err
    with pytest.raises(ValueError, match="workers 1000: must be from 0 to 64"):
        Captioner.from_pretrained().caption(str(folder / "a" / "p00.jpg"), workers=1000)


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(folder, capsys):
    """Issue 21: progress bars wrote carriage-return lines into logs."""
    assert main(["caption", str(folder), str(folder / "a"), "--beam", "1"]) == 1  # 32 images: a bar is shown
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines()[-1].startswith("caption: 100%") and "32/32" in err.splitlines()[-1]
