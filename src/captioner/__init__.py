"""captioner: image captioning that works offline on a CPU."""

__version__ = "0.1.0"
