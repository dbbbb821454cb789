"""
mailhub queue: the queue tools (Postfix's mailq, postcat -q, postqueue -f,
postsuper -d/-h/-H in one command).

Owns: the C{mailhub queue} sub-commands (L{QueueOptions}) and how the queue
is shown to an operator.  Listing and showing read the spool directly.
Changes (flush, delete, hold, release) go through the daemon's control
socket (C{SPOOL/control.sock}, see L{mailhub.control}) when the daemon
answers there, so the scheduler's in-memory state and the files agree;
with the daemon stopped they are made directly on the spool with
C{Spool.update} / C{Spool.remove} (atomic renames).

Must not touch: message bytes (never rewritten), the pickup area (only
listed), the network beyond the local control socket.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, TextIO

from twisted.python import usage

from . import Command, silence
from ..envelope import EnvelopeFormatError, PENDING
from ..pickup import list_pickup
from ..spool import QueueFileError, Spool, is_queue_id

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

    def parseArgs(self, queue_id: str) -> None:
        self.ids = [queue_id]


class CatOptions(Command):
    synopsis = "mailhub queue cat ID"
    longdesc = "Print a queued message exactly as it was received (its queue file also holds the envelope)."

    def parseArgs(self, queue_id: str) -> None:
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
        for r in entry.header.recipients if entry.header else ():
            lines.append(f"{indent}{r}")
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


def _direct(spool: Spool, command: str, queue_id: str, now: float) -> str | None:
    """
    Apply C{command} to one message on disk (daemon stopped).  Returns
    an error text, or C{None}.
    """
    if command == "delete":
        if not os.path.exists(spool.message_path(queue_id)):
            return "no such message"
        spool.remove(queue_id)
        spool.drain()  # the message file goes in the spool's remover thread
        return None
    env = spool.load(queue_id)
    if command == "hold":
        env.held = True
    elif command == "release":
        env.held = False
    elif command == "flush":
        if env.held:
            return HELD_NOTE
        if env.done:
            return None
        env.next_attempt = now
    spool.update(env)
    return None


_DONE = {"delete": "deleted", "hold": "on hold", "release": "released", "flush": "flushed"}
#: what to print instead of _DONE when the daemon answers with a status
#: (L{mailhub.control.ControlClient.ask}); not errors: the exit status is 0
_STATUS_TEXT = {
    ("delete", "pending"): "delete pending (being delivered now: removed when that attempt ends, without notices)",
    ("flush", "held"): "on hold, not flushed (release it first)",
}
#: _direct's answer for a flush of a held message: a note, not an error
HELD_NOTE = "held"


def _change(
    spool: Spool,
    command: str,
    ids: list[str],
    out: TextIO,
    err: TextIO,
    control: Callable[[str, str | None], tuple[str | None, str]] | None,
    now: float,
) -> int:
    status = EX_OK
    if command == "flush" and not ids:
        if control is not None:
            problem, _ = control("flush", None)
            if problem:
                err.write(f"{PROG}: flush: {problem}\n")
                return EX_TEMPFAIL
            out.write("flush requested\n")
            return EX_OK
        ids = [env.queue_id for env in spool if not env.held and not env.done]
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
                problem = _direct(spool, command, qid, now)
                if problem == HELD_NOTE:
                    problem, state = None, "held"
        except KeyError:
            problem = "no such message"
        except EnvelopeFormatError as e:
            problem = f"unreadable envelope: {e}"
        if problem:
            err.write(f"{PROG}: {qid}: {problem}\n")
            status = EX_NOINPUT if problem == "no such message" else EX_TEMPFAIL
        else:
            out.write(f"{qid}: {_STATUS_TEXT.get((command, state), _DONE[command])}\n")
    if command == "flush" and control is None and ids:
        out.write(
            f"{PROG}: the daemon is not running: these messages are due now and "
            "will be tried as soon as it starts\n"
        )
    return status


def _connect_control(spool_path: str) -> Callable[[str, str | None], tuple[str | None, str]] | None:
    """A control-channel client when the daemon answers on its socket, else C{None}."""
    path = os.path.join(spool_path, "control.sock")
    if not os.path.exists(path):
        return None
    try:
        from ..control import ControlClient
    except ImportError:
        return None
    try:
        return ControlClient(path).ask
    except OSError:
        return None  # stale socket: the daemon is not running


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
    now: float | None = None,
) -> int:
    """
    Run a parsed C{mailhub queue} command against C{target}: a
    L{mailhub.config.Config} or a spool directory path.  Returns a
    sysexits.h status.  A reader that goes away (C{mailhub queue list |
    head}) ends the command quietly with status 0, like Postfix's mailq.
    """
    out = out or sys.stdout
    try:
        status = _run_queue(options, target, out, err, now)
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
    now: float | None,
) -> int:
    err = err or sys.stderr
    spool_path = target.spool.path if hasattr(target, "spool") else str(target)
    command = options.subCommand or "list"
    sub = options.subOptions if options.subOptions is not None else ListOptions()
    if not os.path.isdir(os.path.join(spool_path, "envelopes")):
        err.write(f"{PROG}: no queue at {spool_path} (check spool.path in the configuration)\n")
        return EX_NOINPUT
    if os.path.isdir(os.path.join(spool_path, "new")) and _connect_control(spool_path) is None:
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
        ids = list(getattr(sub, "ids", []))
        if command == "delete" and sub["all"]:
            ids = spool.queue_ids()
        control = _connect_control(spool_path)
        return _change(spool, command, ids, out, err, control, time.time() if now is None else now)
    except PermissionError as e:
        err.write(f"{PROG}: cannot read the queue at {spool_path}: {e.strerror} (run as root or the mailhub user)\n")
        return EX_NOPERM


def main(argv: list[str] | None = None) -> None:
    """Stand-alone entry point (C{python -m mailhub.cli.queue}); C{mailhub queue} wires the same."""
    from ..config import ConfigError, find_config_file, load_config

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
