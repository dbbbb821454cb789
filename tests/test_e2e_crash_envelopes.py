"""
End-to-end: the real daemon (C{twistd -n mailhub}) starts on a spool
holding queue files whose envelopes have a valid footer but fields of the
wrong type or range, next to good ones.  It starts, delivers the good
messages, moves each bad one to C{corrupt/} with a log line, and logs no
traceback.
"""

from __future__ import annotations

import json
import os

from daemon import CLEAN_EXIT, DOMAIN, Daemon, config_text, delivered_with, message, wait_for

from mailhub.envelope import Envelope, Recipient
from mailhub.queue.queuefile import FOOTER_SIZE, new_queue_id
from mailhub.queue.spool import Spool

BAD = {
    "next_attempt_null": lambda d: d.update(next_attempt=None),
    "attempts_text": lambda d: d.update(attempts="x"),
    "address_number": lambda d: d["recipients"][0].update(address=5),
    "arrival_text": lambda d: d.update(arrival="yesterday"),
    "esmtp_size_negative": lambda d: d["esmtp"].update(size=-1),
}


def queue_file(spool: Spool, qid: str, data: bytes, envelope: dict) -> None:
    """A queue file with a valid footer around whatever JSON C{envelope} holds."""
    raw = (json.dumps(envelope, sort_keys=True) + "\n").encode()
    footer = b"\n#mailhub-queue 2 %016x %08x\n" % (len(data), len(raw))
    assert len(footer) == FOOTER_SIZE
    with open(spool.message_path(qid), "wb") as f:
        f.write(data + raw + footer)


def test_the_daemon_starts_delivers_the_good_and_quarantines_the_bad(tmp_path):
    d = Daemon(tmp_path, config_text(fsync=False))
    spool = Spool(d.spool, fsync=False)
    now = 1_700_000_000.0
    good_ids = []
    for n in range(2):
        qid = new_queue_id(now + n)
        data = message(f"bob@{DOMAIN}", f"good{n}")
        env = Envelope(qid, "sender@client.test", [Recipient(f"bob@{DOMAIN}")], arrival=now, next_attempt=now,
                       esmtp={"size": len(data)})
        queue_file(spool, qid, data, json.loads(env.to_json()))
        good_ids.append(qid)
    bad_ids = {}
    for n, (name, spoil) in enumerate(BAD.items()):
        qid = new_queue_id(now + 10 + n)
        data = message(f"bob@{DOMAIN}", f"bad-{name}")
        fields = json.loads(Envelope(qid, "sender@client.test", [Recipient(f"bob@{DOMAIN}")], arrival=now,
                                     next_attempt=now, esmtp={"size": len(data)}).to_json())
        spoil(fields)
        queue_file(spool, qid, data, fields)
        bad_ids[name] = qid
    # a good queue file whose later envelope (envelopes/ID.json) is bad: both go
    qid = new_queue_id(now + 100)
    data = message(f"bob@{DOMAIN}", "bad-envelope-file")
    env = Envelope(qid, "sender@client.test", [Recipient(f"bob@{DOMAIN}")], arrival=now, next_attempt=now)
    queue_file(spool, qid, data, json.loads(env.to_json()))
    fields = json.loads(env.to_json())
    fields["recipients"][0]["state"] = "maybe"
    with open(spool.envelope_path(qid), "w") as f:
        json.dump(fields, f)
    bad_ids["envelope_file"] = qid

    d.start()
    try:
        for n in range(2):
            delivered_with(d, "bob", f"good{n}")
        corrupt = os.path.join(d.spool, "corrupt")
        wait_for(lambda: set(bad_ids.values()) <= set(os.listdir(corrupt)), 10, "the bad queue files in corrupt/")
        assert qid + ".json" in os.listdir(corrupt)
        wait_for(lambda: d.queued() == [], 10, "the good messages to leave the queue")
        log = d.log()
        for name, bad in bad_ids.items():
            assert f"spool: moved {os.path.join(os.path.abspath(d.spool), 'queue', bad)} to " in log, name
        assert "next_attempt must be a finite number" in log
        assert "attempts must be an integer" in log
        assert "recipients[0].address must be a string" in log
        assert "arrival must be a finite number" in log
        assert "esmtp.size must be between 0 and" in log
        assert "recipients[0].state must be one of" in log
        assert "Traceback" not in log and "TypeError" not in log
        assert not any(f"bad-{name}" in raw.decode("utf-8", "replace") for name in BAD
                       for raw in [open(os.path.join(d.maildir("bob"), "new", f), "rb").read()
                                   for f in os.listdir(os.path.join(d.maildir("bob"), "new"))])
    finally:
        assert d.stop() == CLEAN_EXIT, d.stderr()
