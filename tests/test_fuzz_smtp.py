"""
Property-based (fuzz) tests of the SMTP server, in memory: hostile
transcripts made by Hypothesis are fed to a real SMTPServerFactory over a
StringTransport, split at random byte boundaries, with time on a task.Clock
("time is injected": no test here waits).  Profiles and the campaign mode
are in tests/fuzzing.py and docs/testing.rst.

Properties:
- nothing logs a traceback or an error / critical event;
- every reply line is well-formed (code, SP or "-", US-ASCII text, CRLF)
  and at most 512 octets (RFC 5321 4.2, 4.5.3.1.5);
- the session is closed at the latest C{timeout} seconds after the
  client's last byte (plus the one-second error delays still owed);
- each "250 ... queued as ID" is one envelope handed to the scheduler and
  one message in the spool, and a message sent with valid DATA / BDAT is
  stored byte for byte as the client meant it (after dot-unstuffing);
- memory is flat: no session object outlives its connection.
"""

from __future__ import annotations

import base64
import gc
import re
import tempfile
from pathlib import Path

import pytest
from fuzzing import LogCapture, bad_reply_lines
from hypothesis import given
from hypothesis import strategies as st
from smtpharness import AUTH_PASSWORD as PASSWORD
from smtpharness import AUTH_USER as USER
from smtpharness import FOREIGN, GREETING, Client, Harness, TLSStringTransport, serve_with_auth

from mailhub.smtp.limits import ERROR_SLEEP
from mailhub.smtp.server import SMTPServer

TIMEOUT = 30.0  # idle timeout of the fuzzed server (ServerConfig.timeout)
QUEUED_ID = re.compile(rb"^250 2\.0\.0 Ok: queued as ([0-9A-Z]+)\r$", re.M)


class Server:
    """A fuzzed server: two local domains, aliases, TLS (fake), users and a throttle."""

    def __init__(self, tmp: Path) -> None:
        self.h = Harness(tmp, domains=("example.com", "example.org"), aliases="list: alice, bob\n", timeout=TIMEOUT)
        serve_with_auth(self.h, tmp)

    def session(self, chunks: list[bytes], ip: str = FOREIGN) -> tuple[bytes, Client]:
        """
        One connection: the chunks arrive one by one (a chunk waits while the
        server has paused reading, as TCP would), then the client stays
        silent; returns everything the server wrote.  Every second of
        simulated time is stepped, so each deadline fires when it is due.
        """
        clock = self.h.clock
        c = Client(self.h.factory, ip, TLSStringTransport)
        out = [c.greeting.encode("ascii")]
        owed = 1  # one-second error delays the server may still owe (one per command line at most)
        for chunk in chunks:
            owed += chunk.count(b"\n") + chunk.count(b"\r")
            for _ in range(int(TIMEOUT) + 1):  # wait while the server does not read, within its deadline
                if c.transport.producerState != "paused" or c.closed:
                    break
                clock.advance(ERROR_SLEEP)
                out.append(c.transport.value())
                c.transport.clear()
            if c.closed:
                break
            c.proto.dataReceived(chunk)
            out.append(c.transport.value())
            c.transport.clear()
        waited = 0.0
        while not c.closed and waited <= TIMEOUT + owed * ERROR_SLEEP:
            clock.advance(1.0)
            waited += 1.0
            out.append(c.transport.value())
            c.transport.clear()
        assert c.closed, f"session still open {waited} s after the client's last byte (timeout={TIMEOUT})"
        c.lose()  # the transport really closes
        return b"".join(out), c


# -- strategies: hostile transcripts ------------------------------------------------------------

LOCAL = st.sampled_from(["alice@example.com", "bob@example.org", "list@example.com", "postmaster@example.com"])
ADDRESS = st.one_of(
    LOCAL,
    st.sampled_from(["x@foreign.example", "", "a@[127.0.0.1]", '"q u"@example.com', "é@example.com",
                     "a@b@c", "@relay:x@y.z", "alice+tag@example.com"]),
    st.text(max_size=40),
)
PARAM = st.one_of(
    st.sampled_from(["SIZE=100", "SIZE=99999999999", "BODY=8BITMIME", "BODY=BINARYMIME", "BODY=7BIT", "SMTPUTF8",
                     "RET=HDRS", "RET=FULL", "ENVID=x+2Bx", "NOTIFY=SUCCESS,FAILURE", "NOTIFY=NEVER",
                     "ORCPT=rfc822;x@y", "ORCPT=rfc822;+00+0D", "AUTH=<>", "SIZE=", "X=Y"]),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["SIZE", "BODY", "ENVID", "ORCPT", "RET", "NOTIFY", "FOO"]),
              st.text(max_size=30)),
    st.builds(lambda n, c: c * n, st.integers(100, 2500), st.sampled_from(["X", "é", "A="])),  # long
)
DOMAIN = st.one_of(st.sampled_from(["client.test", "[192.0.2.1]", "", "é.test", "x" * 300]), st.text(max_size=20))


