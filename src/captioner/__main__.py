"""``python -m captioner ...``: the same command as ``captioner ...``, so PyTorch's launcher can start it
(``torchrun --nproc_per_node N -m captioner features ...``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
