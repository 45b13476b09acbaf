"""`captioner serve`: the REST API in-process (FastAPI's TestClient and httpx's ASGI transport), its
limits and every kind of bad input, micro-batching of concurrent requests, and the command itself."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from captioner.decoding.settings import SETTINGS
from captioner.inference.captioner import Captioner
from captioner.serving.app import create_app
from captioner.serving.config import LIMITS, ServeConfig

from .serve_helpers import ROOT, example, merge_model_dir, png_bytes

FAST = dict(warm_up=False)  # the tests' apps skip the start-up warm-up (one test keeps it)


@pytest.fixture(scope="module")
def model() -> Captioner:
    return Captioner.from_pretrained("flickr8k-sat")


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, ServeConfig(**FAST))) as c:
        yield c


@pytest.fixture(scope="module")
def expected(model) -> dict:
    """The Python API's captions of the example photos (beam 3, and beam 5 with 3 best)."""
    names = ["chelsea.png", "astronaut.png", "rocket.jpg"]
    beam3 = model.caption([example(n) for n in names])
    beam5 = model.caption([example(n) for n in names], beam_size=5, n_best=3)
    return {n: (a, b) for n, a, b in zip(names, beam3, beam5)}


def post(client, files, data=None, params=None):
    return client.post("/v1/captions", files=[("images", f) for f in files], data=data or {}, params=params or {})


# ----------------------------------------------------------------------------- answers

def test_one_image_gets_the_python_apis_caption(client, expected):
    r = post(client, [("chelsea.png", example("chelsea.png"), "image/png")])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "flickr8k-sat"
    (res,) = body["results"]
    want = expected["chelsea.png"][0]
    assert res["filename"] == "chelsea.png"
    assert res["caption"] == want.caption and res["score"] == want.score
    assert res["words"] == want.words and res["grid"] == [7, 7] and res["image_size"] == [451, 300]
    assert res["n_best"] == [{"caption": want.caption, "score": want.score}]
    assert "attention" not in res  # only when asked


def test_several_images_answer_in_order_with_form_or_query_options(client, expected):
    names = ["rocket.jpg", "chelsea.png", "astronaut.png"]
    files = [(n, example(n), "application/octet-stream") for n in names]
    for kw in ({"data": {"beam": "5", "n_best": "3"}}, {"params": {"beam": 5, "n_best": 3}},
               {"data": {"beam": "5"}, "params": {"n_best": 3}}):
        r = post(client, files, **kw)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["filename"] for x in results] == names
        for x in results:
            want = expected[x["filename"]][1]
            assert x["caption"] == want.caption
            assert [c["caption"] for c in x["n_best"]] == [c.caption for c in want.n_best]
            assert len(x["n_best"]) == 3 and x["n_best"][0]["score"] >= x["n_best"][2]["score"]


def test_attention_is_one_map_over_the_grid_per_word(client):
    r = post(client, [("chelsea.png", example("chelsea.png"), "image/png")], data={"attention": "true"})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert len(res["attention"]) == len(res["words"]) > 0
    for row in res["attention"]:
        assert len(row) == 49 and all(x >= 0 for x in row) and math.isclose(sum(row), 1.0, abs_tol=1e-3)
    r = post(client, [("chelsea.png", example("chelsea.png"), "image/png")], params={"attention": "off"})
    assert "attention" not in r.json()["results"][0]


def test_seeded_sampling_is_repeatable_and_matches_the_python_api(client, model):
    data = {"sample": "true", "num_captions": "3", "seed": "7"}
    a = post(client, [("c.png", example("chelsea.png"), "image/png")], data=data)
    b = post(client, [("c.png", example("chelsea.png"), "image/png")], data=data)
    assert a.status_code == b.status_code == 200, a.text
    samples = a.json()["results"][0]["samples"]
    assert len(samples) == 3 and samples == b.json()["results"][0]["samples"]
    want = model.caption(example("chelsea.png"), sample=True, num_captions=3, seed=7)[0]
    assert [s["caption"] for s in samples] == [c.caption for c in want.samples]


