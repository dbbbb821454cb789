"""
The command-line tools: C{mailhub} (L{mailhub.cli.main}) and its
sub-commands, and C{mailhub-sendmail} (L{mailhub.cli.sendmail}).

Owns: L{Command}, the base of every sub-command's options, so that each
command's usage line is written once, in full, and L{silence}, what every
command does when its reader has gone.  Must not touch anything else: the
commands live in their own modules.
"""

from __future__ import annotations

import os
from typing import IO, Any

from twisted.python import usage

__all__ = ["Command", "silence"]


def silence(stream: IO[Any]) -> None:
    """
    Point C{stream}'s descriptor at /dev/null (Python's documented recipe
    for SIGPIPE), so that flushing what is still buffered at exit cannot
    fail and change the exit status.  Never raises.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


class Command(usage.Options):
    """
    Options of a sub-command whose C{synopsis} is its complete usage line
    (C{"mailhub log [--file EVENTLOG] [--json] QUEUE_ID"}).
    C{twisted.python.usage} would put the parent's synopsis and the
    command's name in front of it again (C{"mailhub ... log mailhub log
    ..."}); here the synopsis is shown as written.
    """

    synopsis: str

    def getSynopsis(self) -> str:
        return self.synopsis

    def opt_version(self) -> None:
        """Print the mailhub version and exit."""
        from mailhub import __version__

        print(f"mailhub {__version__}")
        raise SystemExit(0)
