"""
mailhub queue: the queue tools (Postfix's mailq, postcat -q, postqueue -f,
postsuper -d/-h/-H in one command).

Owns: the C{mailhub queue} sub-commands (L{QueueOptions}) and how the queue
is shown to an operator.  Listing and showing read the spool directly.
Changes (flush, delete, hold, release) go through the daemon's control
socket (C{SPOOL/control.sock}, see L{mailhub.queue.control}) when the daemon
answers there, so the scheduler's in-memory state and the files agree.
With the daemon stopped (no socket, or a stale one that refuses
connections) C{delete}, C{hold} and C{release} are made directly on the
spool with C{Spool.update} / C{Spool.remove} (atomic renames), as
Postfix's postsuper does; C{flush} needs the daemon and says "mail system
is down", as Postfix's postqueue does.  A socket that is there but cannot
be used (permission, no answer) is an error for every change: a daemon
may be running, and editing its files behind its back is not safe.

Must not touch: message bytes (never rewritten), the network beyond the
local control socket.  In the pickup area only C{delete --all} removes
files (the ones the listing shows).
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from twisted.python import usage

from mailhub.cli import Command, silence
from mailhub.envelope import PENDING, EnvelopeFormatError
from mailhub.queue.pickupfile import list_pickup, pickup_dirs
from mailhub.queue.queuefile import QueueFileError, is_queue_id
from mailhub.queue.spool import Spool
from mailhub.queue.status import HELD, REMOVE_PENDING

__all__ = ["QueueOptions", "run_queue", "main"]

PROG = "mailhub queue"
EX_OK = 0
EX_USAGE = 64
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_NOPERM = 77


class _IdsOptions(Command):
    """A sub-command taking one or more queue ids."""

    ids: list[str]

    def parseArgs(self, *ids: str) -> None:
        if not ids:
            raise usage.UsageError("give at least one queue id")
        self.ids = list(ids)


class ListOptions(Command):
    synopsis = "mailhub queue list"
    longdesc = 'List queued messages like mailq: "!" after the id marks a held message.'


class ShowOptions(Command):
    synopsis = "mailhub queue show ID"
    longdesc = "Print a message's envelope and its header."

    def parseArgs(self, queue_id: str) -> None:  # type: ignore[override]  # usage.Options passes the positional arguments
        self.ids = [queue_id]


class CatOptions(Command):
    synopsis = "mailhub queue cat ID"
    longdesc = "Print a queued message exactly as it was received (its queue file also holds the envelope)."

    def parseArgs(self, queue_id: str) -> None:  # type: ignore[override]  # usage.Options passes the positional arguments
        self.ids = [queue_id]


class FlushOptions(Command):
    synopsis = "mailhub queue flush [ID...]"
    longdesc = "Try deferred messages (all, or the ones named) now."

    def parseArgs(self, *ids: str) -> None:
        self.ids = list(ids)


class DeleteOptions(_IdsOptions):
    synopsis = "mailhub queue delete ID... | --all"
    optFlags = [["all", None, "delete every queued message"]]

    def parseArgs(self, *ids: str) -> None:
        self.ids = list(ids)

    def postOptions(self) -> None:
        if self["all"] and self.ids:
            raise usage.UsageError("give queue ids or --all, not both")
        if not self["all"] and not self.ids:
            raise usage.UsageError("give at least one queue id, or --all")


class HoldOptions(_IdsOptions):
    synopsis = "mailhub queue hold ID..."
    longdesc = "Put messages on hold: the scheduler skips them until released."


class ReleaseOptions(_IdsOptions):
    synopsis = "mailhub queue release ID..."
    longdesc = "Release held messages."


class QueueOptions(Command):
    """C{mailhub queue list|show ID|cat ID|flush [ID]|delete ID|--all|hold ID|release ID}."""

    synopsis = "mailhub queue [list|show ID|cat ID|flush [ID...]|delete ID...|delete --all|hold ID...|release ID...]"
    subCommands = [
        ["list", None, ListOptions, "list the queue (like mailq)"],
        ["show", None, ShowOptions, "show one message's envelope and header"],
        ["cat", None, CatOptions, "print one message as received"],
        ["flush", None, FlushOptions, "retry deferred messages now"],
        ["delete", None, DeleteOptions, "remove messages from the queue"],
        ["hold", None, HoldOptions, "put messages on hold"],
        ["release", None, ReleaseOptions, "release held messages"],
    ]
    defaultSubCommand = "list"


# -- showing ----------------------------------------------------------------------


def _when(t: float) -> str:
    return time.strftime("%a %b %e %H:%M:%S", time.localtime(t))


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t)) if t else "-"


def list_queue(spool: Spool, out: TextIO) -> int:
    """Write a mailq-like listing; return the exit status."""
    header = "-Queue ID-        --Size-- ----Arrival Time---- -Sender/Recipient-------"
    indent = " " * 49
    lines: list[str] = []
    total = 0
    count = 0
    for env in spool:
        try:
            with spool.open_message(env.queue_id) as f:
                size = f.length
        except (OSError, ValueError):
            size = 0
        total += size
        count += 1
        mark = "!" if env.held else " "
        sender = env.sender or "MAILER-DAEMON"
        lines.append(f"{env.queue_id}{mark}{size:>8} {_when(env.arrival):20}  {sender}")
        for r in env.recipients:
            if r.last_text and r.state == PENDING:
                # a server's reply already says "host X said: 451 4.2.0 ..."; a
                # connection that failed has no code (Postfix: just the reason)
                detail = r.last_text if r.replied or not r.last_code else " ".join(
                    x for x in (str(r.last_code), r.last_status, r.last_text) if x)
                lines.append(f"{indent}({detail})")
            state = "" if r.state == PENDING else f" [{r.state}]"
            lines.append(f"{indent}{r.address}{state}")
        lines.append("")
    for entry in list_pickup(spool.path):
        total += entry.size
        count += 1
        sender = (entry.header.sender or "MAILER-DAEMON") if entry.header else "(unreadable pickup file)"
        lines.append(f"{'pickup':17} {entry.size:>8} {_when(entry.mtime):20}  {sender}")
        lines.append(f"{indent}(waiting for the daemon: pickup/new/{entry.name}, uid {entry.uid})")
        for rcpt in entry.header.recipients if entry.header else ():
            lines.append(f"{indent}{rcpt}")
        lines.append("")
    if not count:
        out.write("Mail queue is empty\n")
        return EX_OK
    out.write(header + "\n")
    out.write("\n".join(lines) + "\n")
    kb = (total + 1023) // 1024
    out.write(f"-- {kb} Kbytes in {count} Request{'s' if count != 1 else ''}.\n")
    return EX_OK


def cat_message(spool: Spool, queue_id: str, out: TextIO) -> int:
    """Write the message's bytes as received (to C{out.buffer} when there is one)."""
    with spool.open_message(queue_id) as f:
        binary = getattr(out, "buffer", None)
        if binary is not None:
            out.flush()
        while chunk := f.read(65536):
            if binary is not None:
                binary.write(chunk)
            else:
                out.write(chunk.decode("utf-8", "surrogateescape"))
    return EX_OK


