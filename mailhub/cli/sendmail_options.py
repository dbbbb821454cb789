"""
The command line of mailhub-sendmail: options, exit codes and settings.

Owns: parsing a sendmail(1) command line as Postfix's sendmail does
(L{parse_args}, L{Invocation}), the sysexits.h exit codes, the usage text,
and what the command reads from the configuration (L{Settings},
L{load_settings}).

Must not touch: the message, the pickup area, the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PROG", "HELP", "UsageError", "Settings", "load_settings", "Invocation", "parse_args",
    "EX_OK", "EX_USAGE", "EX_DATAERR", "EX_NOUSER", "EX_SOFTWARE", "EX_CANTCREAT", "EX_TEMPFAIL",
    "EX_NOPERM", "EX_CONFIG",
]

PROG = "mailhub-sendmail"

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

class UsageError(Exception):
    """A bad command line: exit 64 with this message."""

@dataclass
class Settings:
    """What the command needs from the configuration."""

    spool_path: str
    hostname: str
    origin: str  # myorigin: the domain added to bare user names
    max_size: int
    server: Any = None  # the [server] section: the -bs session runs with its settings


def load_settings(config_file: str | None) -> Settings:
    """
    Read the configuration (C{-C FILE} > C{$MAILHUB_CONFIG} >
    /etc/mailhub/mailhub.toml > defaults).  The origin domain (Postfix
    C{myorigin}) is the first local domain, so a bounce to a local sender
    always comes back to a local mailbox.

    @raise mailhub.config.ConfigError: the configuration is unusable.
    """
    from mailhub.config import find_config_file, load_config

    config = load_config(find_config_file(config_file))
    return Settings(
        spool_path=config.spool.path,
        hostname=config.server.hostname,
        origin=config.local.domains[0] if config.local.domains else config.server.hostname,
        max_size=config.server.max_message_size,
        server=config.server,
    )


# -- the command line -----------------------------------------------------------------

#: Options that take a value (attached or as the next argument), as Postfix's sendmail.
_WITH_VALUE = set("ABCFLNORVXbefhopr")
#: Options without a value.  All but -I, -i, -t, -v are accepted and ignored.
_FLAGS = set("GIUcimntvx")


@dataclass
class Invocation:
    """One parsed command line."""

    mode: str = "m"  # -b letter: m deliver, p list, s SMTP, i newaliases; q flush
    recipients: list[str] = field(default_factory=list)
    extract: bool = False  # -t
    dots: bool = True  # a lone "." ends input; -i / -oi turn this off
    sender: str | None = None  # -f / -r
    fullname: str | None = None  # -F
    config: str | None = None  # -C
    verbose: bool = False
    queue_id: str | None = None  # -qI<id>


HELP = """\
usage: mailhub-sendmail [options] [recipient ...]
       mailq | mailhub-sendmail -bp
Submit a message read from standard input to mailhub (Postfix-compatible options).
  -t           take recipients from To:, Cc:, Bcc: (and the arguments)
  -i, -oi      a line with a lone "." does not end the message
  -f SENDER    envelope sender (also -r)
  -F NAME      full name for a generated From:
  -C FILE      mailhub configuration file
  -bp          list the queue (as mailq)
  -bs          speak SMTP on standard input and output
  -q           flush the queue (-qIID: one message)
  -v           verbose
  --help       this text;  --version  the mailhub version
See mailhub-sendmail(1).
"""


def parse_args(argv: list[str], prog: str = "sendmail") -> Invocation:
    """
    Parse a sendmail command line the way Postfix's sendmail does: option
    letters can be grouped (C{-ti}), values attached or separate
    (C{-fme}, C{-f me}), the first non-option starts the recipients.

    @param prog: the name called by: C{mailq} means C{-bp}, C{newaliases} C{-bi}.
    @raise UsageError: on an unknown or incomplete option.
    """
    inv = Invocation()
    if prog == "mailq":
        inv.mode = "p"
    elif prog == "newaliases":
        inv.mode = "i"
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        j = 1
        while j < len(arg):
            c = arg[j]
            if c == "q":
                rest = arg[j + 1 :]
                inv.mode = "q"
                if rest.startswith("I") and len(rest) > 1:
                    inv.queue_id = rest[1:]
                break
            if c in _WITH_VALUE:
                value = arg[j + 1 :]
                if not value:
                    i += 1
                    if i >= len(argv):
                        raise UsageError(f"option -{c} requires a value")
                    value = argv[i]
                _option(inv, c, value)
                break
            if c not in _FLAGS:
                raise UsageError(f"unknown option -{c}")
            if c == "I":
                inv.mode = "i"
            elif c == "i":
                inv.dots = False
            elif c == "t":
                inv.extract = True
            elif c == "v":
                inv.verbose = True
            j += 1
        i += 1
    inv.recipients = argv[i:]
    return inv


def _option(inv: Invocation, c: str, value: str) -> None:
    if c in "fr":
        inv.sender = value
    elif c == "F":
        inv.fullname = value
    elif c == "C":
        inv.config = value
    elif c == "o":
        if value == "i":
            inv.dots = False
    elif c == "b":
        if value not in ("m", "p", "s", "i"):
            raise UsageError(
                f"-b{value} is not supported (use -bm to send, -bp to list the queue, -bs for SMTP on stdin)"
            )
        inv.mode = value
    # -A -B -L -N -O -R -V -X -e -h -p: accepted and ignored, as Postfix does.
