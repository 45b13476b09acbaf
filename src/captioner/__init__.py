"""captioner: image captioning that works offline on a CPU.

    from captioner import Captioner
    Captioner.from_pretrained("flickr8k-sat").caption(["photo.jpg"])
"""

__version__ = "0.1.0"
__all__ = ["Captioner", "__version__"]


def __getattr__(name: str):
    if name == "Captioner":  # imported lazily: `captioner --help` should not wait for torch
        from captioner.inference.captioner import Captioner

        return Captioner
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
