"""
The log level of twistd's log (C{server.log_level}, C{twistd mailhub
--log-level}).

Owns: L{predicate}, the one L{LogLevelFilterPredicate} of the daemon, and
L{install}, which puts it in front of the observers twistd starts logging
to (a L{FilteringLogObserver} around each of them).  twistd builds its log
observer (C{--logfile}, C{--syslog}, stdout with C{-n}) only after the
plugin's C{makeService} returned, and a plugin has no handle on the
application it ends up in, so L{install} wraps
C{globalLogBeginner.beginLoggingTo} at C{makeService} time: whatever
observers twistd then passes are filtered.  L{set_level} changes the
level of the running daemon (a reload).

Levels: C{debug}, C{info} (the default), C{warn}, C{error}.  At C{info}
Twisted's own chatter -- "Site starting on 8080", "(TCP Port 8025
Closed)", twistd's "starting up" lines, "Starting factory" of Twisted's
factories (events in the C{twisted} namespaces and legacy C{log.msg}
events, which only Twisted emits) -- is treated as debug: shown at
C{debug}, hidden otherwise; their warnings and errors always pass.
mailhub's own factories are not noisy (C{noisy = False}), so their
"Starting factory" lines never appear.

Must not touch: the mail event publisher (L{mailhub.maillog}): the
metrics, the event log and C{server.mail_log} see every mail event
whatever the level; only twistd's log is filtered.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
)

__all__ = ["LEVELS", "TWISTED_NAMESPACES", "predicate", "make_predicate", "configure", "set_level", "install"]

#: The names of C{server.log_level} and the levels they stand for.
LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

#: Namespaces of Twisted's own events: their info lines are debug to mailhub.
#: C{log_legacy} is every C{twisted.python.log.msg} (Twisted's reactor and
#: twistd still use it; mailhub does not).
TWISTED_NAMESPACES = ("twisted", "log_legacy")


def configure(target: LogLevelFilterPredicate, name: str) -> None:
    """Set C{target} to level C{name} (a key of L{LEVELS})."""
    level = LEVELS[name]
    target.defaultLogLevel = level
    # debug shows Twisted's info lines; info (and above) keeps them out
    twisted_level = LogLevel.debug if level is LogLevel.debug else max(level, LogLevel.warn)
    target.clearLogLevels()
    for namespace in TWISTED_NAMESPACES:
        target.setLogLevelForNamespace(namespace, twisted_level)


def make_predicate(name: str = "info") -> LogLevelFilterPredicate:
    """A new predicate for level C{name}."""
    result = LogLevelFilterPredicate(LEVELS[name])
    configure(result, name)
    return result


#: The daemon's predicate: every observer L{install} wrapped consults it.
predicate = make_predicate("info")


def set_level(name: str) -> None:
    """Change the daemon's log level (start, reload)."""
    configure(predicate, name)


_installed: list[Any] = []


def install(name: str, beginner: Any = globalLogBeginner) -> None:
    """
    Level C{name} from now on, and put L{predicate} in front of the
    observers C{beginner} (twistd's) will start logging to.  Idempotent:
    a second call only sets the level.
    """
    set_level(name)
    if beginner in _installed:
        return
    _installed.append(beginner)
    begin = beginner.beginLoggingTo

    def beginLoggingTo(observers: Iterable[ILogObserver], *args: Any, **kwargs: Any) -> Any:
        filtered = [FilteringLogObserver(observer, [predicate]) for observer in observers]
        return begin(filtered, *args, **kwargs)

    beginner.beginLoggingTo = beginLoggingTo