def test_health_models_page_and_openapi(model):
    with TestClient(create_app(model, ServeConfig())) as c:  # with the start-up warm-up
        h = c.get("/v1/health")
        assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["model"] == "flickr8k-sat"
        m = c.get("/v1/models").json()
        (info,) = m["models"]
        assert info["name"] == "flickr8k-sat" and info["architecture"] == "sat" and info["attention"] is True
        assert info["vocabulary_size"] == 2540
        assert info["encoder"]["name"] == "efficientnet-lite0" and info["encoder"]["grid"] == [7, 7]
        recorded = json.loads((ROOT / "src/captioner/pretrained/flickr8k-sat/config.json").read_text())["metrics"]
        assert info["metrics"]["test"]["beams"]["3"]["BLEU-4"] == pytest.approx(recorded["test"]["beams"]["3"]["BLEU-4"])
        assert 0.1 < info["metrics"]["test"]["beams"]["3"]["BLEU-4"] < 0.5
        assert m["limits"]["max_upload_bytes"] == 10 * 2**20
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "/static/app.js" in page.text and "/static/style.css" in page.text
        for asset in ("app.js", "style.css"):
            a = c.get(f"/static/{asset}")
            assert a.status_code == 200 and len(a.text) > 500
        # no CDN, no outside resource: the page works offline
        web = Path(__file__).resolve().parents[1] / "src" / "captioner" / "serving" / "web"
        for f in web.iterdir():
            assert "http://" not in f.read_text() and "https://" not in f.read_text(), f
        spec = c.get("/openapi.json").json()
        body = spec["paths"]["/v1/captions"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert "images" in body["properties"] and "beam" in body["properties"]
        props = body["properties"]
        assert props["concepts"]["enum"] == ["auto", "off"] and "classifier" in props["concepts"]["description"]
        assert "comma-separated" in props["mention"]["description"] and "repeated" in props["mention"]["description"]
        for option in ("concept_threshold", "max_concepts", "concept_ban"):
            assert option in body["properties"], option
        assert "concepts" in spec["components"]["schemas"]["ImageResult"]["properties"]
        # the page's toggle starts from the model's own decoding defaults
        assert info["decoding"]["concepts"] == model.settings.concepts and info["concepts"] is True
        assert c.get("/docs").status_code == 200


# ----------------------------------------------------------------------------- bad input

GOOD = ("good.png", png_bytes(), "image/png")


@pytest.fixture(scope="module")
def strict(model):
    """An app with small limits, so each can be hit cheaply."""
    cfg = ServeConfig(max_upload_bytes=200_000, max_request_bytes=600_000, max_images=3, max_pixels=1_000_000,
                      **FAST)
    with TestClient(create_app(model, cfg), raise_server_exceptions=False) as c:
        c.post("/v1/captions", files=[("images", GOOD)])  # the encoder is built before the timed tests
        yield c


def _big_png() -> bytes:  # 1200 x 1000 = 1.2 million pixels, small on disk
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (1200, 1000), (90, 90, 90)).save(buf, "PNG")
    return buf.getvalue()


CHELSEA = example("chelsea.png")  # 240 kB: over the strict app's 200 kB a file
BAD_FILES = [  # (id, files, status, words the message must contain)
    ("not-an-image", [("notes.txt", b"just some text, not a picture\n", "text/plain")], 422,
     ["notes.txt", "not an image"]),
    ("empty", [("empty.png", b"", "image/png")], 422, ["empty.png", "empty"]),
    ("truncated", [("half.jpg", png_bytes(300, 200, fmt="JPEG")[:1500], "image/jpeg")], 422,
     ["half.jpg", "truncated"]),
    ("truncated-header", [("cut.png", png_bytes()[:30], "image/png")], 422, ["cut.png"]),
    ("too-many-pixels", [("huge.png", _big_png(), "image/png")], 422, ["huge.png", "pixels", "limit"]),
    ("file-too-large", [("chelsea.png", CHELSEA, "image/png")], 413, ["chelsea.png", "limit", "MB"]),
    ("too-many-images", [GOOD] * 4, 400, ["4 images", "at most 3"]),
    ("request-too-large", [(f"{k}.png", b"x" * 205_000, "image/png") for k in "abc"], 413, ["request", "larger"]),
]


