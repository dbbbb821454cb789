"""
mailhub-sendmail: the sendmail(1)-compatible submission command.

Owns: the command's entry point (L{main}, L{run}: the mode chosen by the
options, the last-resort error handling and its exit status) and the
submission of one message read from standard input into the pickup area
(L{mailhub.queue.pickupfile.write_pickup}); the daemon need not be
running.  Also installed as C{mailq} and C{newaliases} (the name it is
called by chooses the mode).  The pieces, each in its own module:

- L{mailhub.cli.sendmail_options}: the command line, exit codes, settings;
- L{mailhub.cli.sendmail_message}: header fix-ups, C{-t}, address checks;
- L{mailhub.cli.sendmail_bs}: C{-bs}, mailhub's own SMTP server on
  standard input and output, committing into the pickup area.

Hostile arguments (control characters in addresses or the full name) are
refused or sanitised; the command never ends in a traceback.

Must not touch: the queue itself (only the daemon's PickupService turns a
pickup file into a queued message), the network.  Exit codes follow
sysexits.h; see docs/sendmail.rst.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import BinaryIO, TextIO

from mailhub.address import AddressError
from mailhub.cli import silence
from mailhub.cli.sendmail_message import (
    compose_message,
    dedupe,
    gecos_name,
    has_control,
    login_name,
    qualify,
    split_addresses,
    stdin_lines,
)
from mailhub.cli.sendmail_options import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_NOUSER,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    HELP,
    PROG,
    Invocation,
    Settings,
    UsageError,
    load_settings,
    parse_args,
)
from mailhub.queue.pickupfile import MessageTooLarge, clean_fullname, write_pickup

__all__ = ["main", "run", "Progress"]


# -- submitting ------------------------------------------------------------------------------


def _errno_status(e: OSError) -> int:
    import errno

    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EIO, errno.ENOMEM):
        return EX_TEMPFAIL
    return EX_CANTCREAT


@dataclass
class Progress:
    """
    Where the current submission stands, for the last-resort error handler
    in L{run}: once a message is committed to the pickup area the command
    must report success whatever fails afterwards (the caller would
    otherwise send it again).
    """

    committed: bool = False


_CONTROL = "control character in the address"


def _submit(
    inv: Invocation, settings: Settings, stdin: BinaryIO, stderr: TextIO, progress: Progress | None = None
) -> int:
    if inv.sender is not None and has_control(inv.sender):
        stderr.write(f"{PROG}: invalid sender address {inv.sender!r}: {_CONTROL}\n")
        return EX_USAGE
    try:
        sender = "" if inv.sender in ("<>", "") else qualify(inv.sender or login_name(), settings.origin)
    except AddressError as e:
        stderr.write(f"{PROG}: invalid sender address {inv.sender!r}: {e}\n")
        return EX_USAGE
    if not inv.extract and not inv.recipients:
        stderr.write(f"{PROG}: no recipients given (use -t or list addresses)\n")
        return EX_USAGE
    for arg in inv.recipients:
        # One argument is one address or a comma-separated list, never a header.
        if has_control(arg):
            stderr.write(f"{PROG}: invalid recipient address {arg!r}: {_CONTROL}\n")
            return EX_NOUSER
    recipients = []
    for raw in split_addresses(inv.recipients) if inv.recipients else []:
        try:
            recipients.append(qualify(raw, settings.origin))
        except AddressError as e:
            stderr.write(f"{PROG}: invalid recipient address {raw!r}: {e}\n")
            return EX_NOUSER
    fullname = clean_fullname(inv.fullname if inv.fullname is not None else gecos_name())
    composed = compose_message(
        stdin_lines(stdin, inv.dots), sender, fullname, settings.hostname, settings.origin
    )
    if inv.extract:
        for raw in composed.header_recipients:
            try:
                recipients.append(qualify(raw, settings.origin))
            except AddressError as e:
                stderr.write(f"{PROG}: invalid recipient address {raw!r} in the message header: {e}\n")
                return EX_NOUSER
    if not recipients:
        stderr.write(f"{PROG}: no recipients found (no To, Cc or Bcc header and no address given)\n")
        return EX_USAGE
    try:
        name = write_pickup(
            settings.spool_path, sender, dedupe(recipients), composed.chunks, fullname, settings.max_size
        )
    except MessageTooLarge as e:
        stderr.write(f"{PROG}: {e}\n")
        return EX_DATAERR
    except OSError as e:
        stderr.write(f"{PROG}: cannot write to the pickup directory {settings.spool_path}/pickup: {e.strerror or e}\n")
        return _errno_status(e)
    if progress is not None:
        progress.committed = True
    if inv.verbose:
        stderr.write(f"{PROG}: queued as pickup file {name} for {', '.join(dedupe(recipients))}\n")
    return EX_OK


# -- entry point ------------------------------------------------------------------------------------


def _queue_command(args: list[str], settings: Settings, stdout: TextIO) -> int:
    from mailhub.cli.queue import QueueOptions, run_queue

    options = QueueOptions()
    options.parseOptions(args)
    return run_queue(options, settings.spool_path, out=stdout)


def _say(stderr: TextIO, line: str) -> None:
    """
    Write one line to stderr, never raising: when stderr is gone (a closed
    pipe) it is pointed at /dev/null so that the interpreter's final flush
    cannot fail and change the exit status.
    """
    try:
        stderr.write(line)
        stderr.flush()
    except (OSError, ValueError, AttributeError):
        silence(stderr)


def run(
    argv: list[str],
    stdin: BinaryIO,
    stdout: BinaryIO,
    stderr: TextIO,
    prog: str = "sendmail",
) -> int:
    """
    Run the command; return the exit status (sysexits.h).  Never raises
    (except SystemExit): an unexpected error is one line on stderr and
    EX_TEMPFAIL, so callers retry -- unless the message was already
    committed to the pickup area, then it is EX_OK (a retry would send it
    twice).
    """
    progress = Progress()
    try:
        return _run(argv, stdin, stdout, stderr, prog, progress)
    except (Exception, KeyboardInterrupt) as e:
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
        what = " ".join(what.split())
        if progress.committed:
            _say(stderr, f"{PROG}: warning: {what} (the message was queued)\n")
            return EX_OK
        _say(stderr, f"{PROG}: internal error, message not sent, try again later: {what}\n")
        return EX_TEMPFAIL


def _run(
    argv: list[str],
    stdin: BinaryIO,
    stdout: BinaryIO,
    stderr: TextIO,
    prog: str,
    progress: Progress,
) -> int:
    if argv and argv[0] in ("--help", "-h"):
        stdout.write(HELP.encode("utf-8"))
        stdout.flush()
        return EX_OK
    if argv and argv[0] == "--version":
        from mailhub import __version__

        stdout.write(f"mailhub-sendmail (mailhub {__version__})\n".encode())
        stdout.flush()
        return EX_OK
    try:
        inv = parse_args(argv, prog)
    except UsageError as e:
        stderr.write(f"{PROG}: {e}\n")
        return EX_USAGE
    if inv.mode == "i":
        stderr.write(f"{PROG}: nothing to do: mailhub re-reads the aliases file when it changes\n")
        return EX_OK
    try:
        settings = load_settings(inv.config)
    except Exception as e:  # ConfigError, with a one-line message
        stderr.write(f"{PROG}: configuration error: {e}\n")
        return EX_CONFIG
    if inv.mode in ("p", "q"):
        import io

        text = io.TextIOWrapper(stdout, encoding="utf-8", write_through=True)
        try:
            args = ["list"] if inv.mode == "p" else ["flush"] + ([inv.queue_id] if inv.queue_id else [])
            return _queue_command(args, settings, text)
        finally:
            text.detach()
    if inv.mode == "s":
        from mailhub.cli.sendmail_bs import serve_stdio

        fullname = inv.fullname if inv.fullname is not None else gecos_name()
        return serve_stdio(settings, fullname, stdin, stdout, progress)
    return _submit(inv, settings, stdin, stderr, progress)


def main(argv: list[str] | None = None) -> None:
    """Console script C{mailhub-sendmail}; also install it as sendmail, mailq, newaliases."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "sendmail"
    if argv is None:
        argv = sys.argv[1:]
    # A closed standard descriptor (cron, "2>&-") is None here; like Postfix's
    # sendmail, use /dev/null rather than fail.
    stdin = sys.stdin.buffer if sys.stdin is not None else open(os.devnull, "rb")
    stdout = sys.stdout.buffer if sys.stdout is not None else open(os.devnull, "wb")
    stderr = sys.stderr if sys.stderr is not None else open(os.devnull, "w")
    sys.exit(run(argv, stdin, stdout, stderr, prog))


if __name__ == "__main__":
    main()
