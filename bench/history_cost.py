#!/usr/bin/env python3
"""
The CPU cost of recording the message history, per message, measured
without a server: the mail events of one message as the daemon emits them
(connect, accepted, delivery, removed, disconnect), through the recorder's
observer (the reactor thread's share) and through the writer's work
(rows, one SQLite transaction per batch of 1000: the writer thread's
share), on a fresh database in a temporary directory.

Owns: nothing but its temporary directory.  Must not touch: mailhub's
code (it only imports and calls it).  The end-to-end comparison is
``bench/run.py --history on`` against ``--history off``; on a loaded
machine that one's noise is larger than this cost, so this script gives
the number that can be compared with the CPU per message of
docs/performance.rst's table.

Usage::

    python bench/history_cost.py [--messages 20000] [--cpu-ms 3.0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mailhub.history.recorder import Recorder  # noqa: E402
from mailhub.history.store import SQLiteStore  # noqa: E402


def message_events(i: int, t: float) -> list[dict]:
    qid = f"4Q{i:010X}"
    to = f"user{i % 50}@bench.example"
    base = {"log_namespace": "mailhub.mail", "log_level": None, "log_source": None}
    return [
        {**base, "mail_event": "connection", "client": "127.0.0.1", "listener": "smtp", "tls": False, "queue_id": "-",
         "log_time": t, "log_mail_text": "connect from [127.0.0.1] listener=smtp tls=False"},
        {**base, "mail_event": "accepted", "queue_id": qid, "sender": "from@bench.example", "from": "from@bench.example",
         "nrcpt": 1, "size": 4096, "client": "127.0.0.1", "proto": "ESMTP", "listener": "smtp", "user": "",
         "rcpts": [to], "log_time": t + 0.001,
         "log_mail_text": f"{qid}: accepted from=<from@bench.example> nrcpt=1 size=4096 client=[127.0.0.1] proto=ESMTP"},
        {**base, "mail_event": "delivery", "queue_id": qid, "to": to, "orig_to": to, "relay": "local", "delay": "0.01",
         "attempts": 1, "dsn": "2.0.0", "status": "sent", "text": "delivered to maildir", "code": 250, "remote_mta": "",
         "last_attempt": t + 0.01, "expired": False, "log_time": t + 0.01,
         "log_mail_text": f"{qid}: to=<{to}>, orig_to=<{to}>, relay=local, delay=0.01, attempts=1, dsn=2.0.0, "
                          "status=sent (delivered to maildir)"},
        {**base, "mail_event": "removed", "queue_id": qid, "log_time": t + 0.011, "log_mail_text": f"{qid}: removed"},
        {**base, "mail_event": "disconnect", "client": "127.0.0.1", "summary": "helo=1 mail=1 rcpt=1 data=1 quit=1",
         "commands": {"helo": 1}, "listener": "smtp", "queue_id": "-", "log_time": t + 0.012,
         "log_mail_text": "disconnect from [127.0.0.1] helo=1 mail=1 rcpt=1 data=1 quit=1"},
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--cpu-ms", type=float, default=3.0, help="server CPU ms per message to compare with")
    args = p.parse_args(argv)
    events = [e for i in range(args.messages) for e in message_events(i, 1.8e9 + i * 0.01)]
    with tempfile.TemporaryDirectory(prefix="mailhub-history-cost-") as tmp:
        store = SQLiteStore(os.path.join(tmp, "history.sqlite"))
        recorder = Recorder(store, reactor=None)  # observer and _write only: no service, no thread
        c0 = time.process_time()
        for e in events:
            recorder(e)
        observe = time.process_time() - c0
        pending = recorder._pending
        c0 = time.process_time()
        for start in range(0, len(pending), recorder.batch):
            recorder._write(pending[start : start + recorder.batch])
        write = time.process_time() - c0
        size = os.path.getsize(os.path.join(tmp, "history.sqlite")) + os.path.getsize(
            os.path.join(tmp, "history.sqlite-wal"))
        store.close()
    n = args.messages
    per = (observe + write) / n * 1e6
    print(f"messages: {n}, events: {len(events)}")
    print(f"reactor thread (observer): {observe / n * 1e6:.1f} us per message")
    print(f"writer thread (rows + SQLite): {write / n * 1e6:.1f} us per message")
    print(f"total: {per:.1f} us per message = {per / (args.cpu_ms * 10):.1f} % of {args.cpu_ms} ms CPU per message")
    print(f"database: {size / n:.0f} bytes per message")
    return 0


if __name__ == "__main__":
    sys.exit(main())
