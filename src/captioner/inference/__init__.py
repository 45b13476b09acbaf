"""Inference: model directories, the Captioner pipeline and its results."""
