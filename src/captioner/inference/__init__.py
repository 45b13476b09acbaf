"""Inference: model directories, the Captioner pipeline and its results."""

DEFAULT_MODEL = "flickr8k-sat"  # the bundled model that `captioner caption` and Captioner.from_pretrained use
