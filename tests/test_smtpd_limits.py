"""
In-memory tests of mailhub.smtp.server's limits and flow control: the hop count
(mail loops), per-request deadline and minimum data rate, the soft error
limit's delay, flow control as a streaming producer, half-close, long
MAIL/RCPT lines, linear-time command parsing, and the mail events the
metrics read.  StringTransport + task.Clock; exact replies.
"""

from __future__ import annotations

import os

import pytest
from smtpharness import FOREIGN, GO_AHEAD, GREETING, HOST, MAIL_OK, OK, RCPT_OK, Client, queued_id
from smtpharness import Harness as _Harness
from twisted.logger import globalLogPublisher

from mailhub.smtp import server as smtpd
from mailhub.smtp.settings import SMTPSettings

BYE = "221 2.0.0 Bye\r\n"
HOPS = "554 5.4.6 Too many hops\r\n"
TIMEOUT = f"421 4.4.2 {HOST} Error: timeout exceeded\r\n"
UNKNOWN = "500 5.5.2 Error: command not recognized\r\n"
TOO_LONG = "500 5.5.2 Error: line too long\r\n"
START = "MAIL FROM:<a@elsewhere.test>\r\nRCPT TO:<alice@example.com>\r\n"


class Harness(_Harness):
    """ServerConfig fields as keywords; factory_kw for the limits under test."""

    def __init__(self, tmp_path, factory_kw: dict | None = None, **config) -> None:
        super().__init__(tmp_path, **config)
        self.serve(**(factory_kw or {}))

    def ehlo(self, ip: str = FOREIGN) -> Client:
        c = self.connect(ip)
        assert c.greeting == GREETING
        assert c.send("EHLO client.test\r\n").startswith(f"250-{HOST}\r\n")
        return c


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


# -- 1. hop count (mail loops) -----------------------------------------------------------------


def headers(n: int, name: str = "Received") -> bytes:
    return b"".join(b"%s: from hop%d.test by x.test; Tue, 14 Nov 2023 22:13:20 +0000\r\n" % (name.encode(), i)
                    for i in range(n))


@pytest.mark.parametrize(
    "message, reply",
    [
        (headers(49) + b"Subject: x\r\n\r\nbody\r\n", "queued"),  # 50 with ours: the limit
        (headers(50) + b"Subject: x\r\n\r\nbody\r\n", HOPS),
        (headers(20) + headers(30, "rEcEiVeD") + b"\r\n", HOPS),  # field names are case-insensitive
        (b"Subject: x\r\n" + headers(60), HOPS),  # a message that is all headers
        (headers(10) + b"Subject: x\r\n\r\n" + headers(60), "queued"),  # in the body: not headers
        (b"\r\n" + headers(60), "queued"),  # no header section at all
        (headers(1) + b"\tcontinued\r\n" * 60 + b"X-Received: a\r\n" * 60 + b"\r\n", "queued"),
    ],
)
def test_hop_limit_data(h, message, reply):
    c = h.ehlo()
    assert c.send(START + "DATA\r\n") == MAIL_OK + RCPT_OK + GO_AHEAD
    out = c.send(message + b".\r\n")
    if reply == "queued":
        qid = queued_id(out)
        assert h.body(qid) == message
    else:
        assert out == reply
        assert h.queued == [] and h.spool.queue_ids() == []
    assert c.send("NOOP\r\n") == OK  # the session goes on


def test_hop_limit_split_anywhere(tmp_path):
    """Field names and the header end split across reads, down to one byte per read."""
    h = Harness(tmp_path, max_errors=10000, factory_kw={"max_hops": 3, "soft_error_limit": 0})
    loop = b"Received: a\r\nreceived: b\r\nRECEIVED: c\r\n\r\nReceived: body\r\n"
    fine = b"Received: a\r\nreceived: b\r\n\r\nReceived: body\r\nReceived: c\r\n"
    c = h.ehlo()
    for message, expected in ((loop, HOPS), (fine, None)):
        for i in range(len(message) + 1):
            assert c.send(START + "DATA\r\n") == MAIL_OK + RCPT_OK + GO_AHEAD
            out = c.send(message[:i]) + c.send(message[i:] + b".\r\n")
            if expected:
                assert out == expected, i
            else:
                queued_id(out)
        assert c.send(START + "DATA\r\n") == MAIL_OK + RCPT_OK + GO_AHEAD
        out = "".join(c.send(bytes([b])) for b in message + b".\r\n")
        if expected:
            assert out == expected
        else:
            queued_id(out)


