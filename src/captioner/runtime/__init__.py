"""Where the work runs: devices and precision, torchrun's process group, image-decoding worker processes
(``workers.py``: their bound, and that they die with their parent), progress bars (``progress.py``)."""
