"""
Start-up checks of a loaded configuration beyond its keys: the files and
directories the daemon opens when it starts, checked the way it opens them.

Owns: L{check}, the list of problems the daemon would meet at start with
this configuration -- the ones that stop it (the spool cannot be created,
an aliases file with a syntax error) and the ones it logs as errors or
warnings and starts anyway (an alias with a C{|command} target, a missing
or malformed users file) -- each as the one line the daemon prints or logs,
built by the same code (L{mailhub.delivery.directory.Directory},
L{mailhub.users.UsersFile}) so the wording cannot drift.  C{mailhub
check-config} reports them; what L{mailhub.config.load_config} checks
(every key, TLS certificate and key, secrets, log files) comes first.

Must not touch: anything on disk (nothing is created or written), the
reactor, the network.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher

from mailhub.config import DEFAULTS_SOURCE, Config

__all__ = ["Problem", "check", "missing_users_file", "FATAL", "ERROR", "WARNING"]

#: The daemon refuses to start.
FATAL = "fatal"
#: The daemon starts and logs an error: something will not work (mail refused, logins failing).
ERROR = "error"
#: The daemon starts and logs a warning.
WARNING = "warning"

EX_CONFIG = 78
EX_OSERR = 71


@dataclass(frozen=True)
class Problem:
    """One line the daemon would print (L{FATAL}) or log at start, and its level."""

    level: str
    text: str
    #: the daemon's exit status for a fatal problem
    status: int = EX_CONFIG


@contextmanager
def _logged(namespace: str) -> Iterator[list[Problem]]:
    """The warnings and errors logged under C{namespace} while the block runs, as problems."""
    found: list[Problem] = []

    def observe(event: dict[str, Any]) -> None:
        if not str(event.get("log_namespace", "")).startswith(namespace):
            return
        level = event.get("log_level")
        if level in (LogLevel.error, LogLevel.critical):
            found.append(Problem(ERROR, formatEvent(event)))
        elif level == LogLevel.warn:
            found.append(Problem(WARNING, formatEvent(event)))

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    try:
        yield found
    finally:
        globalLogPublisher.removeObserver(observer)


def _writable_dir(path: str) -> str | None:
    """Why the daemon could not create (C{makedirs}) or write in C{path}, or None."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return os.strerror(errno.ENOTDIR)
    if not os.access(probe, os.W_OK | os.X_OK):
        return os.strerror(errno.EACCES)
    return None


def _spool(config: Config, source: str) -> list[Problem]:
    why = _writable_dir(config.spool.path)
    if why is None:
        return []
    # the daemon's words (mailhub.tap), and its status
    return [Problem(FATAL, f"cannot create spool {config.spool.path}: {why}", EX_OSERR)]


def _mailboxes(config: Config, source: str) -> list[Problem]:
    if config.local.mode == "system":
        return []
    why = _writable_dir(config.local.mailboxes)
    if why is None:
        return []
    return [Problem(ERROR, f"{source}: local.mailboxes: cannot write in {config.local.mailboxes}: {why} "
                           "(every local delivery would be deferred)")]


def _directory(config: Config, source: str) -> list[Problem]:
    from mailhub.delivery.aliases import AliasesError
    from mailhub.delivery.directory import Directory, directory_args

    with _logged("mailhub.delivery.") as found:  # the resolver's and the aliases file's warnings
        try:
            Directory(**directory_args(config.local))
        except AliasesError as e:  # "FILE:LINE: problem", as the daemon stops with it
            return found + [Problem(FATAL, str(e))]
        except ValueError as e:
            return found + [Problem(FATAL, f"{source}: local: {e}")]
    return found


def missing_users_file(config: Config) -> Problem | None:
    """C{auth.users} names a file that does not exist: the daemon logs it at start, check-config fails."""
    path = config.auth.users
    if path is None or os.path.lexists(path):
        return None
    return Problem(ERROR, f"{config.source or DEFAULTS_SOURCE}: auth.users: no such file {path} "
                          "(nobody can log in until 'mailhub user add' creates it)")


def _users(config: Config, source: str) -> list[Problem]:
    path = config.auth.users
    if path is None:
        return []
    missing = missing_users_file(config)
    if missing is not None:
        return [missing]
    from mailhub.users import UsersFile

    with _logged("mailhub.users") as found:
        UsersFile(path).get("postmaster@localhost")  # loads the file as the daemon's first lookup does
    return found


def _dkim_keys(config: Config, source: str) -> list[Problem]:
    if config.dkim.keys is None:
        return []
    from mailhub.auth.keys import key_problems

    return [Problem(ERROR, f"{source}: {text}") for text in key_problems(config.dkim.keys)]


_CHECKS: tuple[Callable[[Config, str], list[Problem]], ...] = (_spool, _mailboxes, _directory, _users, _dkim_keys)


def check(config: Config) -> list[Problem]:
    """
    Every problem the daemon would meet at start with C{config} (already
    loaded with C{check_files=True}), fatal ones first, in the order the
    daemon meets them.
    """
    source = config.source or DEFAULTS_SOURCE
    problems: list[Problem] = []
    for one in _CHECKS:
        problems += one(config, source)
    return [p for p in problems if p.level == FATAL] + [p for p in problems if p.level != FATAL]
