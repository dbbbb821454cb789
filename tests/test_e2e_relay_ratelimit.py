"""
End to end: the relay's per-destination rate limit
(C{limits.domain_messages_per_sec}) in a real daemon relaying to a real
receiver (Postfix's smtp-sink on 127.0.0.1).  A burst of messages to one
domain is spread over about N/limit seconds -- the recipients over the
limit wait for the next window, not for the retry backoff
(C{relay.min_backoff} is a minute here) -- and every message is
delivered, each at its first attempt, with "rate-limited" log lines and
neither a "deferred" line nor a notice.
"""

from __future__ import annotations

import os

from daemon import Daemon, message, wait_for
from peers import Sink, free_port

N = 8
PER_SEC = 2


def test_burst_to_one_domain_is_spread_and_all_delivered(tmp_path):
    sink = Sink(tmp_path / "sink", free_port())
    d = Daemon(tmp_path, f"""
[server]
hostname = "mx.example.test"
smtp = ["tcp:0:interface=127.0.0.1"]
trusted_networks = ["127.0.0.1/32"]

[spool]
path = "spool"
fsync = false

[local]
domains = ["example.test"]
mailboxes = "mailboxes"
users = ["alice"]

[relay]
min_backoff = 60
max_backoff = 120
connect_timeout = 5

[relay.routes]
"sink.test" = "[127.0.0.1]:{sink.port}"

[limits]
domain_messages_per_sec = {PER_SEC}
""").start()
    try:
        with d.smtp() as s:
            s.ehlo()
            for i in range(N):
                s.sendmail("alice@example.test", [f"u{i}@sink.test"], message(f"u{i}@sink.test", f"burst{i}"))
        def complete() -> list[str] | None:  # smtp-sink writes each dump as the data arrives
            names = sorted(os.listdir(sink.dump))
            done = len(names) == N and all((sink.dump / n).read_bytes().endswith(b"last line\n\n") for n in names)
            return names if done else None

        names = wait_for(complete, 30, f"smtp-sink to receive {N} messages")
        times = sorted(os.stat(sink.dump / n).st_mtime for n in names)
        spread = times[-1] - times[0]
        # PER_SEC a second: N messages need about N/PER_SEC - 1 seconds after the first
        assert N / PER_SEC - 1 - 0.5 <= spread <= N / PER_SEC + 5, times
        bodies = b"".join(sink.dumps())
        assert all(f"<burst{i}@client.test>".encode() in bodies for i in range(N))
        log = wait_for(lambda: d.log().count("status=sent") == N and d.log(), 10, "the sent lines")
        sent = [line for line in log.splitlines() if "status=sent" in line]
        assert all("attempts=1," in line for line in sent), sent
        assert "status=rate-limited (rate limited: Error: too many messages to this domain (more than 2 per second)" \
               in log
        assert "next try in 1s" in log
        assert "NOQUEUE: rate limit: RELAY to sink.test: 450 4.7.1" in log
        assert "status=deferred" not in log and "status=bounced" not in log
        assert d.queued() == []
    finally:
        d.stop()
        sink.stop()
    assert "Traceback" not in d.log(), d.log()
