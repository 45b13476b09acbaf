"""``python -m captioner ...``: the same command as ``captioner ...``, so PyTorch's launcher can start it
(``torchrun --nproc_per_node N -m captioner features ...``)."""

import os
import sys

from captioner.cli.main import main


def _exit(status: int) -> None:
    """Under torchrun a rank leaves without the interpreter's teardown once its work is done and its
    output flushed: Gloo's C++ threads can still hold tensors then, and freeing them while Python shuts
    down aborts the process now and then (SIGABRT, "terminate called without an active exception")
    instead of giving torchrun the command's exit status. Alone, a normal exit."""
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    _exit(main())