def show_message(spool: Spool, queue_id: str, out: TextIO) -> int:
    env = spool.load(queue_id)
    out.write(f"queue_id: {env.queue_id}\n")
    out.write(f"sender: <{env.sender}>\n")
    out.write(f"arrival: {_iso(env.arrival)}\n")
    out.write(f"next_attempt: {_iso(env.next_attempt)}\n")
    out.write(f"attempts: {env.attempts}\n")
    out.write(f"held: {'yes' if env.held else 'no'}\n")
    if env.client:
        out.write(f"client: {json.dumps(env.client, sort_keys=True, ensure_ascii=False)}\n")
    if env.esmtp:
        out.write(f"esmtp: {json.dumps(env.esmtp, sort_keys=True, ensure_ascii=False)}\n")
    for r in env.recipients:
        extra = f" (original {r.original})" if r.original != r.address else ""
        last = ""
        if r.last_code or r.last_text:
            last = " last=" + " ".join(x for x in (str(r.last_code or ""), r.last_status, r.last_text) if x)
        out.write(f"recipient: {r.address}{extra} state={r.state} attempts={r.attempts}{last}\n")
    out.write("--- message header ---\n")
    with spool.open_message(queue_id) as f:
        size = 0
        while size < 1024 * 1024:
            line = f.readline(65536)
            if not line or line in (b"\r\n", b"\n"):
                break
            size += len(line)
            out.write(line.decode("utf-8", "replace").rstrip("\r\n") + "\n")
    return EX_OK


# -- changing ----------------------------------------------------------------------------


def _direct(spool: Spool, command: str, queue_id: str) -> str | None:
    """
    Apply C{command} (delete, hold, release) to one message on disk
    (daemon stopped).  Returns an error text, or C{None}.
    """
    if command == "delete":
        if not os.path.exists(spool.message_path(queue_id)):
            return "no such message"
        spool.remove(queue_id)
        spool.drain()  # the message file goes in the spool's remover thread
        return None
    env = spool.load(queue_id)
    env.held = command == "hold"
    spool.update(env)
    return None


