"""
Hostile input to POST /v1/messages: every value that becomes a header field
or a MIME parameter, in every RFC 2047 form, and every malformed body, is a
400 with the JSON error body (nothing queued); what is accepted parses back
to exactly the header fields mailhub meant to write, with the body intact.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json

import pytest
from httpharness import Env, message_json, post_json

FORGED = "From: ceo@bank.example"


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


def stored(env, qid):
    with env.spool.open_message(qid) as f:
        raw = f.read()
    return raw, email.message_from_bytes(raw, policy=email.policy.default)


def header_names(msg):
    return [k.lower() for k in msg.keys()]


def b64word(text, charset="utf-8", tag="b"):
    return f"=?{charset}?{tag}?{base64.b64encode(text.encode()).decode()}?="


#: encoded words that decode to a line break, in every form
INJECTIONS = [
    "hello =?utf-8?q?=0D=0AFrom:_ceo@bank.example=0D=0A=0D=0A<b>x</b>?=",
    "=?UTF-8?Q?=0D=0AFrom:_ceo@bank.example?=",
    "=?utf-8?Q?=0a?=From: ceo@bank.example",
    "=?iso-8859-1?q?=0D=0A?=",
    b64word("\r\nFrom: ceo@bank.example\r\n\r\nbody"),
    b64word("\nFrom: ceo@bank.example", tag="B"),
    b64word("\r", charset="us-ascii"),
    # split over two words: each half alone is harmless
    "=?utf-8?q?x=0D?= =?utf-8?q?=0AFrom:_ceo@bank.example?=",
    # nested: the decoded text is itself an encoded word carrying CR LF
    "=?utf-8?q?=3D=3Futf-8=3Fq=3F=3D0D=3D0AFrom=3A=5Fceo=40bank.example=3F=3D?=",
    "=?utf-8?b?" + base64.b64encode(b"=?utf-8?q?=0D=0AFrom:_ceo@bank.example?=").decode() + "?=",
    # other separators the email package turns into line breaks
    "=?utf-8?q?a=0Bb?=",
    "=?utf-8?q?a=0Cb?=",
    "=?utf-8?q?a=1Cb?=",
    "=?utf-8?q?a=C2=85b?=",
    "=?utf-8?q?a=E2=80=A8b?=",
    "=?utf-8?q?a=00b?=",
]

FIELDS = {
    "subject": lambda v: {"subject": v},
    "filename": lambda v: {"attachments": [{"filename": v, "content_base64": "eA=="}]},
    "reply_to name": lambda v: {"reply_to": f"{v} <r@example.com>"},
    "reply_to quoted name": lambda v: {"reply_to": json.dumps(v) + " <r@example.com>"},
    "reply_to bare": lambda v: {"reply_to": v},
    "cc": lambda v: {"cc": [f"{v} <c@example.com>"]},
    "cc address": lambda v: {"cc": [v.replace(" ", "_") + "@example.com"]},
    "to": lambda v: {"to": [v]},
    "from": lambda v: {"from": f"{v} <alice@example.com>"},
}


@pytest.mark.parametrize("field", sorted(FIELDS))
@pytest.mark.parametrize("payload", INJECTIONS)
def test_encoded_line_breaks_are_refused_in_every_header_field(env, field, payload):
    r = post_json(env, message_json(**FIELDS[field](payload)))
    assert r.status == 400, r.raw
    assert r.json()["code"] == 400 and r.json()["error"]
    assert env.spool.queue_ids() == [] and env.scheduler.enqueued == []


@pytest.mark.parametrize("char", ["\r", "\n", "\0", "\x0b", "\x0c", "\x1c", "\x7f", "\x85", "\u2028", "\u2029", "\t"])
@pytest.mark.parametrize("field", ["subject", "filename", "reply_to name", "cc", "to"])
def test_control_characters_are_refused(env, field, char):
    r = post_json(env, message_json(**FIELDS[field](f"a{char}b")))
    assert r.status == 400, r.raw
    assert r.json()["code"] == 400
    assert env.spool.queue_ids() == []


@pytest.mark.parametrize(
    "subject, shown",
    [
        ("plain subject", "plain subject"),
        ("=?utf-8?q?caf=C3=A9?=", "café"),
        ("=?UTF-8?B?Y2Fmw6k=?= ok", "café ok"),
        ("Grüße, \"quoted\" (comment) =? ?= ; : <x>", "Grüße, \"quoted\" (comment) =? ?= ; : <x>"),
        ("=?utf-8?q?=3D=3Futf-8=3Fq=3Fnested=3F=3D?=", "nested"),
        ("x" * 300, "x" * 300),
    ],
)
def test_accepted_subjects_parse_back_to_exactly_the_expected_header(env, subject, shown):
    name = "Rapport =?utf-8?q?f=C3=A9vrier?=.pdf"
    r = post_json(env, message_json(
        subject=subject, cc=["carol@example.net"], reply_to="=?utf-8?q?Z=C3=B6e?= <zoe@example.com>",
        attachments=[{"filename": name, "content_type": "application/pdf", "content_base64": "aGk="}],
    ))
    assert r.status == 202, r.raw
    raw, msg = stored(env, r.json()["queue_id"])
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert header_names(msg) == ["received", "from", "to", "cc", "reply-to", "subject", "date", "message-id",
                                 "mime-version", "content-type"]
    assert msg["Subject"] == shown
    assert [(a.display_name, a.addr_spec) for a in msg["Reply-To"].addresses] == [("Zöe", "zoe@example.com")]
    assert msg["From"] == "alice@example.com" and msg["To"] == "bob@example.org" and msg["Cc"] == "carol@example.net"
    assert msg.get_body(("plain",)).get_content() == "Hello Bob\r\n"
    assert [(a.get_filename(), a.get_content()) for a in msg.iter_attachments()] == [("Rapport février.pdf", b"hi")]
    for part in msg.iter_parts():
        assert set(header_names(part)) <= {"content-type", "content-transfer-encoding", "content-disposition", "mime-version"}


def test_encoded_words_nested_too_deeply_are_refused(env):
    text = "deep"
    for _ in range(6):
        text = b64word(text)
    r = post_json(env, message_json(subject=text))
    assert r.status == 400 and "nested" in r.json()["error"], r.raw


# -- malformed bodies and wrong types: 400, never 500 --------------------------------------------------

WRONG_TYPES = [
    {"from": 5}, {"from": None}, {"from": ["alice@example.com"]}, {"from": {"a": 1}}, {"from": True},
    {"to": 5}, {"to": [5]}, {"to": {"a": "b"}}, {"to": [["bob@example.org"]]}, {"cc": [None]}, {"bcc": False},
    {"subject": 5}, {"subject": ["x"]}, {"subject": None}, {"text": None}, {"html": 1.5}, {"reply_to": 5},
    {"reply_to": ["a@example.com"]}, {"attachments": "x"}, {"attachments": {"filename": "a"}}, {"attachments": [5]},
    {"attachments": [{"filename": 5, "content_base64": "eA=="}]},
    {"attachments": [{"filename": "a", "content_base64": 5}]},
    {"attachments": [{"filename": "a", "content_base64": "eA==", "content_type": 5}]},
    {"attachments": [{"filename": "a", "content_base64": "eA==", "content_type": "text/plain\r\nX: y"}]},
    {"attachments": [{"filename": "a", "content_base64": "eA==", "content_type": "text/plain; name=x"}]},
    {"attachments": [{"filename": "", "content_base64": "eA=="}]},
    {"attachments": [{"filename": "../a", "content_base64": "eA=="}]},
    {"attachments": [{"filename": "a", "content_base64": "eA==", "disposition": "inline"}]},
    {"headers": {"X-Mailer": "x"}},
    {"subject": "x" * 5000},
    {"from": "a" * 5000 + "@example.com"},
]


@pytest.mark.parametrize("fields", WRONG_TYPES, ids=[json.dumps(f)[:60] for f in WRONG_TYPES])
def test_wrong_types_and_unknown_fields_are_400(env, fields):
    r = post_json(env, message_json(**fields))
    assert r.status == 400, r.raw
    assert r.json()["code"] == 400
    assert env.spool.queue_ids() == []


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b" ",
        b"[" * 20000 + b"]" * 20000,
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b'{"from": "alice@example.com", "to": ["bob@example.org"], "text": "x", "subject": ' + b"9" * 5000 + b"}",
        b'{"from": "alice@example.com", "to": ["bob@example.org"], "text": "x", "subject": 1e999}',
        b'{"from": "alice@example.com", "to": ["bob@example.org"], "text": "\xff\xfe"}',
        b'{"from": "alice@example.com", "to": ["bob@example.org"], "text": "x", "subject": "\\ud800"}',
        b'{"from": "alice@example.com", "to": ["bob@example.org"], "text": "x", "subject": "\\udfff\\ud800"}',
        b'{"from": "alice@example.com", "to": ["bob@example.org"], "text": "x", "subject": NaN}',
        b"\xef\xbb\xbf{}",
        b"null",
        b'"string"',
    ],
    ids=["empty", "blank", "nested-arrays", "nested-objects", "huge-int", "huge-float", "invalid-utf8",
         "surrogate", "surrogates", "nan", "bom", "null", "string"],
)
def test_malformed_json_is_400(env, body):
    r = post_json(env, body)
    assert r.status == 400, r.raw
    assert r.json()["code"] == 400
    assert env.spool.queue_ids() == []


@pytest.mark.parametrize("ctype", [None, "", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_other_content_types_are_415(env, ctype):
    headers = {} if ctype is None else {"Content-Type": ctype}
    r = env.request("POST", "/v1/messages", message_json(), headers, token=env.alice)
    assert r.status == 415, r.raw
    assert r.json()["code"] == 415


def test_two_authorization_headers_are_refused(env):
    body = message_json()
    raw = (
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer mh_wrong\r\nAuthorization: Bearer {env.alice}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    r = env.request("POST", "/v1/messages", raw=raw)
    assert r.status == 400, r.raw
    assert r.json() == {"error": "more than one Authorization header", "code": 400}
    assert env.spool.queue_ids() == []
    raw_get = (f"GET /v1/queue HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {env.alice}\r\n"
               f"Authorization: Bearer {env.root}\r\n\r\n").encode()
    assert env.request("GET", "/v1/queue", raw=raw_get).status == 400


@pytest.mark.parametrize(
    "query, message, error",
    [
        # Python's email package either gives up (RecursionError: "cannot
        # read the addresses") or, in some 3.11 releases, finds no address
        # in the comments ("no recipients"); both are the client's error
        ("", b"From: alice@example.com\r\nTo: " + b"(" * 5000 + b"\r\n\r\nx\r\n",
         ("cannot read the addresses", "no recipients")),
        ("?from=alice@example.com&to=" + "a" * 5000 + "@example.org", b"Subject: x\r\n\r\nx\r\n",
         ("local part too long",)),
        ("?from=%ff%fe&to=bob@example.org", b"Subject: x\r\n\r\nx\r\n", ("invalid sender",)),
    ],
    ids=["nested-comments", "long-recipient", "bad-sender"],
)
def test_raw_messages_with_unreadable_addresses_are_400(env, query, message, error):
    r = env.request("POST", "/v1/messages" + query, message, {"Content-Type": "message/rfc822"}, token=env.alice)
    assert r.status == 400, r.raw
    assert any(text in r.json()["error"] for text in error), r.json()
    assert len(r.body) < 300  # the client's input is not echoed in full
    assert env.spool.queue_ids() == []
