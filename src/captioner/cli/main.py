"""The `captioner` command: parses the command line, runs one command, maps errors to exit statuses.

Each command lives in its own module with ``add_parser(s)`` and a ``run`` function that parses and
prints, the work itself being done by the library: :mod:`captioner.cli.data` (prepare, features,
synth), :mod:`captioner.cli.training` (train, evaluate), :mod:`captioner.cli.caption`,
:mod:`captioner.cli.serve`, :mod:`captioner.cli.vocab`, :mod:`captioner.cli.ensemble`, :mod:`captioner.cli.export`.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import sys

from captioner import __version__
from captioner.cli import caption, data, ensemble, export, serve, training, vocab

# Exit statuses (README, "Exit status"): the same for every command. A command returns 0 when everything
# was done and 1 when some inputs failed (each named on stderr) and the rest were done.
EXIT_BAD_INPUT = 2  # bad command, configuration or file: nothing (more) done
EXIT_INTERNAL = 3  # a bug in captioner (CAPTIONER_DEBUG=1 shows the traceback)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_PIPE_CLOSED = 141  # the reader of stdout went away, e.g. `| head` (128 + SIGPIPE)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="captioner", description="Image captioning that works offline on a CPU.")
    p.add_argument("--version", action="version", version=f"captioner {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    data.add_parsers(sub, ("prepare", "features"))
    training.add_parsers(sub)  # train, evaluate
    caption.add_parser(sub)
    serve.add_parser(sub)
    vocab.add_parser(sub)
    ensemble.add_parser(sub)
    export.add_parser(sub)
    data.add_parsers(sub, ("synth",))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    training.set_wait_policy(args.command)
    debug = bool(os.environ.get("CAPTIONER_DEBUG"))
    try:
        status = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe is reported here, not at interpreter exit
        return status
    except BrokenPipeError:
        if debug and not _stdout_is_broken():
            raise
        return _broken_pipe()
    except (ValueError, OSError) as e:  # bad input: files, formats, configs (all our errors are ValueErrors)
        if debug:
            raise
        print(f"error: {_os_error_message(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError:
        if debug:
            raise
        print("error: not enough memory for this command; use smaller sizes (batch size, model sizes, "
              "max pixels) or a machine with more memory", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # not a user's mistake: a bug; one line, the traceback on request
        if debug:
            raise
        print(f"error: internal error ({type(e).__name__}: {e}); this is a bug in captioner. "
              "Run again with CAPTIONER_DEBUG=1 to see the traceback, and please report it", file=sys.stderr)
        return EXIT_INTERNAL


def _broken_pipe() -> int:
    """A write hit a closed pipe. If it is stdout's reader that went away (`captioner caption *.jpg | head
    -1`), stop quietly like any Unix tool; another pipe is a real error."""
    if not _stdout_is_broken():
        print("error: broken pipe", file=sys.stderr)
        return EXIT_BAD_INPUT
    # the rest of the output goes nowhere, so Python's exit-time flush cannot complain either
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_PIPE_CLOSED


def _stdout_is_broken() -> bool:
    """True when stdout is a pipe or socket whose reader has gone away."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() on this platform, or stdout closed
        return True


def _os_error_message(e: OSError) -> str:
    """``FILE: what went wrong`` for an error from the operating system (and a hint for a full disk)."""
    where = f"{e.filename}: " if e.filename else ""
    hint = "; is the disk full? Free some space and run the command again" if e.errno in (errno.ENOSPC,
                                                                                         errno.EDQUOT) else ""
    return f"{where}{e.strerror or e}{hint}"


if __name__ == "__main__":
    sys.exit(main())
