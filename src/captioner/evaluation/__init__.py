"""Scoring captions: the COCO caption metrics and the evaluation of a model on a split."""