def test_hop_limit_bdat(tmp_path, events):
    h = Harness(tmp_path, factory_kw={"max_hops": 5})
    c = h.ehlo()
    message = headers(5) + b"\r\nbody\r\n"
    assert c.send(START) == MAIL_OK + RCPT_OK
    assert c.send(b"BDAT 100\r\n" + message[:100]) == "250 2.0.0 Ok: 100 octets received\r\n"
    rest = message[100:]
    assert c.send(b"BDAT %d LAST\r\n" % len(rest) + rest) == HOPS
    [ev] = [e for e in events if e.get("mail_event") == "reject"]
    assert (ev["enhanced"], ev["reason"], ev["hops"]) == ("5.4.6", "too_many_hops", 5)
    # Bare LF line ends (BDAT takes bytes as they are) are understood too.
    lf = b"Received: a\nReceived: b\nReceived: c\nReceived: d\nReceived: e\n\nbody\n"
    assert c.send(START) == MAIL_OK + RCPT_OK
    assert c.send(b"BDAT %d LAST\r\n" % len(lf) + lf) == HOPS
    ok = headers(4) + b"\r\nbody\r\n"
    assert c.send(START) == MAIL_OK + RCPT_OK
    queued_id(c.send(b"BDAT %d LAST\r\n" % len(ok) + ok))
    assert len(h.queued) == 1


def test_hop_limit_counts_only_the_header_section(tmp_path):
    """Received: lines after the first empty line are body, even when the body has empty lines of its own."""
    h = Harness(tmp_path, factory_kw={"max_hops": 3})
    c = h.ehlo()
    crlf = b"Received: a\r\nReceived: b\r\n\r\nReceived: c\r\n\r\nReceived: d\r\n\r\n"
    assert c.send(START + "DATA\r\n") == MAIL_OK + RCPT_OK + GO_AHEAD
    queued_id(c.send(crlf + b".\r\n"))
    lf = b"Received: a\nReceived: b\n\nReceived: c\n\nReceived: d\n"  # BDAT: bare LF as sent
    assert c.send(START) == MAIL_OK + RCPT_OK
    queued_id(c.send(b"BDAT %d LAST\r\n" % len(lf) + lf))
    assert len(h.queued) == 2


def test_hop_limit_disabled(tmp_path):
    h = Harness(tmp_path, factory_kw={"max_hops": 0})
    c = h.ehlo()
    assert c.send(START + "DATA\r\n") == MAIL_OK + RCPT_OK + GO_AHEAD
    queued_id(c.send(headers(200) + b"\r\n.\r\n"))


# -- 4. per-request deadline, minimum data rate ---------------------------------------------------


def test_slow_command_line_times_out(h):
    """One byte a second never completes a line: 421 after `timeout`, although bytes kept coming."""
    c = h.ehlo()
    for i in range(299):
        h.clock.advance(1)
        assert c.send(b"N") == "", i
    assert not c.closed
    h.clock.advance(1)
    assert c.read() == TIMEOUT and c.closed


def test_complete_lines_reset_the_timer(h):
    c = h.ehlo()
    for _ in range(5):
        h.clock.advance(250)
        assert c.send(b"NOOP\r\n") == OK
    h.clock.advance(250)
    assert c.send(b"NO") == ""
    h.clock.advance(49)
    assert c.send(b"OP\r\n") == OK  # completed in time
    h.clock.advance(299)
    assert not c.closed
    h.clock.advance(1)
    assert c.read() == TIMEOUT


