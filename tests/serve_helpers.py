"""What the server tests share: photos as bytes and a small model without attention."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BUNDLED = ROOT / "src" / "captioner" / "pretrained" / "flickr8k-sat"


def example(name: str) -> bytes:
    return (EXAMPLES / name).read_bytes()


def png_bytes(width: int = 64, height: int = 48, color=(40, 120, 200), fmt: str = "PNG") -> bytes:
    """A generated photo: a coloured square on a gradient (encoded as ``fmt``)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)),
                    np.full_like(x, 128)], axis=-1).astype(np.uint8)
    arr[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = color
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def merge_model_dir(path: Path) -> Path:
    """A small untrained `merge` model (no attention over regions) on the bundled model's encoder,
    whose captions are always 4 words long (its end token is made unlikely)."""
    import torch

    from captioner.data.text import Vocab
    from captioner.models import build_decoder
    from captioner.inference.modeldir import save_model_dir

    vocab = Vocab.build([["a", "dog", "runs", "on", "grass"]], min_freq=1)
    torch.manual_seed(0)
    merge = build_decoder("merge", {"vocab_size": len(vocab), "word_vectors": "", "freeze_embeddings": False,
                                    "embed_dim": 8, "hidden_dim": 8})
    with torch.no_grad():
        merge.W_o.bias[vocab.end_id] = -30.0
    enc = json.loads((BUNDLED / "config.json").read_text())["encoder"]
    save_model_dir(path, merge, vocab, {"encoder": enc, "name": "tiny-merge",
                                        "decoding": {"beam_size": 2, "max_len": 4}})
    return path


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, app):
        import uvicorn

        from captioner.serving.server import bind_socket

        self.sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        end = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < end, "the server did not start"
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
