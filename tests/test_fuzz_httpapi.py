"""
Property-based (fuzz) tests of the HTTP API, in memory: documents made by
Hypothesis (nesting, every JSON type, Unicode with control characters,
RFC 2047 encoded words, raw bytes) are POSTed to /v1/messages through the
real Site and HTTP parser over a StringTransport, with a real spool and a
list as the scheduler.  Profiles and the campaign mode: tests/fuzzing.py,
docs/testing.rst.

Properties:
- never a 500, and nothing logs a traceback or an error / critical event;
- every answer has a JSON body (an object with "error" for the 4xx);
- 202 only for a message that was committed: its queue id is in the
  spool and was handed to the scheduler, once; any other answer queued
  nothing and left nothing in the spool;
- a committed message carries exactly one From: and one Subject: field
  (what a client writes in a value never becomes a field of its own).
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import tempfile
from pathlib import Path

import pytest
from fuzzing import LogCapture
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailhub.metrics import MailMetrics, spool_queue_stats
from mailhub.queue.spool import Spool
from mailhub.users import UsersFile
from mailhub.web.api import make_http_site

USER = "alice@example.com"


class Api:
    """The HTTP API of one example: a fresh spool, users file and scheduler list."""

    def __init__(self, tmp: Path) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.spool = Spool(str(tmp / "spool"), fsync=False)
        users = UsersFile(str(tmp / "users"), rounds=4)
        users.add(USER, "secret-a")
        self.token = users.add_token(USER)
        self.enqueued: list = []
        metrics = MailMetrics(self.clock, spool_queue_stats(self.spool))
        self.site = make_http_site(self.spool, self.enqueued.append, None, users, metrics, "mx.example.com",
                                   max_body=100_000, clock=self.clock)

    def post(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        proto = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
                                    hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
        proto.makeConnection(transport)
        head = (f"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {self.token}\r\nContent-Length: {len(body)}\r\n\r\n")
        proto.dataReceived(head.encode("ascii") + body)
        raw = transport.value()
        head_bytes, _, payload = raw.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1]) if lines[0] else 0
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if headers.get("transfer-encoding") == "chunked":
            payload = _unchunk(payload)
        return status, headers, payload

    def stored(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.spool.path, "queue")))


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, data = data.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            break
        out, data = out + data[:n], data[n + 2 :]
    return out


# -- strategies -------------------------------------------------------------------------------------

ENCODED_WORDS = st.sampled_from([
    "=?utf-8?q?=0D=0AFrom:_ceo@bank.example=0D=0A=0D=0A<b>x</b>?=",
    "hello =?utf-8?q?=0D=0AFrom:_ceo@bank.example?=",
    "=?utf-8?b?DQpGcm9tOiBjZW9AYmFuay5leGFtcGxl?=",
    "=?iso-8859-1?q?caf=E9?=",
    "=?utf-8?q?a?= =?utf-8?q?b?=",
    "=?x?q?broken",
    "=?utf-8?q?=00?=",
])
CONTROL = st.sampled_from(["\u000b", "\u000c", "\u001c", "\u0085", "\u2028", "\u2029", "\x7f", "\t", "\x1b[31m"])
TEXT = st.one_of(
    st.text(max_size=60),
    ENCODED_WORDS,
    st.builds(lambda a, c, b: a + c + b, st.text(max_size=10), CONTROL, st.text(max_size=10)),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=900, max_size=2000),  # long (folding)
)
ADDRESS = st.one_of(
    st.sampled_from(["bob@example.org", "carol@example.net", "", "x", "a@b", "\"q u\"@example.org", "é@example.org",
                     "Bob <bob@example.org>", "=?utf-8?q?=0D=0A?= <bob@example.org>", "bob@[127.0.0.1]"]),
    st.builds(lambda a, c: a + c + "@example.org", st.text(max_size=8), CONTROL),
    TEXT,
)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)
ATTACHMENT = st.fixed_dictionaries(
    {},
    optional={
        "filename": st.one_of(TEXT, st.just("a.txt")),
        "content_type": st.one_of(st.sampled_from(["text/plain", "application/pdf", "multipart/mixed", "x"]), TEXT),
        "content_base64": st.one_of(st.sampled_from(["aGVsbG8=", "", "!!", "AA=="]), TEXT),
    },
)
MESSAGE = st.fixed_dictionaries(
    {"from": st.one_of(st.just(USER), ADDRESS), "to": st.one_of(st.lists(ADDRESS, min_size=1, max_size=3), ADDRESS)},
    optional={
        "cc": st.lists(ADDRESS, max_size=2),
        "bcc": st.lists(ADDRESS, max_size=2),
        "subject": TEXT,
        "text": TEXT,
        "html": TEXT,
        "reply_to": ADDRESS,
        "attachments": st.one_of(st.lists(ATTACHMENT, max_size=2), JSON),
        "extra": JSON,
    },
).map(lambda d: d if "extra" not in d else {**d, d["extra"] and "headers" or "x-unknown": d.pop("extra")})
DOCUMENT = st.one_of(
    MESSAGE.map(lambda d: json.dumps(d).encode()),
    MESSAGE.map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    JSON.map(lambda d: json.dumps(d).encode()),
    st.integers(1, 50_000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
    st.integers(1, 50_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.binary(max_size=200),
)


# -- properties -------------------------------------------------------------------------------------


def check_post(api: Api, body: bytes) -> tuple[int, object]:
    queued_before, stored_before = len(api.enqueued), api.stored()
    with LogCapture() as log:
        status, headers, payload = api.post(body)
    assert status != 500, payload[:300]
    assert not log.bad, log.describe()
    assert headers.get("content-type", "").startswith("application/json"), (status, headers)
    answer = json.loads(payload)
    if status == 202:
        qid = answer["queue_id"]
        [envelope] = api.enqueued[queued_before:]
        assert envelope.queue_id == qid
        assert api.spool.load(qid).queue_id == qid
        assert api.stored() == sorted(stored_before + [qid])
        with api.spool.open_message(qid) as f:
            msg = email.message_from_bytes(f.read(), policy=email.policy.compat32)
        assert len(msg.get_all("From", [])) == 1, msg.get_all("From")
        assert len(msg.get_all("Subject", [])) <= 1, msg.get_all("Subject")
    else:
        assert 400 <= status < 600, status
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str), answer
        assert api.enqueued[queued_before:] == []
        assert api.stored() == stored_before
    return status, answer





@given(body=DOCUMENT)
def test_random_documents_never_500_and_202_means_committed(body):
    with tempfile.TemporaryDirectory() as tmp:
        check_post(Api(Path(tmp)), body)


def _message(**kw: object) -> bytes:
    return json.dumps({"from": USER, "to": ["bob@example.org"], "text": "hi\n", **kw}).encode()


@pytest.mark.parametrize(
    "body",
    [
        _message(),
        _message(subject="=?iso-8859-1?q?caf=E9?="),
        _message(subject="tab\tin subject"),
        b"[" * 10 + b"]" * 10,
        pytest.param(b"[" * 30_000 + b"]" * 30_000, id="nested-lists"),
        pytest.param(_message(subject="a\u000bb"), id="subject-vt"),
        pytest.param(_message(subject="a\u2028b"), id="subject-u2028"),
        pytest.param(
            _message(subject="hello =?utf-8?q?=0D=0AFrom:_ceo@bank.example=0D=0A=0D=0A<b>x</b>?="), id="subject-encoded-crlf"
        ),
        pytest.param(b'{"from": "0@", "to": "bob@example.org", "text": ""}',
                     id="sender-empty-domain"),
        pytest.param(_message(to=["0@"]), id="recipient-empty-domain"),
    ],
)
def test_documents_found_by_fuzzing(tmp_path, body):
    """Shortest forms of what the fuzzer found, kept as explicit examples."""
    check_post(Api(tmp_path), body)
