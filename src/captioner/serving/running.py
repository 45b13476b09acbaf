"""Running the app under uvicorn: one process, or ``--processes N`` over one listening socket; a clean
drain on SIGTERM.

SIGTERM: the server stops accepting connections, answers every request not yet in a model call with 503
(Retry-After), lets the model call under way finish and answer its requests with 200, waits for every
answer to be sent, and exits with status 0. Nothing is cut: uvicorn's graceful-shutdown limit is the
longest a request can last (read timeout + request timeout + 5 s). SIGINT (Ctrl-C) drains the same way
and then ends as an interrupted command does (status 130).

uvicorn comes with the serve extra: only :func:`captioner.serving.server.serve` imports this module.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

import torch
import uvicorn

from captioner.inference.captioner import Captioner
from captioner.serving.app import create_app
from captioner.serving.config import ServeConfig
from captioner.serving.metrics import MULTIPROCESS_DIR


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining the app's batcher first when it shuts down; SIGTERM ends it with status 0."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.app = config.app

    def handle_exit(self, sig, frame) -> None:
        if sig == signal.SIGTERM:  # a drain, not raised again once drained: exit status 0 (a second one: the same)
            self.should_exit = True
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        self.app.state.batcher.drain()  # waiting requests: 503 now; the model call under way finishes
        await super().shutdown(sockets)


def uvicorn_config(app, cfg: ServeConfig, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=int(cfg.read_timeout + cfg.timeout + 5))


def started_line(name: str, model: Captioner, sock: socket.socket, cfg: ServeConfig, processes: int) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return (f"captioner: serving {name} ({model.config.get('arch')}) on http://{shown}:{port}/ "
            f"(API docs: /docs; batching: {'off' if cfg.max_batch == 1 else f'up to {cfg.max_batch} images'}"
            f"{f'; {processes} processes' if processes > 1 else ''})")


def run_one(model: Captioner, name: str, cfg: ServeConfig, sock: socket.socket, log_level: str) -> None:
    """Serve ``model`` on ``sock`` in this process until SIGTERM (returns) or SIGINT (KeyboardInterrupt)."""
    DrainingServer(uvicorn_config(create_app(model, cfg, name=name), cfg, log_level)).run(sockets=[sock])


def _child(model_name: str, name: str, cfg: ServeConfig, sock: socket.socket, log_level: str, threads: int,
           model_kw: dict | None = None) -> None:
    """One of ``--processes N``: its share of threads, its own model, the shared socket."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into SIGTERM for each process
    torch.set_num_threads(threads)
    try:
        run_one(Captioner.from_pretrained(model_name, **(model_kw or {})), name, cfg, sock, log_level)
    except Exception as e:  # one line, as the command's own errors (the parent stops the other processes)
        print(f"error: server process {os.getpid()}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def run_many(model_name: str, name: str, cfg: ServeConfig, sock: socket.socket, log_level: str, processes: int,
             threads: int, model_kw: dict | None = None) -> int:
    """``processes`` servers on ``sock``, each loading the model with ``threads`` torch threads, until SIGTERM
    or SIGINT, which each process gets as SIGTERM (a drain). The status: 0 after a clean drain of every
    process, 130 after Ctrl-C, 1 when a process ended by itself (its error is on stderr)."""
    own_dir = None
    if not os.environ.get(MULTIPROCESS_DIR):  # the processes' metrics in one place: any scrape reports them all
        own_dir = os.environ[MULTIPROCESS_DIR] = tempfile.mkdtemp(prefix="captioner-metrics-")
    spawn = multiprocessing.get_context("spawn")
    children = [spawn.Process(target=_child, args=(model_name, name, cfg, sock, log_level, threads, model_kw),
                              name=f"captioner-serve-{k}") for k in range(processes)]
    got: list[int] = []  # the signals received

    def forward(sig, frame):
        got.append(sig)
        for c in children:
            if c.pid is not None and c.exitcode is None:
                os.kill(c.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    crashed = None
    try:
        for c in children:
            c.start()
        while any(c.exitcode is None for c in children):
            ended = [c.exitcode for c in children if c.exitcode is not None]
            if not got and crashed is None and ended:  # one ended by itself: stop the others
                crashed = ended[0]
                print(f"error: a server process ended by itself (status {crashed}); stopping the others",
                      file=sys.stderr, flush=True)
                forward(signal.SIGTERM, None)
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)
            del os.environ[MULTIPROCESS_DIR]
    if signal.SIGINT in got:
        raise KeyboardInterrupt
    return 0 if crashed is None and all(c.exitcode == 0 for c in children) else 1
