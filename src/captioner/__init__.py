"""captioner: image captioning that works offline on a CPU.

    from captioner import Captioner
    Captioner.from_pretrained("flickr8k-sat").caption(["photo.jpg"])

The Python API: :class:`Captioner` (captioner.inference.captioner), :class:`DecodingSettings`
(captioner.decoding.settings) and :class:`CaptionResult` (captioner.inference.results).
"""

import importlib

__version__ = "0.1.0"
__all__ = ["Captioner", "CaptionResult", "DecodingSettings", "__version__"]

_API = {"Captioner": "captioner.inference.captioner", "CaptionResult": "captioner.inference.results",
        "DecodingSettings": "captioner.decoding.settings"}


def __getattr__(name: str):
    """The API's names, imported on first use: `captioner --help` should not wait for torch."""
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
