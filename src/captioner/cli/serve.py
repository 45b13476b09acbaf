"""`captioner serve`: a REST API and a web page over a model.

The limits' flags are derived from their one definition, :class:`captioner.serving.config.ServeConfig`
(each field's :class:`captioner.serving.config.Limit`), and converted back into one by
:meth:`ServeConfig.from_flags`.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from captioner.cli.args import (model_arg, model_option, nonneg_float, nonneg_int, positive, positive_float,
                                runtime_options)
from captioner.inference import DEFAULT_MODEL
from captioner.serving.config import LIMITS, Limit, ServeConfig


def _flag_type(limit: Limit) -> Callable[[str], Any]:
    """The argparse type of a limit's flag: from 0 when the limit has an upper bound, else above 0."""
    if limit.high is not None:
        return nonneg_float if limit.kind is float else nonneg_int
    return positive_float if limit.kind is float else positive


def port_number(text: str) -> int:
    """A TCP port: 0 (any free port) to 65535."""
    port = nonneg_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535 (0: any free port), got {port}")
    return port


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` command to ``sub`` (the ``captioner`` command's subparsers)."""
    s = sub.add_parser("serve", help="a REST API and a web page (needs the serve extra)",
                       description="Serve a model: the web page at /, POST /v1/captions, GET /v1/health "
                                   "(/live, /ready), GET /v1/models, GET /metrics, API docs at /docs. SIGTERM drains: "
                                   "requests in the model call under way are answered, the others get 503, then exit "
                                   "status 0. Images come only from uploads: the server "
                                   "never fetches URLs.")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0: any free port)")
    model_option(s)
    defaults = ServeConfig()
    groups: dict[str, Any] = {}
    for limit in LIMITS.values():
        if limit.group not in groups:
            groups[limit.group] = s.add_argument_group(limit.group)
        groups[limit.group].add_argument(limit.flag, type=_flag_type(limit),
                                         default=limit.to_flag(getattr(defaults, limit.name)), help=limit.help)
    groups[LIMITS["max_batch"].group].add_argument("--no-batching", action="store_true",
                                                   help="one image per model call (same as --max-batch 1)")
    s.add_argument("--processes", type=positive, default=1,
                   help="server processes on the one port, each loading the model, for machines with many cores "
                        "(default 1; see docs/deploy.md)")
    s.add_argument("--threads", type=positive, default=None,
                   help="torch threads of each process (default: torch's, shared out between the processes)")
    s.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    runtime_options(s)
    s.set_defaults(func=run)
    return s


def run(a: argparse.Namespace) -> int:
    """Serve until SIGTERM (a clean drain, then status 0) or Ctrl-C (status 130)."""
    from captioner.serving.server import serve  # torch and the model: not for `captioner --help`

    cfg = ServeConfig.from_flags({**vars(a), **({"max_batch": 1} if a.no_batching else {})})
    return serve(model_arg(a, DEFAULT_MODEL), cfg, host=a.host, port=a.port, log_level=a.log_level,
                 threads=a.threads, processes=a.processes, runtime=a.runtime, calibration=a.calibration)
