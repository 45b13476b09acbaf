"""Running the server: the listening socket, then the model loaded and served under uvicorn until
interrupted (`captioner serve`)."""

import socket
from pathlib import Path

import torch

from captioner.inference.captioner import Captioner
from captioner.serving.config import ServeConfig


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); ValueError with a clear message."""
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


def serve(model_name: str, cfg: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", threads: int | None = None) -> None:
    """Load the model, bind, and serve until interrupted (Ctrl-C / SIGTERM)."""
    try:  # the serve extra (FastAPI, uvicorn) is optional: the app is imported once it is found
        import uvicorn

        from captioner.serving.app import create_app
    except ImportError:
        raise ValueError("captioner serve needs FastAPI and uvicorn: pip install 'captioner[serve]'") from None
    if threads:
        torch.set_num_threads(threads)
    cfg = cfg.checked()
    sock = bind_socket(host, port)  # first: a port in use is reported before the model is loaded
    try:
        model = Captioner.from_pretrained(model_name)
        name = model.config.get("name") or Path(model_name).name
        app = create_app(model, cfg, name=name)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        print(f"captioner: serving {name} ({model.config.get('arch')}) on http://{shown}:{bound_port}/ "
              f"(API docs: /docs; batching: {'off' if cfg.max_batch == 1 else f'up to {cfg.max_batch} images'})",
              flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
