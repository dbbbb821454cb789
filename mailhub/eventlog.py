"""
The event log: every mail event as one JSON line (C{mailhub log ID} reads it: L{mailhub.cli.log}).

Owns: the file named by C{server.event_log} (opened for append, one JSON
object per line, each line one C{write} so C{tail -f} sees it at once and a
crash loses at most the line being written), the format of those lines, and reading them
back to tell the whole story of one message.

Line format (keys sorted; C{time} is POSIX seconds)::

    {"event": "accepted", "from": "a@example.com", "queue_id": "0DA3...",
     "text": "0DA3...: accepted from=<a@example.com> nrcpt=1 ...", "time": 1700000000.1, ...}

C{event} is the mail event's name (L{mailhub.maillog}), C{text} the line as
the ordinary log prints it (L{twisted.logger.formatEvent}), C{detail} the
event's own C{text} field when it has one (a delivery's outcome: the remote
reply or the local result) and every other key one of the event's fields.

By default the file is C{DATA/events.jsonl}, rotated by size
(C{server.event_log_max_size}, C{server.event_log_keep} older files
C{PATH.1} ... C{PATH.N}); L{story} reads the rotated files too.  Without this module the same story can be
read from the twistd log with C{grep QUEUEID twistd.log}; this file is for
programs (C{jq}, log shippers) and for C{mailhub log}.

Must not touch: anything but its own files.  It observes events; it never
emits mail events itself.  C{GET /v1/messages/ID} reads it (L{story}) for
messages that left the queue; everything else works without it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer

__all__ = ["EventLogObserver", "event_record", "read_events", "story", "log_files"]

#: fields of a twisted.logger event that are bookkeeping, not mail data
_SKIP = {"log_logger", "log_source", "log_format", "log_level", "log_namespace", "log_time",
         "log_failure", "log_text", "log_io", "log_trace", "log_flattened", "mail_event", "format"}

#: Values written as they are (most fields: addresses, ids, counts).
_SCALARS = (str, int, float, bool, type(None))

#: The finished text L{mailhub.maillog.mail_event} puts in each event: the
#: line twisted.logger's formatEvent would make, without its template parsing.
_MAIL_TEXT = "log_mail_text"

#: One encoder for every line (json.dumps with options builds one per call).
_ENCODER = json.JSONEncoder(ensure_ascii=False, sort_keys=True)


def json_safe(value: Any) -> Any:
    """JSON-safe form of one field (unknown objects become their str()); the message history uses it too."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    return str(value)


def event_record(event: dict[str, Any]) -> dict[str, Any] | None:
    """
    The JSON object for one log event, or C{None} when it is not a mail
    event (no C{mail_event} key).
    """
    name = event.get("mail_event")
    if not name:
        return None
    record: dict[str, Any] = {}
    for key, value in event.items():
        if key in _SKIP or key.startswith("log_"):
            continue
        record[str(key)] = value if type(value) in _SCALARS else json_safe(value)
    record["event"] = str(name)
    record["time"] = event.get("log_time")
    record["queue_id"] = str(event.get("queue_id", "-"))
    if "text" in record:
        # the event's own text (a delivery's outcome: the remote reply or the
        # local result); "text" is the whole log line
        record["detail"] = record["text"]
    text = event.get(_MAIL_TEXT)
    if type(text) is str:
        record["text"] = text
        return record
    try:
        record["text"] = formatEvent(event)
    except Exception:  # formatEvent itself never raises, but be sure
        record["text"] = str(event.get("log_format", ""))
    return record


