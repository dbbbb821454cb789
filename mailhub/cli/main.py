"""
The C{mailhub} console script: C{mailhub [--config FILE] <command>}.

Owns: the command-line front end for administration.  Each command is a
L{usage.Options} sub-command, so later issues add C{queue} and C{user}
commands next to C{check-config}.  Exit statuses follow sysexits.h:
0 success, 64 usage error, 78 configuration error.

Must not touch: the reactor, the spool, running daemons (commands that talk
to a daemon will do it through the control socket).
"""

from __future__ import annotations

import sys
from typing import Sequence, TextIO

from twisted.python import usage

from ..config import ConfigError, find_config_file, format_config, load_config

__all__ = ["Options", "main", "EX_USAGE", "EX_CONFIG"]

EX_USAGE = 64
EX_CONFIG = 78


class CheckConfigOptions(usage.Options):
    synopsis = "mailhub [--config FILE] check-config"
    longdesc = (
        "Validate the configuration and print the effective value of every key "
        "(TOML).  Exits 0 when it is valid, 78 with one line on stderr when not."
    )


class Options(usage.Options):
    synopsis = "mailhub [--config FILE] [--data DIR] <command> [options]"
    longdesc = (
        "Administration of the mailhub mail transfer agent.  The configuration file is "
        "--config FILE, else $MAILHUB_CONFIG, else /etc/mailhub/mailhub.toml if it exists, "
        "else the embedded defaults."
    )
    optParameters = [
        ["config", "c", None, "Configuration file (TOML)."],
        ["data", "d", None, "Data directory, as for twistd mailhub --data."],
    ]
    subCommands = [
        ["check-config", None, CheckConfigOptions, "Validate the configuration and print every key."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("no command given")


def check_config(options: Options, out: TextIO, err: TextIO) -> int:
    try:
        config = load_config(find_config_file(options["config"]), None, options["data"])
    except ConfigError as e:
        err.write(f"mailhub: {e}\n")
        return EX_CONFIG
    out.write(format_config(config))
    return 0


COMMANDS = {"check-config": check_config}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    options = Options()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        err.write(f"{options}\nmailhub: {e}\n")
        return EX_USAGE
    return COMMANDS[options.subCommand](options, out, err)


if __name__ == "__main__":
    sys.exit(main())
