"""Running the server: the listening socket, then the model loaded and served under uvicorn until
interrupted (`captioner serve`)."""

import dataclasses
import socket
from pathlib import Path

import torch

from captioner.inference.captioner import Captioner
from captioner.serving.batcher import warm_up
from captioner.serving.config import ServeConfig


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); ValueError with a clear message."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: must be from 0 to 65535 (0: any free port)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve this address ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                         "choose another port (--port) or stop the program using it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def display_name(model: Captioner, model_name: str) -> str:
    """The model's name as the API and the page show it: its config's name, else its directory's; a training
    run's ``best/`` (or ``last/``) is named by its run folder ("flickr8k/best"), not as "best"."""
    if model.config.get("name"):
        return str(model.config["name"])
    path = Path(model_name).resolve()
    if path.name in ("best", "last") and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name or str(model_name)


def serve(model_name: str, cfg: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", threads: int | None = None, processes: int = 1, runtime: str = "auto",
          calibration: str | None = None) -> int:
    """Load the model, bind, and serve until SIGTERM (a clean drain: returns 0) or Ctrl-C (KeyboardInterrupt).
    ``processes`` > 1: that many server processes on the one socket, each loading the model, each with
    ``threads`` torch threads (default: torch's threads shared out between them). ``runtime`` runs the image
    encoder (:mod:`captioner.encoders.runtime`; ``calibration``: onnx-int8's images, the first time)."""
    try:  # the serve extra (FastAPI, uvicorn, prometheus-client, Swagger UI) is optional: imported once found
        from captioner.serving import running
    except ImportError as e:
        raise ValueError(f"captioner serve needs the serve extra ({e.name} is missing): "
                         "pip install 'captioner[serve]'") from None
    if processes < 1:
        raise ValueError(f"--processes {processes}: must be >= 1")
    threads = threads or max(1, torch.get_num_threads() // processes)
    torch.set_num_threads(threads)
    cfg = cfg.checked()
    sock = bind_socket(host, port)  # first: a port in use is reported before the model is loaded
    try:
        model_kw = {"runtime": runtime, "calibration": calibration}
        model = Captioner.from_pretrained(model_name, **model_kw)  # in this process too: a bad model is exit 2 at once
        if cfg.warm_up:  # and one that cannot caption (non-finite probabilities): exit 2 here, not in uvicorn
            warm_up(model)
        name = display_name(model, model_name)
        print(running.started_line(name, model, sock, cfg, processes), flush=True)
        if processes == 1:
            running.run_one(model, name, dataclasses.replace(cfg, warm_up=False), sock, log_level)  # warmed up above
            return 0
        del model
        return running.run_many(model_name, name, cfg, sock, log_level, processes, threads, model_kw)
    finally:
        sock.close()