@implementer(ILogObserver)
class EventLogObserver:
    """
    An C{ILogObserver} appending mail events to C{path} as JSON lines.
    Add it to the global log beginner/publisher (tap.py does); every other
    event is ignored.  Write errors are reported once on stderr and never
    raised into the logging system (which would drop the observer).
    """

    def __init__(
        self, path: str | None = None, stream: IO[str] | None = None, max_size: int = 0, keep: int = 0
    ) -> None:
        """
        @param max_size: rotate once the file reaches this many bytes
            (C{PATH} becomes C{PATH.1}, C{PATH.1} becomes C{PATH.2}, ...);
            0 = never (rotate it with logrotate's C{copytruncate}).
        @param keep: rotated files kept; older ones are deleted.  At most
            about C{max_size * (keep + 1)} bytes are on disk.
        """
        # A file of our own is written with one os.write per line on an
        # O_APPEND descriptor (no buffer to flush, nothing held back); a
        # stream given by the caller gets write and flush.
        self._fd: int | None = None
        self._stream: IO[str] | None = None
        if stream is None:
            if path is None:
                raise ValueError("give a path or a stream")
            self._fd = self._open(path)
        else:
            self._stream = stream
        self.path = path
        self.max_size = max_size if path is not None else 0
        self.keep = keep
        self._size = self._current_size()
        self._failed = False

    @staticmethod
    def _open(path: str) -> int:
        # 0640 when created (senders, recipients, client IPs are not for
        # every local user); an existing file keeps its mode.
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def _current_size(self) -> int:
        try:
            fd = self._fd if self._fd is not None else self._stream.fileno()  # type: ignore[union-attr]
            return os.fstat(fd).st_size
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            return 0

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            if self._stream is None:
                raise ValueError("the event log is closed")
            self._stream.write(data.decode("utf-8"))
            self._stream.flush()
            return
        while data:  # a short write (disk filling up) writes the rest
            written = os.write(self._fd, data)
            data = data[written:]

    def _rotate(self) -> None:
        assert self.path is not None and self._fd is not None
        fd, self._fd = self._fd, None
        os.close(fd)
        for n in range(self.keep, 0, -1):
            older = f"{self.path}.{n}"
            if n == self.keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(older)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.replace(older, f"{self.path}.{n + 1}")
        if self.keep > 0:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.unlink(self.path)
        self._fd = self._open(self.path)
        self._size = 0

    def __call__(self, event: dict[str, Any]) -> None:
        record = event_record(event)
        if record is None:
            return
        try:
            line = (_ENCODER.encode(record) + "\n").encode("utf-8", "backslashreplace")
            if self.max_size and self._size > 0 and self._size + len(line) > self.max_size:
                self._size = self._current_size()  # logrotate's copytruncate may have emptied it
                if self._size > 0 and self._size + len(line) > self.max_size:
                    self._rotate()
            self._write(line)
            self._size += len(line)
        except (OSError, ValueError) as e:
            if not self._failed:
                self._failed = True
                print(f"mailhub: event log {self.path}: {e}", file=sys.stderr)
            return
        self._failed = False

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if self._stream is not None:
            self._stream.close()


def read_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Parse event-log lines, skipping blank, torn (crash) or foreign ones."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            yield record


def log_files(log_path: str) -> list[str]:
    """C{log_path}'s rotated files (C{PATH.N} ... C{PATH.1}), oldest first, then C{log_path}."""
    rotated: list[tuple[int, str]] = []
    directory, base = os.path.split(os.path.abspath(log_path))
    try:
        names = os.listdir(directory)
    except OSError:
        names = []
    for name in names:
        suffix = name[len(base) + 1 :] if name.startswith(base + ".") else ""
        if suffix.isdigit() and len(suffix) <= 4:
            rotated.append((int(suffix), os.path.join(directory, name)))
    return [p for _, p in sorted(rotated, reverse=True)] + [log_path]


def story(log_path: str, queue_id: str, follow: bool = True) -> list[dict[str, Any]]:
    """
    Every event about C{queue_id}, in log order (rotated files included),
    followed into the notifications it produced (C{follow}): a C{bounce}
    event carrying C{dsn_id} (the queue id of the DSN) pulls in the DSN's
    own events, so the story says where the bounce went too.  Reads each
    file once, parsing only lines that name a wanted id; missing file: C{[]}.
    """
    wanted = {queue_id}
    out: list[dict[str, Any]] = []
    for path in log_files(log_path):
        try:
            f = open(path, encoding="utf-8", errors="replace")
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            continue
        with f:
            lines = (line for line in f if any(q in line for q in wanted))
            for record in read_events(lines):
                qid = record.get("queue_id")
                if qid in wanted:
                    out.append(record)
                    dsn = record.get("dsn_id")
                    if follow and isinstance(dsn, str) and dsn:
                        wanted.add(dsn)
    return out
