"""Image encoders: pretrained ImageNet networks that turn a photo into a grid of features."""
