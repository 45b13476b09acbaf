"""Load test of `captioner serve` on 127.0.0.1, micro-batching on and off in the same run; prints ONE
JSON object.

For each mode it starts `captioner serve --port 0` (a free port on 127.0.0.1 only) as a process,
waits for /v1/health, sends a few warm-up requests, then runs N caption requests from C concurrent
clients (one photo each: the example photos in turn, beam 3), and stops the server. By default all
200 requests are in flight at once (the issue's "200 concurrent caption requests"). Both modes get
--timeout 120 so that the slower one is measured rather than cut off by the default 30 s timeout. It reports, per
mode: requests/s, latency p50/p90/p99/max (s), errors (any status other than 200, or a failed
connection, with the count of each), the batches the model ran (from /v1/health) and the 1-minute load
average before the mode; then the throughput ratio batching on / off. It stops by itself: each mode
ends after --requests requests or --seconds seconds, whichever comes first.

    .venv/bin/python bench/serve_load.py                         # 200 requests, all 200 concurrent
    .venv/bin/python bench/serve_load.py --requests 400 --concurrency 32
    .venv/bin/python bench/serve_load.py --processes 2 --batching-only   # `captioner serve --processes 2`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ["chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg"]


def start_server(extra: list[str], log=None) -> tuple[subprocess.Popen, str]:
    """The server as a process, once it answers /v1/health. Its stderr goes to ``log`` (a file), else to a pipe
    read only when it fails to start (keep its log short then: --log-level warning)."""
    cmd = [sys.executable, "-m", "captioner", "serve", "--host", "127.0.0.1", "--port", "0",
           "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log or subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read() if proc.stderr else ''}")
    url = line.split(" on ", 1)[1].split()[0].rstrip("/")
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/v1/health", timeout=60).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"the server did not answer /v1/health: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def load(url: str, photos: list[tuple[str, bytes]], n: int, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors: Counter = Counter()
    next_request = 0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        async def worker():
            nonlocal next_request
            while next_request < n and time.monotonic() < stop_at:
                k = next_request
                next_request += 1
                name, data = photos[k % len(photos)]
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/captions", files={"images": (name, data)})
                    if r.status_code == 200 and r.json()["results"][0]["caption"]:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors[f"HTTP {r.status_code}"] += 1
                except httpx.HTTPError as e:
                    errors[type(e).__name__] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    done = len(latencies)
    return {"requests": done + sum(errors.values()), "ok": done, "errors": sum(errors.values()),
            "error_kinds": dict(errors), "seconds": round(wall, 2), "requests_per_s": round(done / wall, 2),
            "latency_s": {k: (round(v, 3) if v is not None else None) for k, v in
                          (("p50", percentile(latencies, 50)), ("p90", percentile(latencies, 90)),
                           ("p99", percentile(latencies, 99)), ("max", max(latencies, default=None)))}}


def batch_counts(url: str) -> tuple[float, float]:
    """The model calls and images so far, from /metrics (every process of the server together)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=60).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return samples.get("captioner_batch_images_count", 0), samples.get("captioner_batch_images_sum", 0)


def run_mode(label: str, extra: list[str], a, photos) -> dict:
    load_before = round(os.getloadavg()[0], 2)
    proc, url = start_server(extra)
    try:
        for name, data in photos:  # warm-up: each photo once
            httpx.post(f"{url}/v1/captions", files={"images": (name, data)}, timeout=120).raise_for_status()
        before = batch_counts(url)
        res = asyncio.run(load(url, photos, a.requests, a.concurrency, a.seconds))
        after = batch_counts(url)
    finally:
        stop_server(proc)
    batches, images = after[0] - before[0], after[1] - before[1]
    res.update(mode=label, server_args=extra, load_average_before=load_before, model_batches=batches,
               mean_batch_size=round(images / batches, 2) if batches else None)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="requests per mode (default 200)")
    ap.add_argument("--concurrency", type=int, default=200, help="concurrent clients (default 200)")
    ap.add_argument("--seconds", type=float, default=300, help="a mode stops after this long anyway (default 300)")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch with batching on")
    ap.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    ap.add_argument("--processes", type=int, default=1, help="the server's --processes (default 1)")
    ap.add_argument("--batching-only", action="store_true", help="measure the batching mode only")
    a = ap.parse_args()
    if a.requests < 1 or a.concurrency < 1 or a.seconds <= 0 or a.processes < 1:
        raise SystemExit("--requests, --concurrency, --seconds and --processes must be > 0")
    photos = [(n, (ROOT / "examples" / n).read_bytes()) for n in PHOTOS]
    common = ["--max-queue", str(max(256, a.concurrency)), "--timeout", "120"]
    common += ["--threads", str(a.threads)] if a.threads else []
    common += ["--processes", str(a.processes)]
    out = {"bench": "serve_load", "date": time.strftime("%Y-%m-%d"), "requests_per_mode": a.requests,
           "concurrency": a.concurrency, "processes": a.processes, "photos": PHOTOS, "cores": os.cpu_count(),
           "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    on = run_mode("batching", ["--max-batch", str(a.max_batch), *common], a, photos)
    out["modes"] = {"batching": on}
    if not a.batching_only:
        off = out["modes"]["no_batching"] = run_mode("no_batching", ["--no-batching", *common], a, photos)
        out["throughput_ratio_batching_vs_not"] = (round(on["requests_per_s"] / off["requests_per_s"], 2)
                                                   if off["requests_per_s"] else None)
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