_DONE = {"delete": "deleted", "hold": "on hold", "release": "released", "flush": "flushed"}
#: what to print instead of _DONE when the daemon answers with a status
#: (L{mailhub.queue.control.ControlClient.ask}); not errors: the exit status is 0
_STATUS_TEXT = {
    ("delete", REMOVE_PENDING): "delete pending (being delivered now: removed when that attempt ends, without notices)",
    ("flush", HELD): "on hold, not flushed (release it first)",
}

Control = Callable[[str, "str | None"], "tuple[str | None, str]"]


class _Lost(Exception):
    """The control connection failed in the middle of a command."""


def _asking(control: Control) -> Control:
    """C{control}, with a failure of the connection turned into L{_Lost}."""

    def ask(command: str, queue_id: str | None) -> tuple[str | None, str]:
        try:
            return control(command, queue_id)
        except (OSError, ValueError) as e:  # ConnectionError, timeout, a garbled answer
            raise _Lost(getattr(e, "strerror", None) or str(e) or type(e).__name__)

    return ask


def _change(
    spool: Spool,
    command: str,
    ids: list[str],
    out: TextIO,
    err: TextIO,
    control: Control | None,
) -> int:
    status = EX_OK
    if command == "flush" and not ids:
        assert control is not None
        problem, _ = control("flush", None)
        if problem:
            err.write(f"{PROG}: flush: {problem}\n")
            return EX_TEMPFAIL
        out.write("flush requested\n")
        return EX_OK
    for qid in ids:
        if not is_queue_id(qid):
            err.write(f"{PROG}: {qid}: not a queue id\n")
            status = EX_USAGE
            continue
        state = ""
        try:
            if control is not None:
                problem, state = control(command, qid)
            else:
                problem = _direct(spool, command, qid)
        except KeyError:
            problem = "no such message"
        except EnvelopeFormatError as e:
            problem = f"unreadable envelope: {e}"
        if problem:
            err.write(f"{PROG}: {qid}: {problem}\n")
            status = EX_NOINPUT if problem == "no such message" else EX_TEMPFAIL
        else:
            out.write(f"{qid}: {_STATUS_TEXT.get((command, state), _DONE[command])}\n")
    return status


def _delete_pickup(spool: Spool, out: TextIO, err: TextIO) -> int:
    """
    Remove the files waiting in the pickup area that the listing shows
    (regular files of C{pickup/new/}); part of C{delete --all}.
    """
    status = EX_OK
    new_dir = pickup_dirs(spool.path)[1]
    for entry in list_pickup(spool.path):
        try:
            os.unlink(os.path.join(new_dir, entry.name))
        except FileNotFoundError:
            continue  # picked up meanwhile: it is in the queue now
        except OSError as e:
            err.write(f"{PROG}: pickup/new/{entry.name}: cannot delete: {e.strerror or e}\n")
            status = EX_NOPERM if e.errno in (errno.EACCES, errno.EPERM) else EX_TEMPFAIL
            continue
        out.write(f"pickup/new/{entry.name}: deleted\n")
    return status


