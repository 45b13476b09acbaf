"""The server's limits: :class:`ServeConfig`, the one definition of each limit, its default, its
command-line flag and its help.

Each field that ``captioner serve`` can set carries a :class:`Limit` (in the field's metadata), from
which the command's flags and their conversion back to a :class:`ServeConfig` are derived
(:mod:`captioner.cli.serve`), and which the server's messages name ("--max-images").
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

UNITS = {"MB": 2**20}  # a flag's unit: how many of the field's units (bytes) one of the flag's is


@dataclass(frozen=True)
class Limit:
    """How a :class:`ServeConfig` field is set on the command line: its flag (in ``unit`` when the
    field counts bytes), its help, its argument group, and its range: from 0 to ``high`` when
    ``high`` is set, else any finite number > 0."""

    name: str  # the ServeConfig field
    kind: type  # the flag's type: int or float
    flag: str
    help: str
    group: str  # the argument group of `captioner serve --help`
    unit: str | None = None
    high: float | None = None

    @property
    def dest(self) -> str:
        """The flag's name in the parsed arguments (argparse's: ``--max-upload-mb`` -> ``max_upload_mb``)."""
        return self.flag.lstrip("-").replace("-", "_")

    def to_flag(self, value: Any) -> Any:
        """A field value in the flag's unit."""
        return value / UNITS[self.unit] if self.unit else value

    def from_flag(self, value: Any) -> Any:
        """A flag value in the field's unit."""
        return round(value * UNITS[self.unit]) if self.unit else value

    def check(self, value: Any) -> None:
        """ValueError unless ``value`` lies in this limit's range."""
        if self.high is not None:
            if not 0 <= value <= self.high:
                raise ValueError(f"--{self.name.replace('_', '-')} {value}: must be from 0 to {self.high:g}")
        elif not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--{self.name.replace('_', '-')} {value}: must be > 0")


def _limit(default: Any, flag: str, help: str, *, group: str = "limits", unit: str | None = None,
           high: float | None = None):
    """A ServeConfig field whose metadata is its :class:`Limit` (the name is filled in below)."""
    kind = float if unit else type(default)
    return field(default=default, metadata={"limit": dict(kind=kind, flag=flag, help=help, group=group, unit=unit,
                                                          high=high)})


@dataclass(frozen=True)
class ServeConfig:
    """The server's limits. Every one but ``warm_up`` can be set on the command line (`captioner serve --help`)."""

    max_upload_bytes: int = _limit(10 * 2**20, "--max-upload-mb", "largest file (default 10 MB)",
                                   unit="MB")  # one file
    max_request_bytes: int = _limit(64 * 2**20, "--max-request-mb", "largest request (default 64 MB)",
                                    unit="MB")  # the whole request body
    max_images: int = _limit(16, "--max-images", "images per request (default 16)")  # files per request
    max_pixels: int = _limit(40_000_000, "--max-pixels", "largest image in pixels, checked before decoding "
                             "(default 40 million)")  # per image, checked from its header before decoding
    max_beam: int = _limit(10, "--max-beam", "largest beam, n-best and number of samples a client may ask for "
                           "(default 10)")  # bounds beam, n_best and num_captions
    max_len: int = _limit(50, "--max-len", "longest caption a client may ask for (default 50)")  # words
    timeout: float = _limit(30.0, "--timeout", "seconds a request may wait for its captions, then 503 "
                            "(default 30)")
    read_timeout: float = _limit(60.0, "--read-timeout", "seconds a client may take to send its whole request, "
                                 "then 408 and the connection is closed (default 60)")  # slow or stalled uploads
    # 512: what 2 cores caption within the 30 s timeout; 300 concurrent one-photo requests all get an answer
    max_queue: int = _limit(512, "--max-queue", "images waiting for the model; more get 503 with Retry-After "
                            "(default 512)")  # images waiting for the model; beyond: 503
    # max_batch: images in one model call (1: no batching); 16: the CPU's best (bench/README.md)
    max_batch: int = _limit(16, "--max-batch", "images of concurrent requests captioned together (default 16; "
                            "1: no batching)", group="micro-batching")
    max_wait_ms: float = _limit(5.0, "--max-wait-ms", "how long a batch waits for more images when the model is "
                                "idle (default 5 ms)", group="micro-batching",
                                high=1000)  # how long the first image of a batch waits for others
    warm_up: bool = True  # caption one image at start-up so the first request is not slow

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> "ServeConfig":
        """The limits from parsed command-line flags (by each :class:`Limit`'s ``dest``, in its unit)."""
        return cls(**{limit.name: limit.from_flag(values[limit.dest]) for limit in LIMITS.values()})

    def checked(self) -> "ServeConfig":
        for limit in LIMITS.values():
            limit.check(getattr(self, limit.name))
        if self.max_images > self.max_queue:
            raise ValueError(f"--max-images {self.max_images} is more than the queue holds (--max-queue "
                             f"{self.max_queue} images): such a request could never be taken")
        if self.max_upload_bytes > self.max_request_bytes:
            raise ValueError(f"the upload limit per file ({self.max_upload_bytes} bytes) is larger than the request "
                             f"limit ({self.max_request_bytes} bytes); raise the request limit too")
        return self


LIMITS: dict[str, Limit] = {f.name: Limit(name=f.name, **f.metadata["limit"])
                            for f in dataclasses.fields(ServeConfig) if "limit" in f.metadata}


def mb(n: int) -> str:
    """A number of bytes in MB, as the server's messages and the flags count them ("10 MB")."""
    return f"{n / UNITS['MB']:g} MB"
