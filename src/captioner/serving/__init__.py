"""Serving: the REST API, its micro-batcher, its options and the web page."""
