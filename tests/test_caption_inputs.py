"""`captioner caption` inputs and costs: folders, stdin lists, quoted globs, unreadable files among
good ones, bounded decoding settings, and --max-pixels applied along the whole path (issue 8)."""

from __future__ import annotations

import io
import json

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
