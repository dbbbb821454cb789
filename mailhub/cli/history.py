"""
C{mailhub history}: messages from the history store, one line each, or
the whole story of one message (C{mailhub history ID}).

Owns: the command's options, its output (one line per message or event
for a person, JSON with C{--json}) and its exit status: 0 found, 1
nothing found, 64 a bad option value, 69 the database cannot be read.
Must not touch: the store's tables and SQL (L{mailhub.history.query}).

C{mailhub log ID} still reads the JSON event log (C{server.event_log});
C{mailhub history ID} tells the same story from the database, which is
kept (C{history.retention}) when the event log has been rotated away.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from typing import Any, TextIO

from mailhub.cli import Command
from mailhub.history import query
from mailhub.history.query import Filters, QueryError
from mailhub.history.store import Store, StoreError, open_store

__all__ = ["HistoryOptions", "run_history", "format_message", "format_event"]

EX_NOINPUT = 66
EX_UNAVAILABLE = 69


def _stamp(when: Any) -> str:
    try:
        return datetime.datetime.fromtimestamp(float(when), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"


def _plain(text: Any) -> str:
    """One line, no control characters: addresses and replies come from strangers."""
    return "".join(c if c.isprintable() else "?" for c in str(text if text is not None else ""))


def format_message(m: dict[str, Any]) -> str:
    """One line: arrival, id, state, sender, recipients, client, and why when it is not sent."""
    rcpts = ",".join(f"{r['address']}" for r in m.get("recipients", [])) or "-"
    line = (
        f"{_stamp(m['time'])} {m['queue_id']} {m['status']:<8} from=<{_plain(m.get('sender') or '')}> "
        f"to={_plain(rcpts)} client={_plain(m.get('client') or '-')}"
    )
    if m.get("detail") and m["status"] in ("rejected", "deleted"):
        line += f" ({_plain(m['detail'])})"
    return line


def format_event(e: dict[str, Any]) -> str:
    """One line of a story: time, event, its text (and the node it happened on when there are several)."""
    text = e.get("text") or e.get("event")
    when = _stamp(e.get("time"))
    if isinstance(e.get("time"), (int, float)):
        when = when[:-1] + f".{int(e['time'] * 1000) % 1000:03d}Z"
    return f"{when} {_plain(e.get('event'))}: {_plain(text)}"


class HistoryOptions(Command):
    """C{mailhub history [filters] [--json] [ID]}."""

    synopsis = (
        "mailhub history [--from ADDR] [--to ADDR|DOMAIN] [--status STATUS] [--since 2h] [--until TIME] "
        "[--client IP] [--limit N] [--json] [--database DB] [QUEUE_ID]"
    )
    longdesc = (
        "List messages from the history database (history.database), newest first, one line each "
        "with its final state; or, with a queue id, the whole story of that message with timestamps "
        "(and of the bounces it caused).  Times are durations back from now (30m, 2h, 7d), "
        "ISO dates (2026-12-01, 2026-12-01T10:00:00Z) or POSIX seconds.  Exits 1 when nothing matches."
    )
    optParameters = [
        ["from", None, None, "sender address"],
        ["to", None, None, "recipient address, or a recipient domain (no @)"],
        ["status", None, None, "queued, held, deferred, sent, bounced, rejected or deleted"],
        ["since", None, None, "from this time on (e.g. 2h)"],
        ["until", None, None, "before this time"],
        ["client", None, None, "client IP address"],
        ["limit", "n", "100", "at most this many messages"],
        ["database", None, None, "SQLite file or postgresql:// URL (default: history.database)"],
    ]
    optFlags = [["json", "j", "JSON: one object per message, or the story as one object"]]

    def parseArgs(self, queue_id: str | None = None) -> None:  # type: ignore[override]
        self["queue_id"] = queue_id

    def postOptions(self) -> None:
        if not str(self["limit"]).isdigit() or not 1 <= int(self["limit"]) <= query.MAX_LIMIT:
            from twisted.python import usage

            raise usage.UsageError(f"--limit must be 1 to {query.MAX_LIMIT}")


def run_history(
    options: HistoryOptions, database: str | None, stdout: TextIO | None = None, stderr: TextIO | None = None,
    now: float | None = None,
) -> int:
    """Run C{mailhub history}; C{database} is C{history.database} (C{--database} wins)."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    now = time.time() if now is None else now
    db = options["database"] or database
    if not db:
        print("mailhub: history: no database (history.enabled is false; use --database)", file=err)
        return 64
    try:
        store = open_store(db, readonly=True)
    except StoreError as e:
        print(f"mailhub: {e}", file=err)
        return EX_UNAVAILABLE
    try:
        if options["queue_id"]:
            return _story(store, options["queue_id"], options["json"], out, err)
        return _list(store, options, now, out, err)
    except QueryError as e:
        print(f"mailhub: history: {e}", file=err)
        return 64
    except StoreError as e:
        print(f"mailhub: {e}", file=err)
        return EX_UNAVAILABLE
    except Exception as e:  # the database's own errors (locked, corrupt, server gone): one line
        print(f"mailhub: history database {db}: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=err)
        return EX_UNAVAILABLE
    finally:
        store.close()


def _list(store: Store, options: HistoryOptions, now: float, out: TextIO, err: TextIO) -> int:
    to = options["to"]
    filters = Filters(
        sender=options["from"],
        recipient=to if to and "@" in to else None,
        domain=to if to and "@" not in to else None,
        status=options["status"],
        client=options["client"],
        since=query.parse_time(options["since"], now) if options["since"] else None,
        until=query.parse_time(options["until"], now) if options["until"] else None,
    )
    messages, _ = query.list_messages(store, filters, int(options["limit"]))
    if not messages:
        print("mailhub: history: no message matches", file=err)
        return 1
    for m in messages:
        print(json.dumps(m, ensure_ascii=False, sort_keys=True) if options["json"] else format_message(m), file=out)
    return 0


def _story(store: Store, qid: str, as_json: bool, out: TextIO, err: TextIO) -> int:
    if len(qid) > 64:
        print("mailhub: history: queue id too long", file=err)
        return 64
    message = query.message_json(store, qid)
    events = query.story(store, qid)
    if message is None and not events:
        print(f"mailhub: history: no message {_plain(qid)}", file=err)
        return 1
    if as_json:
        print(json.dumps({"message": message, "events": events}, ensure_ascii=False, sort_keys=True, indent=1), file=out)
        return 0
    if message is not None:
        print(f"{qid}: {message['status']} from=<{_plain(message['sender'] or '')}> client={_plain(message['client'] or '-')}",
              file=out)
        for r in message["recipients"]:
            print(f"  to=<{_plain(r['address'])}> {r['status']} {_plain(r['last_status'])} {_plain(r['last_text'])}".rstrip(),
                  file=out)
    for e in events:
        print(format_event(e), file=out)
    return 0