def test_data_below_minimum_rate_times_out(h):
    """DATA at 1 byte/s (minimum 500 byte/s): each byte buys 2 ms, so about `timeout` later it is over."""
    c = h.ehlo()
    assert c.send(START + "DATA\r\n") == MAIL_OK + RCPT_OK + GO_AHEAD
    seconds = 0
    while not c.closed and seconds < 400:
        assert c.send(b"x") == ""
        h.clock.advance(1)
        seconds += 1
    assert c.read() == TIMEOUT
    assert 300 <= seconds <= 302
    assert h.queued == []


def test_bdat_below_minimum_rate_times_out(h):
    c = h.ehlo()
    assert c.send(START + "BDAT 100000 LAST\r\n") == MAIL_OK + RCPT_OK
    seconds = 0
    while not c.closed and seconds < 400:
        c.send(b"x" * 100)  # 100 byte/s
        h.clock.advance(1)
        seconds += 1
    assert c.read() == TIMEOUT
    assert 300 <= seconds <= 380


def test_data_at_a_decent_rate_may_take_longer_than_timeout(h):
    """1000 byte/s for 900 s (three times `timeout`): never times out."""
    c = h.ehlo()
    assert c.send(START + "DATA\r\n") == MAIL_OK + RCPT_OK + GO_AHEAD
    line = b"y" * 998 + b"\r\n"
    for _ in range(900):
        assert c.send(line) == ""
        h.clock.advance(1)
    assert not c.closed
    qid = queued_id(c.send(b".\r\n"))
    assert len(h.body(qid)) == 900 * 1000
    # After the message the client again has the whole timeout for a command.
    h.clock.advance(299)
    assert c.send(b"NOOP\r\n") == OK


def test_deadline_extension_is_capped(tmp_path):
    """A burst of data buys at most `timeout`, not hours."""
    h = Harness(tmp_path, timeout=60)
    c = h.ehlo()
    assert c.send(START + "DATA\r\n") == MAIL_OK + RCPT_OK + GO_AHEAD
    assert c.send(b"z" * 10_000_000) == ""  # 20000 s at 500 byte/s
    h.clock.advance(59)
    assert not c.closed
    h.clock.advance(1)
    assert c.read() == TIMEOUT


# -- 5. soft error limit ---------------------------------------------------------------------------


def test_soft_error_limit_delays_every_reply(tmp_path):
    h = Harness(tmp_path, max_errors=20, factory_kw={"soft_error_limit": 3})
    c = h.ehlo()
    assert c.send(b"FOO\r\nFOO\r\nFOO\r\n") == UNKNOWN * 3  # not delayed: the limit is reached now
    assert c.send(b"NOOP\r\nFOO\r\nNOOP\r\n") == ""
    h.clock.advance(0.999)
    assert c.read() == ""
    h.clock.advance(0.001)
    assert c.read() == OK
    h.clock.advance(1)
    assert c.read() == UNKNOWN
    h.clock.advance(1)
    assert c.read() == OK
    h.clock.advance(5)
    assert c.read() == ""
    assert c.send(b"NOOP\r\n") == ""
    h.clock.advance(1)
    assert c.read() == OK
    # A refused message's reply waits too.
    assert c.send(START) == ""
    h.clock.advance(1)
    assert c.read() == MAIL_OK
    h.clock.advance(1)
    assert c.read() == RCPT_OK
    assert c.send(b"DATA\r\n") == ""
    h.clock.advance(1)
    assert c.read() == GO_AHEAD
    assert c.send(b"bare\nx\r\n.\r\n") == ""
    h.clock.advance(1)
    assert c.read() == "550 5.6.0 Message contains bare CR or LF; lines must end with CRLF\r\n"
    # A delivered message resets the count (Postfix: errors "without delivering mail").
    assert c.send(START + "DATA\r\n") == ""
    h.clock.pump([1, 1, 1])
    assert c.read() == MAIL_OK + RCPT_OK + GO_AHEAD
    assert c.send(b"x\r\n.\r\n") == ""
    h.clock.advance(1)
    queued_id(c.read())
    assert c.send(b"NOOP\r\n") == OK
    c.proto.connectionLost(None)
    assert h.clock.getDelayedCalls() == []