def _line(*parts: str) -> bytes:
    return " ".join(parts).encode("utf-8", "surrogatepass") + b"\r\n"


def _mail(addr: str, params: list[str]) -> bytes:
    return _line(f"MAIL FROM:<{addr}>", *params)


def _rcpt(addr: str, params: list[str]) -> bytes:
    return _line(f"RCPT TO:<{addr}>", *params)


BODY_LINE = st.one_of(
    st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b".", b"..", b".x", b"", b"Subject: hi", b"Received: from x", b"\x00", b"\xff\xfe"]),
)


def _data(lines: list[bytes]) -> bytes:
    """DATA as a client sends it: dot-stuffed, CRLF lines, the end marker."""
    return b"DATA\r\n" + b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines) + b".\r\n"


COMMAND = st.one_of(
    st.builds(lambda v, d: _line(v, d), st.sampled_from(["EHLO", "HELO", "ehlo", "LHLO"]), DOMAIN),
    st.builds(_mail, ADDRESS, st.lists(PARAM, max_size=3)),
    st.builds(_rcpt, ADDRESS, st.lists(PARAM, max_size=3)),
    st.builds(_data, st.lists(BODY_LINE, max_size=8)),
    st.just(b"DATA\r\n"),
    st.builds(lambda chunk, last: b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk,
              st.binary(max_size=60), st.booleans()),
    st.builds(lambda n, w: b"BDAT " + n + w + b"\r\n", st.sampled_from([b"-1", b"x", b"99999999999", b"", b"5"]),
              st.sampled_from([b"", b" LAST", b" last junk"])),
    st.sampled_from([b"RSET\r\n", b"NOOP\r\n", b"NOOP x\r\n", b"HELP\r\n", b"VRFY alice\r\n", b"EXPN list\r\n",
                     b"STARTTLS\r\n", b"STARTTLS x\r\n", b"QUIT\r\n", b"AUTH\r\n", b"AUTH LOGIN\r\n", b"*\r\n",
                     b"AUTH PLAIN\r\n", b"AUTH CRAM-MD5\r\n", b"TURN\r\n", b"ETRN x\r\n", b"\r\n"]),
    st.builds(lambda m, x: _line("AUTH", m, base64.b64encode(x).decode()), st.sampled_from(["PLAIN", "LOGIN"]),
              st.one_of(st.binary(max_size=40), st.just(f"\0{USER}\0{PASSWORD}".encode()),
                        st.just(f"\0{USER}\0wrong".encode()))),
    st.builds(lambda x: base64.b64encode(x) + b"\r\n", st.binary(max_size=30)),  # a SASL response line
    st.builds(lambda n, c: c * n + b"\r\n", st.integers(500, 3000), st.sampled_from([b"A", b"\xc3\xa9", b"MAIL "])),
    st.binary(max_size=40),  # anything: bare CR / LF, NUL, no line end
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass") + b"\r\n"),
)
GOOD_START = st.lists(st.sampled_from([b"EHLO client.test\r\n", b"STARTTLS\r\n",
                                       b"MAIL FROM:<x@foreign.example>\r\n", b"RCPT TO:<alice@example.com>\r\n"]),
                      max_size=4, unique=True)


