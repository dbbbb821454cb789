"""
The command-line tools: C{mailhub} (L{mailhub.cli.main}) and its
sub-commands, and C{mailhub-sendmail} (L{mailhub.cli.sendmail}).

Owns: L{Command}, the base of every sub-command's options, so that each
command's usage line is written once, in full.  Must not touch anything
else: the commands live in their own modules.
"""

from __future__ import annotations

from twisted.python import usage

__all__ = ["Command"]


class Command(usage.Options):
    """
    Options of a sub-command whose C{synopsis} is its complete usage line
    (C{"mailhub log [--file EVENTLOG] [--json] QUEUE_ID"}).
    C{twisted.python.usage} would put the parent's synopsis and the
    command's name in front of it again (C{"mailhub ... log mailhub log
    ..."}); here the synopsis is shown as written.
    """

    def getSynopsis(self) -> str:
        return self.synopsis