def test_soft_limit_from_config_and_hard_limit_still_closes(tmp_path):
    h = Harness(tmp_path, max_errors=4, soft_error_limit=2)
    assert h.factory.config.soft_error_limit == 2
    c = h.ehlo()
    assert c.send(b"FOO\r\nFOO\r\nFOO\r\nFOO\r\n") == UNKNOWN * 2
    h.clock.advance(1)
    assert c.read() == UNKNOWN
    h.clock.advance(1)
    assert c.read() == UNKNOWN + f"421 4.7.0 {HOST} Error: too many errors\r\n"
    assert c.closed


def test_connection_lost_during_error_delay(tmp_path):
    h = Harness(tmp_path, factory_kw={"soft_error_limit": 1})
    c = h.ehlo()
    assert c.send(b"FOO\r\nNOOP\r\n") == UNKNOWN
    c.proto.connectionLost(None)
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(1)
    assert c.read() == ""
    # A complete message waiting for the delay is dropped with the connection.
    c = h.ehlo()
    assert c.send(b"FOO\r\n") == UNKNOWN
    assert c.send(START) == ""
    h.clock.pump([1, 1])
    assert c.read() == MAIL_OK + RCPT_OK
    assert c.send(b"DATA\r\n") == ""
    h.clock.advance(1)
    assert c.send(b"x" * 100000 + b"\r\n.\r\n") == GO_AHEAD
    assert c.proto._held is not None
    c.proto.connectionLost(None)
    assert h.clock.getDelayedCalls() == [] and h.queued == []
    assert all(not os.listdir(os.path.join(h.spool.path, d)) for d in ("tmp", "queue", "envelopes"))


# -- 2. flow control: the session is a streaming producer on its transport ---------------------------


def test_registered_as_streaming_producer(h):
    c = h.ehlo()
    assert c.transport.producer is c.proto and c.transport.streaming is True


def test_paused_by_transport_executes_nothing(h):
    c = h.ehlo()
    reading = []
    c.transport.pauseProducing = lambda: reading.append("pause")
    c.transport.resumeProducing = lambda: reading.append("resume")
    c.proto.pauseProducing()  # the write buffer is full: the client does not read
    assert c.send(b"NOOP\r\n" * 5) == ""
    assert reading == []  # little input waiting: reading goes on (a TLS handshake needs it)
    assert c.send(b"NOOP\r\n" * 20000) == ""  # now more than 64 KiB wait
    assert reading == ["pause"]
    c.proto.resumeProducing()
    assert c.read() == OK * 20005
    assert reading == ["pause", "resume"]
    assert c.proto._buf == b""


def test_pause_inside_write_stops_at_once(h, monkeypatch):
    """pauseProducing is called from inside transport.write; the loop stops right after that write."""
    monkeypatch.setattr(smtpd, "REPLY_BATCH", 1)  # every reply is a write of its own
    c = h.ehlo()
    real_write = c.transport.write
    writes = []

    def write(data):
        real_write(data)
        writes.append(data)
        if len(writes) == 3:
            c.proto.pauseProducing()

    c.transport.write = write
    assert c.send(b"NOOP\r\n" * 10) == OK * 3
    c.proto.resumeProducing()  # the buffer drained: the other seven run
    assert c.read() == OK * 7


