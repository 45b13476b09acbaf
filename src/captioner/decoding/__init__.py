"""Decoding: the settings of how captions are decoded and the one search engine."""
