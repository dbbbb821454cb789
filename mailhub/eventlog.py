"""
The event log: every mail event as one JSON line, and C{mailhub log ID}.

Owns: the file named by C{server.event_log} (opened for append, one JSON
object per line, flushed after each line so C{tail -f} and a crash lose at
most the line being written), the format of those lines, and reading them
back to tell the whole story of one message.

Line format (keys sorted; C{time} is POSIX seconds)::

    {"event": "accepted", "from": "a@example.com", "queue_id": "0DA3...",
     "text": "0DA3...: accepted from=<a@example.com> nrcpt=1 ...", "time": 1700000000.1, ...}

C{event} is the mail event's name (L{mailhub.maillog}), C{text} the line as
the ordinary log prints it (L{twisted.logger.formatEvent}) and every other
key one of the event's fields.  Without this module the same story can be
read from the twistd log with C{grep QUEUEID twistd.log}; this file is for
programs (C{jq}, log shippers) and for C{mailhub log}.

Must not touch: anything but its own file.  It observes events; it never
emits mail events itself and nothing depends on it being configured.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any, Iterable, Iterator, TextIO

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer

from .cli import Command

__all__ = ["EventLogObserver", "event_record", "read_events", "story", "LogOptions", "run_log"]

#: fields of a twisted.logger event that are bookkeeping, not mail data
_SKIP = {"log_logger", "log_source", "log_format", "log_level", "log_namespace", "log_time",
         "log_failure", "log_text", "log_io", "log_trace", "log_flattened", "mail_event", "format"}


def _plain(value: Any) -> Any:
    """JSON-safe form of one field (unknown objects become their str())."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
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
        record[str(key)] = _plain(value)
    record["event"] = str(name)
    record["time"] = event.get("log_time")
    record["queue_id"] = str(event.get("queue_id", "-"))
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

    def __init__(self, path: str | None = None, stream: IO[str] | None = None) -> None:
        if stream is None:
            if path is None:
                raise ValueError("give a path or a stream")
            # 0640 when created (senders, recipients, client IPs are not for
            # every local user); an existing file keeps its mode.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            stream = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
        self.path = path
        self._stream = stream
        self._failed = False

    def __call__(self, event: dict[str, Any]) -> None:
        record = event_record(event)
        if record is None:
            return
        line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
        try:
            self._stream.write(line)
            self._stream.flush()
        except (OSError, ValueError) as e:
            if not self._failed:
                self._failed = True
                print(f"mailhub: event log {self.path}: {e}", file=sys.stderr)
            return
        self._failed = False

    def close(self) -> None:
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


def story(log_path: str, queue_id: str) -> list[dict[str, Any]]:
    """
    Every event about C{queue_id}, in log order, followed into the
    notifications it produced: a C{bounce} event carrying C{dsn_id} (the
    queue id of the DSN) pulls in the DSN's own events, so the story says
    where the bounce went too.  Reads the file once; missing file: C{[]}.
    """
    wanted = {queue_id}
    out: list[dict[str, Any]] = []
    try:
        f = open(log_path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    with f:
        for record in read_events(f):
            qid = record.get("queue_id")
            if qid in wanted:
                out.append(record)
                dsn = record.get("dsn_id")
                if isinstance(dsn, str) and dsn:
                    wanted.add(dsn)
    return out


def format_record(record: dict[str, Any]) -> str:
    """One line for a human: ISO time and the text."""
    import datetime

    when = record.get("time")
    try:
        stamp = datetime.datetime.fromtimestamp(float(when), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        stamp = stamp[:-4] + "Z"  # milliseconds
    except (TypeError, ValueError):
        stamp = "-"
    return f"{stamp} {record.get('text', '')}"


class LogOptions(Command):
    """C{mailhub log [--file PATH] [--json] QUEUE_ID}."""

    synopsis = "mailhub log [--file EVENTLOG] [--json] QUEUE_ID"
    longdesc = (
        "Print the story of one message from the event log (server.event_log): arrival, "
        "every delivery attempt, bounces and the bounce's own deliveries.  Exits 1 when "
        "the log has no event for the queue id."
    )
    optParameters = [["file", "f", None, "event log (default: server.event_log from the configuration)"]]
    optFlags = [["json", "j", "print the JSON lines as they are"]]

    def parseArgs(self, queue_id: str) -> None:  # type: ignore[override]
        self["queue_id"] = queue_id


def run_log(options: LogOptions, log_path: str | None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """
    Run C{mailhub log}.  C{log_path} is C{server.event_log}; C{--file}
    wins.  Returns 0 when events were found, 1 when none, 64 without a log.
    """
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    path = options["file"] or log_path
    if not path:
        print("mailhub: no event log: set server.event_log in the configuration or use --file", file=stderr)
        return 64
    records = story(path, options["queue_id"])
    if not records:
        print(f"mailhub: no events for {options['queue_id']} in {path}", file=stderr)
        return 1
    for record in records:
        if options["json"]:
            print(json.dumps(record, ensure_ascii=False, sort_keys=True), file=stdout)
        else:
            print(format_record(record), file=stdout)
    return 0