class _Daemon:
    """
    What the control socket says about the daemon: C{client} when it
    answers; else C{problem} is C{None} when no daemon runs (no socket, or
    a stale one refusing connections) or says why the socket cannot be used.
    """

    def __init__(self, spool_path: str) -> None:
        from mailhub.queue.control import ControlClient, socket_path

        self.path = socket_path(spool_path)
        self.client: ControlClient | None = None
        self.problem: str | None = None
        try:
            self.client = ControlClient(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            pass  # no daemon: no socket, or one left by a daemon that died
        except OSError as e:
            self.problem = e.strerror or str(e)

    @property
    def down(self) -> bool:
        return self.client is None and self.problem is None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
def _convert(spool_path: str, err: TextIO) -> int:
    """
    Convert a spool of the first layout (L{Spool.migrate}), as its owner
    only: files made by root would be unreadable to the daemon's user.
    """
    if os.geteuid() != os.stat(spool_path).st_uid:
        err.write(
            f"{PROG}: the queue at {spool_path} is in the layout of an earlier mailhub version; "
            "start the daemon, or run this as the spool's owner, to convert it\n"
        )
        return EX_TEMPFAIL
    try:
        Spool(spool_path).migrate(blocking=False)
    except BlockingIOError:
        pass  # the daemon is converting it right now: list what is there
    except OSError as e:
        err.write(f"{PROG}: cannot convert the queue at {spool_path}: {e.strerror or e}\n")
        return EX_TEMPFAIL
    return EX_OK


def run_queue(
    options: QueueOptions,
    target: Any,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """
    Run a parsed C{mailhub queue} command against C{target}: a
    L{mailhub.config.Config} or a spool directory path.  Returns a
    sysexits.h status.  A reader that goes away (C{mailhub queue list |
    head}) ends the command quietly with status 0, like Postfix's mailq.
    """
    out = out or sys.stdout
    try:
        status = _run_queue(options, target, out, err)
        out.flush()  # a closed pipe shows here, not in the interpreter's final flush
        return status
    except BrokenPipeError:
        return _reader_gone(out)


def _reader_gone(out: TextIO) -> int:
    """The reader of our output has gone (C{mailhub queue list | head}): quietly done."""
    silence(out)
    return EX_OK


def _run_queue(
    options: QueueOptions,
    target: Any,
    out: TextIO,
    err: TextIO | None,
) -> int:
    err = err or sys.stderr
    spool_path = target.spool.path if hasattr(target, "spool") else str(target)
    command = options.subCommand or "list"
    sub: Any = options.subOptions if options.subOptions is not None else ListOptions()  # one of the Command classes above
    if not os.path.isdir(os.path.join(spool_path, "envelopes")):
        err.write(f"{PROG}: no queue at {spool_path} (check spool.path in the configuration)\n")
        return EX_NOINPUT
    if os.path.isdir(os.path.join(spool_path, "new")):
        daemon = _Daemon(spool_path)
        daemon.close()
        if daemon.down:
            # A queue from before queue files, and no daemon to convert it.
            status = _convert(spool_path, err)
            if status != EX_OK:
                return status
    try:
        spool = Spool(spool_path)
        if command == "list":
            return list_queue(spool, out)
        if command in ("show", "cat"):
            qid = sub.ids[0]
            try:
                return (show_message if command == "show" else cat_message)(spool, qid, out)
            except (KeyError, FileNotFoundError):
                err.write(f"{PROG}: {qid}: no such message\n")
                return EX_NOINPUT
            except EnvelopeFormatError as e:
                err.write(f"{PROG}: {qid}: unreadable envelope: {e}\n")
                return EX_NOINPUT
            except QueueFileError as e:
                err.write(f"{PROG}: {qid}: unreadable queue file: {e}\n")
                return EX_NOINPUT
        return _change_with_daemon(spool, command, sub, out, err)
    except PermissionError as e:
        err.write(f"{PROG}: cannot read the queue at {spool_path}: {e.strerror} (run as root or the mailhub user)\n")
        return EX_NOPERM


def _change_with_daemon(spool: Spool, command: str, sub: Any, out: TextIO, err: TextIO) -> int:
    """A change (flush, delete, hold, release): through the daemon, or on the files when it is down."""
    daemon = _Daemon(spool.path)
    try:
        if daemon.problem is not None:
            err.write(f"{PROG}: cannot reach the daemon on {daemon.path}: {daemon.problem}\n")
            return EX_UNAVAILABLE
        if daemon.down and command == "flush":
            err.write(f"{PROG}: mail system is down (no daemon on {daemon.path})\n")
            return EX_UNAVAILABLE
        control = _asking(daemon.client.ask) if daemon.client is not None else None
        ids = list(getattr(sub, "ids", []))
        delete_all = command == "delete" and sub["all"]
        if delete_all:
            ids = spool.queue_ids()
        try:
            status = _change(spool, command, ids, out, err, control)
        except _Lost as e:
            err.write(f"{PROG}: lost the connection to the daemon on {daemon.path}: {e} (the change may be incomplete)\n")
            return EX_TEMPFAIL
        if delete_all:
            status = _delete_pickup(spool, out, err) or status
        return status
    finally:
        daemon.close()


def main(argv: list[str] | None = None) -> None:
    """Stand-alone entry point (C{python -m mailhub.cli.queue}); C{mailhub queue} wires the same."""
    from mailhub.config import ConfigError, find_config_file, load_config

    options = QueueOptions()
    args = sys.argv[1:] if argv is None else argv
    config_file = None
    if len(args) >= 2 and args[0] in ("-C", "--config"):
        config_file, args = args[1], args[2:]
    try:
        options.parseOptions(args)
    except usage.UsageError as e:
        sys.stderr.write(f"{PROG}: {e}\n{options}")
        sys.exit(EX_USAGE)
    try:
        config = load_config(find_config_file(config_file))
    except ConfigError as e:
        sys.stderr.write(f"{PROG}: configuration error: {e}\n")
        sys.exit(78)
    sys.exit(run_queue(options, config))


if __name__ == "__main__":
    main()