@pytest.mark.parametrize("files,status,words", [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_each_bad_file_gets_its_4xx_naming_the_file_and_the_server_keeps_serving(strict, files, status, words):
    r = post(strict, files)
    assert r.status_code == status, r.text
    body = r.json()
    assert all(w in body["error"] for w in words), body
    if status == 422:
        assert body["errors"][0]["filename"] == files[0][0]
        assert body["results"][0]["error"] == body["errors"][0]["error"]
    ok = post(strict, [GOOD])
    assert ok.status_code == 200 and ok.json()["results"][0]["caption"]


def test_a_bad_image_among_good_ones_is_named_and_the_good_ones_are_captioned(strict):
    r = post(strict, [GOOD, ("broken.gif", b"GIF89a\x00\x01", "image/gif"), ("also-good.jpg", png_bytes(fmt="JPEG"),
                                                                            "image/jpeg")])
    assert r.status_code == 422
    body = r.json()
    assert body["error"].startswith("broken.gif: ")
    assert [e["filename"] for e in body["errors"]] == ["broken.gif"]
    assert [x["filename"] for x in body["results"]] == ["good.png", "broken.gif", "also-good.jpg"]
    assert body["results"][0]["caption"] and body["results"][2]["caption"] and "caption" not in body["results"][1]


BAD_OPTIONS = [  # (query or form fields, words the message must contain)
    ({"beam": "0"}, ["beam 0", "from 1 to 10"]),
    ({"beam": "11"}, ["beam 11", "--max-beam"]),
    ({"beam": "three"}, ["beam", "whole number", "'three'"]),
    ({"n_best": "4", "beam": "2"}, None),  # n-best above the beam widens the beam: fine
    ({"max_len": "51"}, ["max_len 51", "--max-len"]),
    ({"max_len": "-1"}, ["max_len -1"]),
    ({"attention": "maybe"}, ["attention", "true or false"]),
    ({"temperature": "nan", "sample": "1"}, ["temperature", "finite"]),
    ({"temperature": "0", "sample": "1"}, ["temperature 0", "from 0.01"]),
    ({"sample": "true", "n_best": "3"}, ["n-best", "sampling"]),
    ({"seed": "3"}, ["seed", "sample"]),
    ({"seed": "-3", "sample": "yes"}, ["seed -3"]),
    ({"beams": "5"}, ["unknown option 'beams'", "beam, n_best"]),
    ({"concepts": "maybe"}, ["concepts 'maybe'", "auto, off"]),
    ({"concept_threshold": "1.5"}, ["concept_threshold 1.5", "from 0.05 to 1.0"]),
    ({"max_concepts": "4"}, ["max_concepts 4", "from 1 to 3"]),
    ({"concept_ban": "-0.1"}, ["concept_ban -0.1"]),
    ({"mention": "a,b,c,d"}, ["mention 'a,b,c,d'", "at most 3 words"]),
    ({"mention": "dog, dog"}, ["mention 'dog, dog'", "listed twice"]),
    ({"mention": "dog", "sample": "true"}, ["mention", "beam search", "sampling"]),
    ({"concepts": "auto", "sample": "true"}, ["concepts", "beam search", "sampling"]),
]


@pytest.mark.parametrize("fields,words", BAD_OPTIONS, ids=[",".join(f) for f, _ in BAD_OPTIONS])
def test_each_bad_option_gets_a_400_naming_it(strict, fields, words):
    for kw in ({"data": fields}, {"params": fields}):
        r = post(strict, [GOOD], **kw)
        if words is None:
            assert r.status_code == 200, r.text
            assert len(r.json()["results"][0]["n_best"]) == 4
            continue
        assert r.status_code == 400, r.text
        assert all(w in r.json()["error"] for w in words), r.json()


def _server_high(s, cfg: ServeConfig):
    """The largest value of the setting ``s`` on the server ``cfg`` (None: unbounded)."""
    highs = [h for h in (s.high, getattr(cfg, s.server_limit) if s.server_limit else None) if h is not None]
    return min(highs) if highs else None


def _good_value(s, model, cfg: ServeConfig):
    """A value of the setting ``s`` within its bounds on the server ``cfg`` and unlike the model's default."""
    if s.kind is bool:
        return True
    if s.kind is str:
        return next(c for c in s.choices if c != getattr(model.settings, s.name))
    if s.kind is tuple:
        return ("dog", "grass")  # words the model knows
    high = _server_high(s, cfg)
    step = 1 if s.kind is int or high is None else (high - s.low) / 4
    for value in (s.low + step, s.low + 2 * step):
        if value != getattr(model.settings, s.name):
            assert high is None or value <= high
            return value
    raise AssertionError(s)


def _bad_values(s, cfg: ServeConfig) -> list:
    """Values of the setting ``s`` out of its bounds on the server ``cfg`` (a bool: a value that is not one)."""
    if s.kind is bool:
        return ["maybe"]
    if s.kind is str:
        return ["sometimes"]
    if s.kind is tuple:
        return ["a,b,c,d", "dog,dog", "x" * 41]
    step = 1 if s.kind is int else 0.5
    high = _server_high(s, cfg)
    return [s.low - step] + ([] if high is None else [high + step])


def _text(value) -> str:
    """A setting's value as a form field: "true", "3", "auto", "dog,grass"."""
    return ",".join(value) if isinstance(value, tuple) else str(value).lower()


@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_decoding_setting_is_a_rest_option_that_reaches_the_decoder(strict, model, name, monkeypatch):
    s = SETTINGS[name]
    cfg = strict.app.state.config
    seen = []
    caption = model.caption

    def spy(images, settings=None, **kw):
        seen.append(settings)
        return caption(images, settings, **kw)

    monkeypatch.setattr(model, "caption", spy)
    context = {"sample": "true"} if s.applies == "sample" else {}
    value = _good_value(s, model, cfg)
    r = post(strict, [GOOD], data={**context, s.option: _text(value)})
    assert r.status_code == 200, r.text
    assert getattr(seen[-1], name) == value and getattr(model.settings, name) != value
    for bad in _bad_values(s, cfg):
        for kw in ({"data": {**context, s.option: str(bad)}}, {"params": {**context, s.option: str(bad)}}):
            r = post(strict, [GOOD], **kw)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error.startswith(f"bad option: {s.option} ") or error.startswith(f"bad option: {s.option}:"), error
            assert str(bad) in error, error
            limit = getattr(cfg, s.server_limit) if s.server_limit else None
            if limit is not None and s.kind in (int, float) and bad > limit:
                assert f"on this server ({LIMITS[s.server_limit].flag} {limit})" in error, error


def test_concepts_and_mentions_reach_the_decoder_and_the_answer(client, model):
    """concepts=auto names the cat the classifier sees; mention puts the words asked for in the caption,
    sent comma-separated or as repeated fields (form or query); each result carries its concepts."""
    chelsea = [("chelsea.png", example("chelsea.png"), "image/png")]
    plain = post(client, chelsea, data={"concepts": "off"}).json()["results"][0]
    assert "cat" not in plain["words"] and plain["concepts"][0]["word"] == "cat"  # seen, but not said
    auto = post(client, chelsea, data={"concepts": "auto"})
    assert auto.status_code == 200, auto.text
    (res,) = auto.json()["results"]
    want = model.caption(example("chelsea.png"), concepts="auto")[0]
    assert "cat" in res["words"] and res["caption"] == want.caption
    assert res["concepts"] == [{"word": w, "confidence": c} for w, c in want.concepts]
    assert res["concepts"][0]["word"] == "cat" and res["concepts"][0]["confidence"] > 0.5
    captions = []
    for kw in ({"data": {"mention": "bicycle,dog"}}, {"data": {"mention": ["bicycle", "dog"]}},
               {"params": [("mention", "bicycle"), ("mention", "dog")]}, {"params": {"mention": "bicycle dog"}},
               {"data": {"mention": "bicycle,dog"}, "params": {"mention": "bicycle,dog"}}):
        r = post(client, chelsea, **kw)
        assert r.status_code == 200, (kw, r.text)
        captions.append(r.json()["results"][0]["words"])
    assert all(c == captions[0] for c in captions) and {"bicycle", "dog"} <= set(captions[0])
    assert captions[0] == model.caption(example("chelsea.png"), mention=("bicycle", "dog"))[0].words
    r = post(client, chelsea, data={"mention": "bicycle"}, params={"mention": "dog"})
    assert r.status_code == 400 and "given twice with different values" in r.json()["error"]


def test_a_mention_the_model_cannot_say_is_a_400_and_spares_the_others_of_its_batch(model, caplog):
    """Requests asking for different words never share a model call; the ones asking for a word the model
    cannot say (not in its vocabulary, its extension or the word vectors) get a 400 naming it, the others
    of the same gathering their captions."""
    app = create_app(model, ServeConfig(max_batch=8, max_wait_ms=1000, **FAST))
    photos = [png_bytes(color=(50 * k, 90, 200 - 40 * k)) for k in range(5)]
    reqs = [_one("p0.png", photos[0]), _one("p1.png", photos[1], mention="bicycle"),
            _one("p2.png", photos[2], mention="xyzzyq"), _one("p3.png", photos[3], mention="ball"),
            _one("p4.png", photos[4], mention="xyzzyq"), _one("p5.png", photos[0])]
    try:
        responses = asyncio.run(_gather(app, reqs))
        assert [r.status_code for r in responses] == [200, 200, 400, 200, 400, 200], [r.text for r in responses]
        for k in (2, 4):
            error = responses[k].json()["error"]
            assert error.startswith("bad option: mention xyzzyq:") and "word vectors" in error, error
        words = [r.json()["results"][0]["words"] if r.status_code == 200 else None for r in responses]
        assert "bicycle" in words[1] and "ball" not in words[1] and "ball" in words[3] and "bicycle" not in words[3]
        assert words[1] == model.caption(photos[1], mention=("bicycle",))[0].words
        assert [words[0], words[5]] == [r.words for r in model.caption([photos[0], photos[0]])]
        assert sorted(app.state.batcher.batch_sizes) == [1, 1, 2]  # one call per setting; the failed one counts none
        assert not [r for r in caplog.records if r.levelname == "ERROR"]  # the client's error, not the server's
        again = asyncio.run(_gather(app, [_one("p.png", photos[0])]))
        assert again[0].status_code == 200
    finally:
        app.state.batcher.close()


def test_malformed_requests_get_a_400_that_says_what_to_send(strict):
    cases = [
        (dict(data={"beam": "3"}), "no image"),  # no file at all
        (dict(content=b"\x89PNG...", headers={"content-type": "image/png"}), "no image"),  # raw body
        (dict(data={"images": "https://example.com/cat.jpg"}), "never fetches URLs"),
        (dict(files=[("image", GOOD)]), "field 'images'"),
        (dict(content=b"--x\r\nnonsense", headers={"content-type": "multipart/form-data; boundary=zzz"}),
         "multipart"),
        (dict(files=[("images", GOOD)], data={"beam": "3"}, params={"beam": "5"}), "given twice"),
    ]
    for kw, words in cases:
        r = strict.post("/v1/captions", **kw)
        assert r.status_code == 400, (kw, r.text)
        assert words in r.json()["error"], r.json()
    assert post(strict, [GOOD]).status_code == 200


def test_a_body_larger_than_the_limit_is_refused_from_its_length_or_while_streaming(strict):
    r = strict.post("/v1/captions", content=b"x" * 700_000,
                    headers={"content-type": "multipart/form-data; boundary=zzz"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]

    def chunks():  # no Content-Length: refused after 600 kB have arrived
        yield b"--zzz\r\nContent-Disposition: form-data; name=\"images\"; filename=\"s.png\"\r\n\r\n"
        for _ in range(100):
            yield b"y" * 10_000

    r = strict.post("/v1/captions", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zzz"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    assert post(strict, [GOOD]).status_code == 200


# ----------------------------------------------------------------------------- micro-batching

async def _gather(app, requests: list[dict]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
        return await asyncio.gather(*(c.post("/v1/captions", **kw) for kw in requests))


def _one(name: str, data: bytes, **fields) -> dict:
    return {"files": [("images", (name, data, "image/png"))], "data": fields}


def test_concurrent_requests_are_captioned_in_one_batch(model):
    app = create_app(model, ServeConfig(max_batch=8, max_wait_ms=1000, **FAST))
    photos = [png_bytes(color=(30 * k, 200 - 20 * k, 90)) for k in range(8)]
    try:
        responses = asyncio.run(_gather(app, [_one(f"p{k}.png", p) for k, p in enumerate(photos)]))
        assert [r.status_code for r in responses] == [200] * 8
        assert list(app.state.batcher.batch_sizes) == [8]  # eight requests, one model call
        alone = model.caption(photos)
        assert [r.json()["results"][0]["caption"] for r in responses] == [a.caption for a in alone]
        assert [r.json()["results"][0]["filename"] for r in responses] == [f"p{k}.png" for k in range(8)]
    finally:
        app.state.batcher.close()


def test_requests_with_different_settings_share_a_gathering_but_not_a_model_call(model):
    app = create_app(model, ServeConfig(max_batch=6, max_wait_ms=1000, **FAST))
    photos = [png_bytes(color=(60, 20 * k, 200)) for k in range(6)]
    reqs = [_one(f"p{k}.png", p, beam="1" if k % 2 else "3") for k, p in enumerate(photos)]
    reqs[4] = _one("s.png", photos[4], sample="true", seed="5")  # seeded sampling: a call of its own
    try:
        responses = asyncio.run(_gather(app, reqs))
        assert [r.status_code for r in responses] == [200] * 6
        assert sorted(app.state.batcher.batch_sizes) == [1, 2, 3]
        beam1 = model.caption([photos[1], photos[3], photos[5]], beam_size=1)
        assert [responses[k].json()["results"][0]["caption"] for k in (1, 3, 5)] == [b.caption for b in beam1]
        seeded = model.caption(photos[4], sample=True, seed=5)[0]
        assert responses[4].json()["results"][0]["caption"] == seeded.caption
    finally:
        app.state.batcher.close()


def test_a_bad_image_in_a_batch_does_not_disturb_the_others(model):
    app = create_app(model, ServeConfig(max_batch=8, max_wait_ms=1000, **FAST))
    photos = [png_bytes(color=(200, 40 * k, 40)) for k in range(6)]
    reqs = [_one(f"p{k}.png", p) for k, p in enumerate(photos)]
    reqs.insert(2, _one("bad.png", png_bytes()[:40]))
    reqs.insert(5, _one("empty.png", b""))
    try:
        responses = asyncio.run(_gather(app, reqs))
        assert list(app.state.batcher.batch_sizes) == [8]
        assert [r.status_code for r in responses] == [200, 200, 422, 200, 200, 422, 200, 200]
        assert "bad.png" in responses[2].json()["error"] and "empty.png" in responses[5].json()["error"]
        good = [r.json()["results"][0]["caption"] for r in responses if r.status_code == 200]
        assert good == [a.caption for a in model.caption(photos)]
    finally:
        app.state.batcher.close()


def test_without_batching_each_image_is_its_own_model_call(model):
    app = create_app(model, ServeConfig(max_batch=1, **FAST))
    try:
        responses = asyncio.run(_gather(app, [_one(f"p{k}.png", png_bytes(color=(k * 50, 0, 0))) for k in range(4)]))
        assert [r.status_code for r in responses] == [200] * 4
        assert list(app.state.batcher.batch_sizes) == [1, 1, 1, 1]
    finally:
        app.state.batcher.close()


async def _wait_for(condition, seconds: float = 20.0):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.005)


def test_a_full_queue_answers_503_with_retry_after_then_recovers(model):
    app = create_app(model, ServeConfig(max_batch=1, max_queue=2, max_images=2, **FAST))  # 2 images may wait
    batcher = app.state.batcher
    release = threading.Event()

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            batcher.executor.submit(release.wait)  # the model thread is busy
            first = asyncio.ensure_future(c.post("/v1/captions", **_one("a.png", png_bytes())))
            await _wait_for(lambda: batcher.running == 1)  # taken from the queue, waiting for the model
            second = asyncio.ensure_future(c.post("/v1/captions", files=[("images", ("b1.png", png_bytes())),
                                                                         ("images", ("b2.png", png_bytes()))]))
            await _wait_for(lambda: batcher.queued == 2)  # two images waiting: the queue is full
            third = await c.post("/v1/captions", **_one("c.png", png_bytes()))
            release.set()
            return await first, await second, third

    try:
        first, second, third = asyncio.run(scenario())
    finally:
        release.set()
        batcher.close()
    assert third.status_code == 503 and int(third.headers["Retry-After"]) >= 1
    assert "busy" in third.json()["error"]
    assert first.status_code == 200 and second.status_code == 200 and len(second.json()["results"]) == 2
    assert list(batcher.batch_sizes) == [1, 1, 1]


def test_a_request_waiting_longer_than_the_timeout_gets_503_and_the_server_recovers(model):
    release = threading.Event()
    with TestClient(create_app(model, ServeConfig(timeout=1.5))) as c:  # warmed up: a caption takes ~0.1 s
        batcher = c.app.state.batcher
        batcher.executor.submit(release.wait)
        try:
            r = post(c, [GOOD])
        finally:
            release.set()
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert "within 1.5 s" in r.json()["error"]
        end = time.monotonic() + 30
        while batcher.running:  # the model finishes the request that gave up waiting (its answer is dropped)
            assert time.monotonic() < end
            time.sleep(0.01)
        assert post(c, [GOOD]).status_code == 200


def test_a_model_without_attention_says_so(tmp_path):
    model = Captioner.from_pretrained(merge_model_dir(tmp_path / "merge"))
    with TestClient(create_app(model, ServeConfig(**FAST))) as c:
        assert c.get("/v1/models").json()["models"][0]["attention"] is False
        r = post(c, [GOOD], data={"attention": "true"})
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        assert res["attention"] is None and len(res["words"]) == 4
        assert r.json()["model"] == "tiny-merge"


# ----------------------------------------------------------------------------- the command

def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    env["PYTHONPATH"] = str(ROOT / "src")
    return env


def test_captioner_serve_runs_uvicorn_on_loopback_and_stops_on_ctrl_c():
    # the command as a terminal starts it: Ctrl-C's signal not ignored, whatever this test process inherited
    # (a SIGINT ignored here would be ignored in the child too, and uvicorn's re-raise of it would do nothing)
    inherited = signal.getsignal(signal.SIGINT)
    proc = subprocess.Popen([sys.executable, "-m", "captioner", "serve", "--port", "0", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        assert "serving flickr8k-sat (sat) on http://127.0.0.1:" in line, (line, proc.stderr.read())
        url = line.split(" on ", 1)[1].split()[0]
        deadline = time.monotonic() + 60
        while True:  # listening from the start; answers once the model has warmed up
            try:
                health = httpx.get(url + "v1/health", timeout=30)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert health.status_code == 200
        r = httpx.post(url + "v1/captions", files={"images": ("chelsea.png", example("chelsea.png"))}, timeout=30)
        assert r.status_code == 200 and r.json()["results"][0]["caption"] == "a small white cat is playing with a toy"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        finally:
            proc.kill()
    err = proc.stderr.read()
    # uvicorn shuts down gracefully, then the interrupt ends the command as for any other: status 130
    assert proc.returncode == 130 and "Traceback" not in err, (inherited, err)
    assert "Shutting down" in err or "Finished server process" in err or err.strip().endswith("interrupted"), err


@pytest.mark.parametrize("args,message", [
    (["--max-wait-ms", "5000"], "--max-wait-ms 5000"),
    (["--max-upload-mb", "100", "--max-request-mb", "10"], "raise the request limit"),
    (["--model", "no-such-model"], "no-such-model: no such model directory"),
    (["--host", "256.1.1.1"], "--host 256.1.1.1"),
    (["--max-images", "20", "--max-queue", "10"], "could never be taken"),
])
def test_serve_refuses_bad_settings_with_status_2(args, message, capsys):
    from captioner.cli.main import main

    assert main(["serve", "--port", "0", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_serve_refuses_a_port_in_use_with_status_2(capsys):
    import socket

    from captioner.cli.main import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}: cannot listen there" in err and "another port" in err, err

