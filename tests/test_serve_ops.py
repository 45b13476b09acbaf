"""`captioner serve` as production servers run (issue 21): the documented error bodies, a read timeout, metrics,
liveness and readiness, offline API docs, the default limits under a mixed load, a clean drain on SIGTERM, and
`--processes`."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from captioner.inference.captioner import Captioner
from captioner.serving.app import create_app
from captioner.serving.config import ServeConfig

from .serve_helpers import merge_model_dir, png_bytes
from .test_serve import FAST, GOOD, _env, _gather, _one, client, model, post  # noqa: F401 (fixtures)

def test_unknown_paths_and_methods_answer_with_the_documented_error_body(client):
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and set(r.json()) == {"error"}
    assert "/v1/nothing-here" in r.json()["error"] and "/v1/captions" in r.json()["error"]
    r = client.get("/v1/captions")
    assert r.status_code == 405 and set(r.json()) == {"error"}
    assert "GET is not allowed on /v1/captions" in r.json()["error"] and "POST" in r.json()["error"]
    assert r.headers["allow"] == "POST"


def test_too_many_parts_name_the_servers_real_image_limit(client):
    r = post(client, [(f"{k}.png", b"x", "image/png") for k in range(200)])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "at most 16" in error and "--max-images" in error and "64" not in error, error


def test_a_client_that_stalls_after_its_headers_gets_408_and_loses_the_connection(model):
    import socket

    from .serve_helpers import ServerThread

    app = create_app(model, ServeConfig(read_timeout=0.5, **FAST))
    with ServerThread(app) as url:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                      b"Content-Type: multipart/form-data; boundary=zzz\r\n\r\n--zzz\r\n")  # then nothing more
            start = time.monotonic()
            answer = b""
            while chunk := s.recv(65536):  # the server closes the connection after its answer
                answer += chunk
            waited = time.monotonic() - start
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"read timeout" in answer and b"--read-timeout" in answer
        assert 0.4 < waited < 5
        assert httpx.get(url + "v1/health", timeout=10).status_code == 200  # still serving


def _metric_families(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_are_prometheus_text_with_requests_latency_batches_and_queue(model):
    with TestClient(create_app(model, ServeConfig(**FAST))) as c:
        assert post(c, [GOOD, GOOD]).status_code == 200
        assert post(c, [("bad.png", b"not an image", "image/png")]).status_code == 422
        assert c.get("/no-such-path").status_code == 404
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = _metric_families(r.text)
    requests = {(s.labels["path"], s.labels["status"]): s.value for s in families["captioner_requests"].samples
                if s.name == "captioner_requests_total"}
    assert requests[("/v1/captions", "200")] == 1 and requests[("/v1/captions", "422")] == 1
    assert requests[("other", "404")] == 1  # an unknown path is not a label of its own
    latency = {s.labels.get("le"): s.value for s in families["captioner_request_seconds"].samples
               if s.name == "captioner_request_seconds_bucket" and s.labels["path"] == "/v1/captions"}
    assert latency["+Inf"] == 2
    batches = {s.name: s.value for s in families["captioner_batch_images"].samples}
    assert batches["captioner_batch_images_count"] == 2 and batches["captioner_batch_images_sum"] == 3
    assert [s.value for s in families["captioner_queue_images"].samples] == [0]
    assert "captioner_running_images" in families


def test_liveness_and_readiness(model):
    app = create_app(model, ServeConfig(max_queue=4, max_images=2, **FAST))
    with TestClient(app) as c:
        assert c.get("/v1/health/live").json() == {"status": "alive"}
        ready = c.get("/v1/health/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        batcher = app.state.batcher
        batcher._waiting = 4  # the queue is full
        r = c.get("/v1/health/ready")
        assert r.status_code == 503 and "queue is full" in r.json()["error"] and int(r.headers["Retry-After"]) >= 1
        batcher._waiting = 0
        assert c.get("/v1/health/ready").status_code == 200
        batcher.drain()  # SIGTERM
        r = c.get("/v1/health/ready")
        assert r.status_code == 503 and "shutting down" in r.json()["error"]
        assert c.get("/v1/health/live").status_code == 200 and c.get("/v1/health").status_code == 200
        r = post(c, [GOOD])
        assert r.status_code == 503 and "shutting down" in r.json()["error"] and r.headers["Retry-After"] == "1"


def test_the_api_docs_page_loads_swagger_ui_from_this_server(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assert "http://" not in page.text and "https://" not in page.text, page.text  # no CDN
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        r = client.get(f"/docs/assets/{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000


def test_300_concurrent_photos_with_the_default_limits_are_all_answered(model):
    """A third of them bad: the good get captions, the bad a 422, none a 503."""
    app = create_app(model, ServeConfig(**FAST))
    good, bad = png_bytes(32, 24), b"this is not a photo"
    reqs = [_one(f"p{k}.png", bad if k % 3 == 2 else good) for k in range(300)]
    try:
        responses = asyncio.run(_gather(app, reqs))
    finally:
        app.state.batcher.close()
    statuses = [r.status_code for r in responses]
    assert statuses == [422 if k % 3 == 2 else 200 for k in range(300)], sorted(set(statuses))


def test_the_model_name_of_a_training_runs_best_directory_is_its_run(tmp_path, model):
    from captioner.serving.server import display_name

    assert display_name(model, "flickr8k-sat") == "flickr8k-sat"  # a name in its config
    run = merge_model_dir(tmp_path / "my-photos" / "best")
    unnamed = Captioner.from_pretrained(run)
    unnamed.config.pop("name")
    assert display_name(unnamed, str(run)) == "my-photos/best"
    assert display_name(unnamed, str(tmp_path / "my-photos" / "best") + "/") == "my-photos/best"
    other = tmp_path / "mine"
    assert display_name(unnamed, str(other)) == "mine"


def test_serve_refuses_a_port_above_65535_with_status_2(capsys):
    from captioner.cli.main import main
    from captioner.serving.server import bind_socket

    with pytest.raises(ValueError, match="from 0 to 65535"):
        bind_socket("127.0.0.1", 70000)  # it used to wrap round to port 4464
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", "70000"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--port" in err and "from 0 to 65535" in err, err


def _start(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "captioner", "serve", "--port", "0", "--log-level", "warning",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    line = proc.stdout.readline()
    url = line.split(" on ", 1)[1].split()[0] if " on http://127.0.0.1:" in line else None
    deadline = time.monotonic() + 90
    while url and time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "v1/health", timeout=30).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()  # then its messages can be read
    raise AssertionError(f"the server did not become ready: {line}{proc.stderr.read()}")


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM, send: bool = True) -> tuple[int, str]:
    if send:
        proc.send_signal(sig)
    try:
        err = proc.communicate(timeout=60)[1]  # reads the log while waiting: a long log cannot block the server
    finally:
        proc.kill()
    return proc.returncode, err


def test_sigterm_with_beam_5_requests_in_flight_drains_them_to_200_or_503_and_exits_0():
    proc, url = _start(["--max-batch", "8"])
    photos = [png_bytes(64, 48, color=(k * 4, 90, 200 - k * 3)) for k in range(60)]

    async def load():
        async with httpx.AsyncClient(base_url=url, timeout=120,
                                     limits=httpx.Limits(max_connections=100)) as c:
            async def one(k):
                return await c.post("v1/captions", files={"images": (f"p{k}.png", photos[k])}, data={"beam": "5"})

            tasks = [asyncio.ensure_future(one(k)) for k in range(60)]
            deadline = time.monotonic() + 60
            while True:  # every request has reached the server: SIGTERM while they are in flight
                h = (await c.get("v1/health")).json()
                if h["queued"] + h.get("running", 0) + h["images"] >= 60 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        responses = asyncio.run(load())
        status, err = _stop(proc, send=False)
    finally:
        proc.kill()
    assert status == 0, (status, err[-3000:])  # it used to be killed by the SIGTERM it re-raised (-15)
    kinds = sorted({getattr(r, "status_code", type(r).__name__) for r in responses}, key=str)
    assert set(kinds) <= {200, 503}, (kinds, err[-3000:])
    assert 200 in kinds and 503 in kinds, kinds  # the batch under way answered; the waiting ones told to retry
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1 and "shutting down" in r.json()["error"]
    assert "Traceback" not in err and "CancelledError" not in err, err[-3000:]


def test_serve_processes_share_one_port_and_drain_together():
    proc, url = _start(["--processes", "2", "--max-batch", "4"])
    try:
        async def load():
            async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                return await asyncio.gather(*(c.get("v1/health") for _ in range(40)),
                                            *(c.post("v1/captions", files={"images": (f"{k}.png", png_bytes())})
                                              for k in range(8)))

        pids, deadline = set(), time.monotonic() + 90
        while time.monotonic() < deadline:  # the kernel hands the connections to either process, once both run
            answers = asyncio.run(load())
            assert all(a.status_code == 200 for a in answers)
            pids |= {a.json()["process"] for a in answers[:40]}
            if len(pids) == 2:
                break
        assert len(pids) == 2, pids
        families = _metric_families(httpx.get(url + "metrics", timeout=30).text)
        total = sum(s.value for s in families["captioner_requests"].samples
                    if s.name == "captioner_requests_total" and s.labels["path"] == "/v1/captions")
        assert total >= 8  # both processes' requests, whichever answers the scrape
        status, err = _stop(proc)
    finally:
        proc.kill()
    assert status == 0 and "Traceback" not in err, (status, err[-3000:])
