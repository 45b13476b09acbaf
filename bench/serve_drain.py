"""`captioner serve` under SIGTERM, and under a mixed load with the default limits; prints ONE JSON object.

drain (issue 21, defect 7): starts `captioner serve --port 0` (127.0.0.1 only), sends --requests
beam-5 caption requests (one photo each) from as many concurrent clients, sends SIGTERM --after
seconds later, and reports what every request got (HTTP statuses, Retry-After on each 503, connection
errors), how long the drain took, and the server's exit status. Expected: only 200s and 503s, and
exit status 0.

mixed (issue 21): with the default limits, --mixed concurrent single-photo requests, a third of them not
images: the good must get captions (200), the bad a 4xx, none a 503.

    .venv/bin/python bench/serve_drain.py                  # 600 requests, SIGTERM after 2 s; 300 mixed
    .venv/bin/python bench/serve_drain.py --requests 60 --after 1 --mixed 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import PHOTOS, ROOT, start_server, stop_server  # noqa: E402


async def _post_all(url: str, bodies: list[tuple[str, bytes]], fields: dict, on_started=None) -> list:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
        tasks = [asyncio.ensure_future(client.post("/v1/captions", files={"images": b}, data=fields))
                 for b in bodies]
        if on_started is not None:
            await on_started()
        return await asyncio.gather(*tasks, return_exceptions=True)


def _kinds(responses: list) -> dict:
    return dict(Counter(f"HTTP {r.status_code}" if isinstance(r, httpx.Response) else type(r).__name__
                        for r in responses))


def drain(a, photos) -> dict:
    log = tempfile.TemporaryFile("w+")  # the server's log: a file, so that a long one cannot block it
    proc, url = start_server(["--max-queue", str(max(512, a.requests))], log)  # 503s come from the drain alone
    times: dict[str, float] = {}

    async def sigterm_later():
        await asyncio.sleep(a.after)
        times["sigterm"] = time.monotonic()
        proc.send_signal(signal.SIGTERM)

    try:
        bodies = [photos[k % len(photos)] for k in range(a.requests)]
        t0 = time.monotonic()
        responses = asyncio.run(_post_all(url, bodies, {"beam": "5"}, sigterm_later))
        times["answered"] = time.monotonic()
        status = proc.wait(timeout=300)
        times["exited"] = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    err = log.read()
    no_retry_after = sum(1 for r in responses if isinstance(r, httpx.Response) and r.status_code == 503
                         and not r.headers.get("Retry-After"))
    kinds = _kinds(responses)
    return {"requests": a.requests, "beam": 5, "server_args": ["--max-queue", str(max(512, a.requests))],
            "sigterm_after_s": a.after, "answers": kinds,
            "503_without_retry_after": no_retry_after, "exit_status": status,
            "all_200_or_503": set(kinds) <= {"HTTP 200", "HTTP 503"},
            "drain_s": round(times["exited"] - times["sigterm"], 2),
            "first_request_to_exit_s": round(times["exited"] - t0, 2),
            "traceback_in_log": "Traceback" in err, "cancelled_in_log": "CancelledError" in err,
            "log_tail": err.strip().splitlines()[-3:]}


def mixed(a, photos) -> dict:
    proc, url = start_server([])  # the default limits
    try:
        bodies = [("bad.jpg", b"this is not a photo") if k % 3 == 2 else photos[k % len(photos)]
                  for k in range(a.mixed)]
        t0 = time.monotonic()
        responses = asyncio.run(_post_all(url, bodies, {}))
        wall = time.monotonic() - t0
    finally:
        stop_server(proc)
    wrong = sum(1 for k, r in enumerate(responses) if not isinstance(r, httpx.Response)
                or r.status_code != (422 if k % 3 == 2 else 200))
    return {"requests": a.mixed, "bad": len(range(2, a.mixed, 3)), "answers": _kinds(responses),
            "unexpected": wrong, "seconds": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=600, help="beam-5 requests in flight at SIGTERM (default 600)")
    ap.add_argument("--after", type=float, default=2.0, help="seconds from the first request to SIGTERM (default 2)")
    ap.add_argument("--mixed", type=int, default=300, help="requests of the mixed run, 0: none (default 300)")
    a = ap.parse_args()
    photos = [(n, (ROOT / "examples" / n).read_bytes()) for n in PHOTOS]
    out = {"bench": "serve_drain", "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
           "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "drain": drain(a, photos)}
    if a.mixed:
        out["mixed"] = mixed(a, photos)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
