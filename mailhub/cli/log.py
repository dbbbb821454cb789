"""
C{mailhub log QUEUE_ID}: the story of one message from the event log.

Owns: the command's options, its output (one line per event for a
person, or the JSON lines as they are) and its exit status.  Must not
touch: the event log's format and reading (L{mailhub.eventlog}).
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from mailhub.cli import Command
from mailhub.eventlog import story

__all__ = ["LogOptions", "run_log", "format_record"]


def format_record(record: dict[str, Any]) -> str:
    """One line for a human: ISO time and the text."""
    import datetime

    when: Any = record.get("time")  # JSON: anything; float() says whether it is a time
    try:
        stamp = datetime.datetime.fromtimestamp(float(when), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
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
