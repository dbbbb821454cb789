"""
The C{mailhub} console script: C{mailhub [--config FILE] <command>}.

Owns: the command-line front end for administration.  Each command is a
L{usage.Options} sub-command: C{check-config}, C{queue} (L{mailhub.cli.queue}),
C{user} (L{mailhub.cli.user}), C{make-cert} (L{mailhub.cli.certs}),
C{log} (L{mailhub.cli.log}), C{history} (L{mailhub.cli.history}), C{reload} (asks the daemon,
L{mailhub.daemon.reload}), C{tls} (L{mailhub.cli.tls}) and C{dkim} (L{mailhub.cli.dkim});
this module finds and loads the configuration and hands each command what it needs.  A command's module is imported only
when that command runs (L{_lazy}): C{user} brings bcrypt, C{make-cert}
OpenSSL, and C{mailhub queue} should not pay for them.  Exit statuses follow sysexits.h: 0 success, 64 usage error, 78
configuration error; the commands add their own.

Must not touch: the reactor, the spool, running daemons (commands that talk
to a daemon will do it through the control socket).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from twisted.python import usage

from mailhub.cli import Command
from mailhub.config import Config, ConfigError, find_config_file, format_config, load_config

__all__ = ["Options", "main", "EX_USAGE", "EX_CONFIG"]

EX_USAGE = 64
EX_CONFIG = 78
EX_TEMPFAIL = 75


class CheckConfigOptions(Command):
    synopsis = "mailhub [--config FILE] check-config"
    longdesc = (
        "Validate the configuration and what the daemon opens at start (spool, mailbox root, "
        "aliases file, users file, certificate), and print the effective value of every key "
        "(TOML).  Exits 0 when it is valid; otherwise one line per problem on stderr, as the "
        "daemon would say it, and exit status 78 (71 when the spool cannot be created)."
    )


class ReloadOptions(Command):
    synopsis = "mailhub [--config FILE] reload"
    longdesc = (
        "Ask the running daemon (through its control socket) to re-read its configuration "
        "file, as SIGHUP does.  Prints the outcome; exits 0 when applied, 1 when the new "
        "configuration was refused (the running one stays), 75 when the daemon is down."
    )


def _lazy(module: str, name: str) -> Callable[[], usage.Options]:
    """
    A sub-command parser for L{usage.Options.subCommands} that imports its
    module only when the command is used (usage calls it with no arguments
    to build the sub-options; the usage text needs only names and docs).
    """

    def build() -> usage.Options:
        return getattr(importlib.import_module(module, __package__), name)()

    build.__name__ = name
    return build


def _run(module: str, name: str) -> Callable[..., Any]:
    """The run function C{name} of C{module}, imported now."""
    return getattr(importlib.import_module(module, __package__), name)


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
        ["queue", None, _lazy(".queue", "QueueOptions"), "List, show, flush, delete, hold or release queued messages."],
        ["user", None, _lazy(".user", "UserOptions"), "Manage the SMTP AUTH users file (auth.users) and API tokens."],
        ["make-cert", None, _lazy(".certs", "MakeCertOptions"), "Write a self-signed TLS certificate and key."],
        ["log", None, _lazy(".log", "LogOptions"), "Print the story of one message from the event log."],
        ["dkim", None, _lazy(".dkim", "DKIMOptions"), "Make DKIM keys, print and check their DNS records."],
        ["history", None, _lazy(".history", "HistoryOptions"), "Search the message history, or tell one message's story."],
        ["reload", None, ReloadOptions, "Make the running daemon re-read its configuration file."],
        ["tls", None, _lazy(".tls", "TLSOptions"), "Show the outbound TLS policy of a domain, or its TLS report."],
    ]

    opt_version = Command.opt_version

    def opt_C(self, path: str) -> None:
        """Configuration file (as -c; the sendmail spelling)."""
        self["config"] = path

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("no command given")


def check_config(options: Options, out: TextIO, err: TextIO) -> int:
    """
    The configuration's keys and files (L{load_config} with C{check_files},
    as the daemon loads it), then what the daemon meets at start
    (L{mailhub.daemon.preflight.check}): one line per problem on stderr, in the
    daemon's words.  Exit status: the daemon's for a problem that stops
    it (78, or 71 for a spool it cannot create), 78 for one it would log
    as an error, else 0 (warnings are shown, the configuration printed).
    """
    from mailhub.daemon.preflight import ERROR, FATAL, WARNING, check

    try:
        config = load_config(find_config_file(options["config"]), None, options["data"], check_files=True)
    except ConfigError as e:
        err.write(f"mailhub: {e}\n")
        return EX_CONFIG
    problems = check(config)
    for p in problems:
        err.write(f"mailhub: {p.text}\n" if p.level != WARNING else f"mailhub: warning: {p.text}\n")
    fatal = [p for p in problems if p.level == FATAL]
    if fatal:
        return fatal[0].status
    if any(p.level == ERROR for p in problems):
        return EX_CONFIG
    out.write(format_config(config))
    return 0


def _config(options: Options, err: TextIO) -> Config | None:
    try:
        return load_config(find_config_file(options["config"]), None, options["data"])
    except ConfigError as e:
        err.write(f"mailhub: {e}\n")
        return None


def queue(options: Options, out: TextIO, err: TextIO) -> int:
    config = _config(options, err)
    if config is None:
        return EX_CONFIG
    return _run(".queue", "run_queue")(options.subOptions, config, out=out, err=err)


def _file_or_config(module: str, function: str, pick: Callable[[Config], str | None]) -> Callable[..., int]:
    """
    A command whose --file stands in for the configuration: without it the
    path comes from the configuration (C{pick}), so a broken configuration
    never stops work on an explicitly named file.
    """

    def command(options: Options, out: TextIO, err: TextIO) -> int:
        sub = options.subOptions
        path = None
        if not sub["file"]:  # --file needs no configuration
            config = _config(options, err)
            if config is None:
                return EX_CONFIG
            path = pick(config)
        return _run(module, function)(sub, path, stdout=out, stderr=err)

    return command


user = _file_or_config(".user", "run_user", lambda config: config.auth.users)


def make_cert(options: Options, out: TextIO, err: TextIO) -> int:
    return _run(".certs", "run_make_cert")(options.subOptions, stderr=err)


log = _file_or_config(".log", "run_log", lambda config: config.server.event_log)


def history(options: Options, out: TextIO, err: TextIO) -> int:
    sub = options.subOptions
    database = None
    if not sub["database"]:  # --database needs no configuration
        config = _config(options, err)
        if config is None:
            return EX_CONFIG
        database = config.history.database if config.history.enabled else None
    return _run(".history", "run_history")(sub, database, stdout=out, stderr=err)


def reload(options: Options, out: TextIO, err: TextIO) -> int:
    from mailhub.queue.control import ControlClient, socket_path

    try:
        config = load_config(find_config_file(options["config"]), None, options["data"])
    except ConfigError as e:
        err.write(f"mailhub: reload refused, the daemon keeps its configuration: {e}\n")
        return EX_CONFIG
    try:
        client = ControlClient(socket_path(config.spool.path))
    except OSError as e:
        err.write(f"mailhub: reload: mail system is down ({socket_path(config.spool.path)}: {e.strerror or e})\n")
        return EX_TEMPFAIL
    try:
        applied, summary, restart = client.reload()
    except OSError as e:
        err.write(f"mailhub: reload: {e.strerror or e}\n")
        return EX_TEMPFAIL
    finally:
        client.close()
    (out if applied else err).write(f"mailhub: {summary}\n")
    return 0 if applied else 1


def tls(options: Options, out: TextIO, err: TextIO) -> int:
    config = _config(options, err)
    if config is None:
        return EX_CONFIG
    return _run(".tls", "run_tls")(options.subOptions, config, out=out, err=err)


def dkim(options: Options, out: TextIO, err: TextIO) -> int:
    sub = options.subOptions
    config = None
    if not (sub.subOptions and sub.subOptions["keys"]) or sub.subCommand == "check":
        config = _config(options, err)
        if config is None:
            return EX_CONFIG
    return _run(".dkim", "run_dkim")(sub, config, out=out, err=err)


COMMANDS = {
    "check-config": check_config, "queue": queue, "user": user, "make-cert": make_cert, "log": log, "reload": reload,
    "history": history, "tls": tls, "dkim": dkim,
}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    options = Options()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        shown: usage.Options = options  # the usage of the (sub-)command that failed
        while getattr(shown, "subOptions", None) is not None:
            shown = shown.subOptions
        err.write(f"{shown}\nmailhub: {e}\n")
        return EX_USAGE
    assert options.subCommand is not None  # postOptions requires one
    return COMMANDS[options.subCommand](options, out, err)


if __name__ == "__main__":
    sys.exit(main())
