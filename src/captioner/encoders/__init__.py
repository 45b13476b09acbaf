"""Image encoders: pretrained ImageNet networks that turn a photo into a grid of features
(:mod:`~captioner.encoders.network`), and the extraction of a set of images' grids into a feature store
(:mod:`~captioner.encoders.extract`)."""