@st.composite
def transcripts(draw: st.DrawFn) -> list[bytes]:
    """A hostile session: a plausible start, random commands, cut into random chunks."""
    wire = b"".join(draw(GOOD_START)) + b"".join(draw(st.lists(COMMAND, max_size=14)))
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    bounds = [0, *cuts, len(wire)]
    return [wire[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


# -- properties ------------------------------------------------------------------------------


def check_session(server: Server, chunks: list[bytes]) -> bytes:
    """Run one session; check the log, the replies and the once-only queueing."""
    before = len(server.h.queued)
    with LogCapture() as log:
        out, _ = server.session(chunks)
    assert not log.bad, log.describe()
    assert out.startswith(GREETING.encode("ascii"))
    bad = bad_reply_lines(out)
    assert not bad, bad[:3]
    ids = [m.decode() for m in QUEUED_ID.findall(out)]
    envelopes = server.h.queued[before:]
    assert [e.queue_id for e in envelopes] == ids  # one envelope per 250, in order
    assert len(set(ids)) == len(ids)
    for qid in ids:
        assert server.h.spool.load(qid).queue_id == qid
        server.h.message(qid)
    return out


# Known defects (being fixed on other branches).  Each mark names what
# fails; remove it when the fix is merged (the checks themselves stay).


@given(chunks=transcripts())
def test_hostile_transcripts_get_well_formed_replies_and_end_in_time(chunks):
    with tempfile.TemporaryDirectory() as tmp:
        check_session(Server(Path(tmp)), chunks)


@pytest.mark.parametrize(
    "wire",
    [
        b"EHLO x\r\nMAIL FROM:<a@b.c> SIZE=" + b"9" * 1000 + b"\r\n",
        b"EHLO x\r\nMAIL FROM:<a@b.c> FOO=" + "\u00e9".encode() * 600 + b"\r\n",
        b"EHLO x\r\nMAIL FROM:<a@b.c> ENVID=" + b"X" * 600 + b"\r\n",
        pytest.param(b"EHLO x\r\nMAIL FROM:<a@b.c> \xc3\xa9\r\n"),
        pytest.param(b"EHLO x\r\nMAIL FROM:<a@b.c> " + b"X" * 600 + b"\r\n"),
        pytest.param(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<alice@example.com> " + b"X" * 600 + b"\r\n"),
    ],
    ids=["long-size", "long-utf8-value", "long-envid", "utf8-param-echoed", "long-mail-param-echoed",
         "long-rcpt-param-echoed"],
)
def test_replies_to_hostile_parameters_are_short_ascii_lines(tmp_path, wire):
    """Examples Hypothesis found (shrunk by hand to their shortest form), kept as explicit examples."""
    check_session(Server(tmp_path), [wire])


# -- byte-exact delivery ---------------------------------------------------------------------------

DATA_LINE = st.one_of(
    st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b".", b"..", b"...", b".x", b"", b"\x00", b". ", b"From x"]),
).filter(lambda x: not x.lower().startswith(b"received:"))  # not a hop: that is a mail loop test


@st.composite
def transactions(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """One valid transaction (DATA or BDAT) as wire bytes, and the message it must store."""
    head = b"MAIL FROM:<%s>%s\r\nRCPT TO:<alice@example.com>\r\n" % (
        draw(st.sampled_from([b"", b"x@foreign.example", b"bob@example.org"])),
        draw(st.sampled_from([b"", b" BODY=8BITMIME", b" SIZE=10"])),
    )
    if draw(st.booleans()):
        lines = draw(st.lists(DATA_LINE, max_size=20))
        return head + _data(lines), b"".join(x + b"\r\n" for x in lines)
    # BDAT carries any bytes, bare CR / LF and lines of dots included.
    chunks = draw(st.lists(st.binary(max_size=120), min_size=1, max_size=4))
    wire = b"".join(b"BDAT %d%s\r\n%s" % (len(x), b" LAST" if i == len(chunks) - 1 else b"", x)
                    for i, x in enumerate(chunks))
    return head + wire, b"".join(chunks)


@st.composite
def sessions(draw: st.DrawFn) -> tuple[list[bytes], list[bytes]]:
    """Valid transactions with harmless commands between them, pipelined and cut anywhere."""
    wire, expected = b"EHLO client.test\r\n", []
    for tx, body in draw(st.lists(transactions(), min_size=1, max_size=4)):
        wire += draw(st.sampled_from([b"", b"NOOP\r\n", b"RSET\r\n", b"HELP\r\n", b"VRFY bob\r\n"])) + tx
        expected.append(body)
    wire += draw(st.sampled_from([b"QUIT\r\n", b""]))
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    bounds = [0, *cuts, len(wire)]
    return [wire[a:b] for a, b in zip(bounds, bounds[1:]) if b > a], expected


@given(session=sessions())
def test_what_got_250_is_stored_byte_exact_exactly_once(session):
    chunks, expected = session
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp))
        out = check_session(server, chunks)
        ids = [m.decode() for m in QUEUED_ID.findall(out)]
        assert len(ids) == len(expected), out
        assert [server.h.body(qid) for qid in ids] == expected
        queue = Path(tmp, "spool", "queue")
        assert sorted(p.name for p in queue.iterdir()) == sorted(ids)  # nothing else was stored


# -- memory ----------------------------------------------------------------------------------------


def _live_sessions() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, SMTPServer))


@pytest.mark.parametrize("ending", ["quit", "timeout", "abort", "data"])
def test_memory_is_flat_over_many_sessions(tmp_path, ending):
    """
    Hundreds of sessions, each ended a different way: afterwards no
    session object is alive and the factory counts no connection, so
    memory does not grow with the number of sessions served.
    """
    server = Server(tmp_path)
    scripts = {
        "quit": [b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n"],
        "timeout": [b"EHLO x\r\nMAIL FROM:<a@b.c>\r\n"],
        "abort": [b"EHLO x\r\nSTARTTLS\r\nAUTH LOGIN\r\n"],
        "data": [b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n", b"x" * 5000],
    }
    baseline = _live_sessions()
    for i in range(200):
        ip = f"192.0.2.{i % 250 + 1}"
        server.session(scripts[ending], ip)
    # At most the baseline: sessions of earlier tests may still be referenced when it is taken
    # (a traceback, a fixture) and be collected by now; none of these 200 may stay alive.
    assert _live_sessions() <= baseline
    f = server.h.factory
    assert (f.connections, f.per_ip, f.sessions) == (0, {}, set())
