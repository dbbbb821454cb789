"""
The mail log: one structured event per step of a message's life.

Owns: the names and fields of mail events, the publisher they go through
(L{mail_publisher}) and the optional mail log file of mailhub's own
(C{server.mail_log}, L{MailLogFile}, L{MailLogService}).  Every event is a
C{twisted.logger} event in the C{mailhub.mail} namespace carrying
C{queue_id} (when there is one) and C{mail_event}, and whose text reads
like a Postfix mail log line, so an operator can C{grep QUEUEID} the log
and read the whole story of one message.

Where mail events go: L{maillog} emits to L{mail_publisher}, not to the
global publisher.  The observers that need mail events (metrics, event log;
tap.py) are added to L{mail_publisher}.  By default one more observer
forwards every mail event to C{globalLogPublisher}, so twistd's log has the
lines as before.  With C{server.mail_log} set, L{MailLogService} puts a
L{MailLogFile} in place of that forwarding while it runs: mail lines go to
that file (one C{os.write} each, no formatting machinery) and only
non-mail events (errors, startup lines) stay in twistd's log.  This is
Postfix's split between C{maillog_file} and the rest; it exists because
twistd's text observer costs 18-21 us per event (a timezone computation
for each timestamp, the level filter, the template machinery) against
2-3 us here, four events per message on the reactor thread
(docs/performance.rst, "Mail log").

Must not touch: anything but logging.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from twisted.application import service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
)
from zope.interface import implementer

__all__ = ["maillog", "mail_event", "mail_publisher", "MailLogFile", "MailLogService", "CHECK_INTERVAL"]

#: Every mail event goes through this publisher first (see the module docstring).
mail_publisher = LogPublisher()
#: The default: mail events also go to twistd's log (and every global observer).
mail_publisher.addObserver(globalLogPublisher)

_NAMESPACE = "mailhub.mail"
maillog = Logger(namespace=_NAMESPACE, observer=mail_publisher)

#: The mail log file's path is stat()ed at most this often (seconds of the
#: injected clock) to notice rotation, as the aliases file is (directory.py).
CHECK_INTERVAL = 1.0

#: The event key holding the finished text of a mail event (its log_format
#: with the braces undoubled); "log_" keys stay out of the event log's JSON.
_TEXT = "log_mail_text"


def mail_event(event: str, format: str, **fields: Any) -> None:
    """
    Emit mail event C{event} (e.g. C{"accepted"}, C{"delivery"},
    C{"bounce"}).  C{format} is a twisted.logger format string over
    C{fields}; by convention it starts with C{"{queue_id}: "} when the
    event is about a queued message.
    """
    fields.setdefault("queue_id", "-")
    # The text is made here with str.format (C code, a few microseconds),
    # and the event's log_format is that text with its braces doubled:
    # twisted.logger's own formatting of a template (string.Formatter, in
    # Python) cost about 40 us per event, several times per message, on
    # the reactor thread.  Every field stays in the event for the metrics
    # and the event log; the formatted line is the same.  The text itself
    # rides along under _TEXT for the mail log file, which then needs no
    # formatting at all.
    try:
        text = format.format_map(fields)
    except Exception:  # a bad template: let twisted.logger report it
        maillog.info(format, mail_event=event, **fields)
        return
    fields[_TEXT] = text
    if "{" in text or "}" in text:
        text = text.replace("{", "{{").replace("}", "}}")
    # The event Logger.info would build, handed to the publisher directly:
    # Logger.emit checks the level against every LogLevel constant (a
    # generator each time) before it builds the same dictionary, and this
    # runs four or five times per message on the reactor thread.
    fields["mail_event"] = event
    fields["log_logger"] = maillog
    fields["log_level"] = LogLevel.info
    fields["log_namespace"] = _NAMESPACE
    fields["log_source"] = None
    fields["log_format"] = text
    fields["log_time"] = time.time()
    mail_publisher(fields)


class _WallClock:
    """Used when no clock is injected; only C{seconds()} is needed."""

    def seconds(self) -> float:
        return time.time()


@implementer(ILogObserver)
class MailLogFile:
    """
    An observer writing each event as one text line to C{path}, exactly as
    twistd's text log would show it::

        2026-11-28T17:26:46+0000 [mailhub.mail#info] 0DA3...: accepted from=<a@b> ...

    Cheap on purpose (it runs on the reactor thread for every mail event):
    the timestamp is formatted once per whole second, the text is the one
    L{mail_event} already made, and the line is one C{os.write} on an
    C{O_APPEND} descriptor -- nothing is buffered, so a crash loses no line
    already logged, and lines of concurrent writers never interleave.

    Rotation (logrotate without copytruncate): at most once per
    L{CHECK_INTERVAL} seconds of C{clock}, the path is stat()ed and the
    file reopened when it is gone or is another file.  A write or reopen
    error is printed once on stderr and never raised into the code that
    emitted the event; the next check retries the open.

    @param path: the file; created 0640 (senders, recipients and client
        addresses are not for every local user).  Opening it here raises
        C{OSError} so startup can fail cleanly.
    @param clock: when to look for rotation (the reactor in the daemon).
    """

    def __init__(self, path: str, clock: IReactorTime | None = None) -> None:
        self.path = path
        self.clock = clock if clock is not None else _WallClock()
        self._fd: int | None = None
        self._id: tuple[int, int] | None = None
        self._open()
        self._next_check = self.clock.seconds() + CHECK_INTERVAL
        self._stamp: tuple[int | None, str] = (None, "-")
        # check, reopen and write under one lock: mail events come from the
        # reactor thread, but an event from a pool thread must never write
        # to a descriptor another thread has just closed (and the kernel
        # may have reused for a spool file).  Uncontended: ~0.1 us.
        self._lock = threading.Lock()
        self._failed = False  # a problem was said on stderr and is not over yet

    # -- the line ---------------------------------------------------------------

    def _time(self, when: float | None) -> str:
        """twisted's C{formatTime}, called once per second of event time."""
        if when is None:
            return "-"
        second = int(when // 1)
        cached = self._stamp  # one tuple: consistent even if another thread replaces it
        if cached[0] != second:
            cached = self._stamp = (second, formatTime(second))
        return cached[1]

    def format(self, event: dict[str, Any]) -> str | None:
        """
        The line for C{event} (with its newline), or C{None} for an event
        twistd would not print either.  Mail events take the fast path;
        anything else (an observer error reported on L{mail_publisher})
        is formatted by twisted.logger itself, with the same result.
        """
        text = event.get(_TEXT)
        if text is None or "log_failure" in event or "log_system" in event:
            return formatEventAsClassicLogText(event, formatTime=self._time)
        if not text:
            return None
        level = event.get("log_level")
        line = "".join((
            self._time(event.get("log_time")),
            " [",
            event.get("log_namespace", "-"),
            "#",
            level.name if level is not None else "-",
            "] ",
            text,
            "\n",
        ))
        if "\n" in text:
            line = line[:-1].replace("\n", "\n\t") + "\n"
        return line

    # -- the file ---------------------------------------------------------------

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            line = self.format(event)
            if line is None:
                return
            data = line.encode("utf-8", "backslashreplace")
        except Exception as e:  # never raise into the emitter
            self._report(f"cannot format an event: {e!r}")
            return
        with self._lock:
            if self.clock.seconds() >= self._next_check:
                self._check()
            fd = self._fd
            if fd is None:
                return
            try:
                while data:  # a short write (disk filling up) writes the rest
                    written = os.write(fd, data)
                    data = data[written:]
            except OSError as e:
                self._report(e.strerror or str(e))
                self._id = None  # reopen at the next check
                return
            if self._failed and self._id is not None:
                self._failed = False  # written, to the file at the path: all is well again

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        st = os.fstat(fd)
        old, self._fd, self._id = self._fd, fd, (st.st_dev, st.st_ino)
        if old is not None:
            os.close(old)

    def _check(self) -> None:
        """Reopen when the path is gone, is another file, or the last write failed."""
        self._next_check = self.clock.seconds() + CHECK_INTERVAL
        try:
            st = os.stat(self.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        except OSError as e:
            self._report(e.strerror or str(e))
            self._id = None  # not well until the path is the open file again
            return
        if current is not None and current == self._id:
            return
        try:
            self._open()
        except OSError as e:
            # keep writing to the file still open; retry at the next check
            self._report(f"cannot reopen: {e.strerror or e}")
            self._id = None

    def reopen(self) -> None:
        """Look for rotation now (SIGHUP, logrotate's postrotate), not at the next check."""
        with self._lock:
            if self._fd is not None:
                self._check()

    def _report(self, problem: str) -> None:
        """Say it once on stderr (never through the log: that is us)."""
        if self._failed:
            return
        self._failed = True
        try:
            print(f"mailhub: mail log {self.path}: {problem}", file=sys.stderr, flush=True)
        except Exception:
            pass

    def close(self) -> None:
        """Close the file; later events are dropped."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)


class MailLogService(service.Service):
    """
    While running, C{observer} (a L{MailLogFile}) replaces the forwarding
    of mail events to the global publisher; stopping puts the forwarding
    back and closes the file.  tap.py starts it before the scheduler
    (spool recovery logs mail events) and it stops after the scheduler,
    so every mail event lands in exactly one of the two logs.
    """

    def __init__(self, observer: MailLogFile, publisher: LogPublisher | None = None) -> None:
        self.observer = observer
        self.publisher = publisher if publisher is not None else mail_publisher

    def startService(self) -> None:
        super().startService()
        self.publisher.addObserver(self.observer)
        self.publisher.removeObserver(globalLogPublisher)

    def stopService(self) -> Any:
        self.publisher.addObserver(globalLogPublisher)
        self.publisher.removeObserver(self.observer)
        self.observer.close()
        return super().stopService()