def test_pipelined_replies_are_sent_together(h):
    """RFC 2920 3.2: the replies to a group of pipelined commands go out as one write."""
    c = h.ehlo()
    writes = []
    real_write = c.transport.write
    c.transport.write = lambda data: (writes.append(data), real_write(data))
    assert c.send(START + "NOOP\r\n" * 3) == MAIL_OK + RCPT_OK + OK * 3
    assert len(writes) == 1
    c.send(b"NOOP\r\n" * 2000)  # 28 000 bytes of replies: sent every REPLY_BATCH bytes, not all at the end
    assert len(writes) == 1 + -(-28000 // smtpd.REPLY_BATCH) and all(len(w) <= smtpd.REPLY_BATCH + 14 for w in writes)


def test_commit_and_transport_pause_combine(h):
    """A commit in flight and a full write buffer are separate reasons: both must end."""
    pending = h.hold_commits()
    c = h.ehlo()
    assert c.send(START + "DATA\r\nx\r\n.\r\nNOOP\r\n") == MAIL_OK + RCPT_OK + GO_AHEAD
    c.proto.pauseProducing()
    pending[0].callback(None)
    queued_id(c.read())  # the commit's reply is written; the NOOP waits for the transport
    assert c.read() == ""
    c.proto.resumeProducing()
    assert c.read() == OK


# -- 3. half-close --------------------------------------------------------------------------------------


def test_half_close_answers_everything_then_closes(h):
    c = h.ehlo()
    out = c.send(START + "DATA\r\nSubject: h\r\n\r\nx\r\n.\r\nNOOP\r\n")
    assert not c.closed
    c.proto.readConnectionLost()
    qid = queued_id(out[len(MAIL_OK + RCPT_OK + GO_AHEAD):-len(OK)])
    assert out.endswith(OK) and c.closed
    assert [e.queue_id for e in h.queued] == [qid]


def test_half_close_waits_for_commit(h):
    pending = h.hold_commits()
    c = h.ehlo()
    assert c.send(START + "DATA\r\nx\r\n.\r\nNOOP\r\nQUIT\r\n") == MAIL_OK + RCPT_OK + GO_AHEAD
    c.proto.readConnectionLost()
    assert not c.closed  # the reply to the message is still to come
    pending[0].callback(None)
    out = c.read()
    queued_id(out[: -len(OK + BYE)])
    assert out.endswith(OK + BYE) and c.closed


def test_half_close_mid_message_drops_it(h):
    c = h.ehlo()
    assert c.send(START + "DATA\r\npartial\r\n") == MAIL_OK + RCPT_OK + GO_AHEAD
    c.proto.readConnectionLost()
    assert c.closed and c.read() == ""
    c.proto.connectionLost(None)
    assert h.queued == [] and h.spool.queue_ids() == []


def test_half_close_while_paused_by_transport(h):
    c = h.ehlo()
    c.proto.pauseProducing()
    assert c.send(b"NOOP\r\nNOOP\r\n") == ""
    c.proto.readConnectionLost()
    assert not c.closed
    c.proto.resumeProducing()
    assert c.read() == OK * 2 and c.closed


def test_write_connection_lost_closes(h):
    c = h.ehlo()
    assert c.send(START + "DATA\r\npartial\r\n") == MAIL_OK + RCPT_OK + GO_AHEAD
    c.proto.writeConnectionLost()
    assert c.closed


# -- 8. long MAIL / RCPT lines ---------------------------------------------------------------------------


def test_mail_and_rcpt_lines_may_exceed_512(h):
    c = h.ehlo()
    envid = "+41" * 100  # xtext: 300 octets for 100 characters
    mail = f"MAIL FROM:<{'s' * 64}@{'d' * 60}.{'e' * 60}.elsewhere.test> SIZE=1000 RET=HDRS ENVID={envid}\r\n"
    assert 512 < len(mail) <= 2048
    assert c.send(mail) == MAIL_OK
    orcpt = "rfc822;" + "+41" * 150 + "@example.com"
    rcpt = f"RCPT TO:<alice@example.com> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT={orcpt}\r\n"
    assert 512 < len(rcpt) <= 2048
    assert c.send(rcpt) == RCPT_OK
    assert c.send(b"NOOP " + b"x" * 600 + b"\r\n") == TOO_LONG  # others keep 512
    assert c.send(b"RSET " + b"x" * 507 + b"\r\n") == TOO_LONG  # 513 with CRLF
    assert c.send(b"NOOP " + b"x" * 506 + b"\n") == OK  # 512 with a bare LF
    head = b"RCPT TO:<bob@example.com> NOTIFY="
    line = head + b"x" * (2048 - len(head) - 1) + b"\r\n"
    assert len(line) == 2049
    assert c.send(line + b"NOOP\r\n") == TOO_LONG + OK
    line = head + b"x" * (2048 - len(head) - 2) + b"\r\n"
    assert c.send(line) == "501 5.5.4 Error: bad NOTIFY parameter\r\n"  # 2048: parsed
    assert c.send("DATA\r\n") == GO_AHEAD
    queued_id(c.send(b"x\r\n.\r\n"))
    assert h.queued[0].esmtp["envid"] == "A" * 100
    assert h.queued[0].recipients[0].orcpt == "rfc822;" + "A" * 150 + "@example.com"


# -- 9. linear-time parsing ---------------------------------------------------------------------------------


def test_many_pipelined_commands_in_linear_time(h):
    """
    300000 NOOPs (1.8 MB) in one read: a copy of the rest per line would
    move ~270 GB and not finish within the suite's per-test timeout
    (setup.cfg); the throughput itself is measured in bench/, not here.
    """
    c = h.ehlo()
    n = 300_000
    c.proto.dataReceived(b"NOOP\r\n" * n)
    assert c.transport.value() == OK.encode() * n


# -- 13. mail events for the metrics -------------------------------------------------------------------------


def test_events(tmp_path, events):
    h = Harness(tmp_path)
    seen_at_enqueue: list[list[str]] = []

    def enqueue(envelope):
        seen_at_enqueue.append([e.get("mail_event") for e in events if e.get("mail_event")])
        h.queued.append(envelope)

    h.factory.enqueue = enqueue
    c = h.ehlo("127.0.0.1")
    [conn] = [e for e in events if e.get("mail_event") == "connection"]
    assert (conn["listener"], conn["client"], conn["tls"]) == ("smtp", "127.0.0.1", False)
    c.proto.session.authenticated_user = "alice@example.com"  # as after AUTH
    start = "MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
    assert c.send(start) == MAIL_OK + RCPT_OK + GO_AHEAD
    qid = queued_id(c.send(b"x\r\n.\r\n"))
    assert seen_at_enqueue == [["connection", "accepted"]]  # logged before enqueue
    [acc] = [e for e in events if e.get("mail_event") == "accepted"]
    assert (acc["queue_id"], acc["listener"], acc["user"], acc["proto"]) == (qid, "smtp", "alice@example.com", "ESMTPA")


def test_smtps_connection_event_says_tls(tmp_path, events):
    h = Harness(tmp_path)
    h.factory.listener = "smtps"
    Client(h.factory, FOREIGN)
    [conn] = [e for e in events if e.get("mail_event") == "connection"]
    assert (conn["listener"], conn["tls"]) == ("smtps", True)


def test_refused_connection_logs_no_connection_event(tmp_path, events):
    h = Harness(tmp_path, max_connections=1)
    Client(h.factory, FOREIGN)
    c = Client(h.factory, FOREIGN)
    assert c.greeting == f"421 4.7.0 {HOST} Error: too many connections\r\n" and c.closed
    assert len([e for e in events if e.get("mail_event") == "connection"]) == 1


def test_metrics_read_the_events(tmp_path):
    """The real MetricsObserver counts what the server logs."""
    from mailhub.metrics import MailMetrics, MetricsObserver

    h = Harness(tmp_path)
    metrics = MailMetrics(h.clock)
    observer = MetricsObserver(metrics)
    globalLogPublisher.addObserver(observer)
    try:
        c = h.ehlo()
        assert c.send(START + "DATA\r\n") == MAIL_OK + RCPT_OK + GO_AHEAD
        queued_id(c.send(b"x\r\n.\r\n"))
        c.proto.handshakeCompleted()  # no STARTTLS was asked for: not counted
    finally:
        globalLogPublisher.removeObserver(observer)
    assert metrics.connections.labels(listener="smtp")._value.get() == 1
    assert metrics.accepted.labels(listener="smtp")._value.get() == 1
    assert metrics.tls_connections._value.get() == 0


def test_limits_come_from_the_configuration(tmp_path):
    """max_hops, min_data_rate and soft_error_limit: the [server] values reach the sessions."""
    h = Harness(tmp_path, max_hops=7, min_data_rate=123, soft_error_limit=4)
    assert h.factory.settings == SMTPSettings(h.config)
    c = h.connect()
    assert (c.proto.config.max_hops, c.proto.config.min_data_rate, c.proto.config.soft_error_limit) == (7, 123, 4)
    h.serve(max_hops=9)
    c = h.connect()
    assert (c.proto.config.max_hops, c.proto.config.min_data_rate) == (9, 123)
