"""
The program of one local delivery process (C{python -m mailhub.delivery.localchild}).

Owns: L{main} and the loop it runs (L{_serve}): read the settings line,
build a L{mailhub.delivery.directory.Directory} and a
L{mailhub.delivery.local.LocalDelivery} from it, then answer each request
line with the outcomes of delivering it, one JSON line each
(L{outcome_to_json}).  The protocol is described in
L{mailhub.delivery.localproc}, whose pool starts these processes (and the
root supervisor of system mode, L{mailhub.delivery.supervisor}, its own).

Must not touch: the pool and restarts (L{mailhub.delivery.localproc}), the
Maildir code (L{mailhub.delivery.local}, L{mailhub.delivery.maildir}), the
spool (only the message named in a request is read).  Imports stay light:
no network or TLS machinery (each process would be about 10 MB bigger).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger

from mailhub.envelope import Outcome

__all__ = ["main", "outcome_to_json"]

log = Logger()


def outcome_to_json(o: Outcome) -> dict[str, Any]:
    """An outcome as a JSON object of an answer line (L{mailhub.delivery.localproc}'s protocol)."""
    return {"recipient": o.recipient, "kind": o.kind, "code": o.code, "status": o.status, "text": o.text}


def _serve(stdin: Any, stdout: Any) -> int:
    """
    Read the settings, then answer requests until stdin ends.  Every
    request is checked (L{mailhub.delivery.supervisor.check_request}); one that is
    not well-formed is answered C{{"id": N, "refused": WHY}}, and a line
    without a usable id ends this process (its parent starts another).
    With C{settings["spool"]} (a root process of the supervisor) the
    message must be the queue file named by the queue id, opened with
    L{mailhub.delivery.supervisor.open_queued}.
    """
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from mailhub.delivery.directory import Directory
    from mailhub.delivery.local import LocalDelivery
    from mailhub.delivery.supervisor import MAX_REQUEST_LINE, BadRequest, check_request, limit_open_files

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr, timeFormat=None)], redirectStandardIO=False)
    first = stdin.readline(MAX_REQUEST_LINE)
    if not first:
        return 0
    settings = json.loads(first)
    spool = settings.get("spool")
    if spool is not None:
        limit_open_files()
    directory = Directory(**settings["directory"])
    agent = LocalDelivery(
        directory, settings["hostname"], fsync=bool(settings["fsync"]), run=_direct,
        sync="syncfs" if settings.get("sync") == "syncfs" else "fsync",
    )

    def answer(data: dict[str, Any]) -> None:
        stdout.write(json.dumps(data).encode() + b"\n")
        stdout.flush()

    while line := stdin.readline(MAX_REQUEST_LINE + 1):
        try:
            if len(line) > MAX_REQUEST_LINE:
                raise BadRequest(f"request longer than {MAX_REQUEST_LINE} bytes")
            try:
                data = json.loads(line)
            except (ValueError, RecursionError):
                raise BadRequest("not JSON")
            request = check_request(data, spool["path"] if spool else None)
        except BadRequest as e:
            log.error("refused a request: {why}", why=str(e))
            if e.id is None:
                return 65  # EX_DATAERR: the parent sends nothing like this
            answer({"id": e.id, "refused": str(e)})
            continue
        outcomes = _deliver(agent, request, spool)
        answer({"id": request["id"], "outcomes": [outcome_to_json(o) for o in outcomes]})
    return 0


def _deliver(agent: Any, request: dict[str, Any], spool: dict[str, Any] | None) -> list[Outcome]:
    from mailhub.delivery.supervisor import open_queued

    addresses = request["addresses"]
    path = request["message_path"]
    fd = -1
    try:
        if spool is not None:
            try:
                fd = open_queued(spool["path"], int(spool["uid"]), request["queue_id"])
            except OSError as e:
                return [agent._os_error(a, e, "cannot read queued message") for a in addresses]
            path = f"/proc/self/fd/{fd}"
        return agent._deliver_all(
            request["queue_id"], request["arrival"], request["sender"], addresses, path, request["crlf"],
        )
    except Exception:  # _deliver_all answers per recipient; this is a safety net
        log.failure("local delivery of {queue_id} failed", queue_id=request["queue_id"])
        return [Outcome.temporary(a, "local delivery failed: internal error", 451, "4.3.0") for a in addresses]
    finally:
        if fd >= 0:
            os.close(fd)


def _direct(f: Any, *args: Any) -> Any:
    return f(*args)


def main(argv: Sequence[str] | None = None) -> int:
    """C{python -m mailhub.delivery.localchild}: a local delivery process (started by the daemon, not by hand)."""
    if os.isatty(0):
        print("mailhub.delivery.localchild: started by the mailhub daemon, not by hand", file=sys.stderr)
        return 64
    return _serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    sys.exit(main())
