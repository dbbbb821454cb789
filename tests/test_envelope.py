"""Tests for mailhub.envelope: state changes and the on-disk JSON form."""

import json

import pytest

from mailhub.envelope import (
    DELIVERED,
    FAILED,
    PENDING,
    Envelope,
    EnvelopeFormatError,
    Outcome,
    Recipient,
)


def make():
    return Envelope(
        queue_id="ABCDEFGHJK123",
        sender="sender@example.org",
        recipients=[Recipient("a@example.com"), Recipient("b@example.com", original="alias@example.com")],
        arrival=1000.0,
        esmtp={"size": 12, "body": "8BITMIME", "smtputf8": False},
        client={"helo": "client.example", "addr": "127.0.0.1", "protocol": "ESMTP"},
    )


def test_roundtrip():
    env = make()
    env.recipients[0].notify = ["FAILURE"]
    raw = env.to_json()
    data = json.loads(raw)
    assert data["version"] == 1
    assert data["recipients"][1]["original"] == "alias@example.com"
    assert Envelope.from_json(raw) == env


def test_utf8_kept_readable():
    env = make()
    env.sender = "üser@bücher.example"
    raw = env.to_json()
    assert "üser@bücher.example".encode("utf-8") in raw
    assert Envelope.from_json(raw).sender == "üser@bücher.example"


def test_apply_outcomes():
    env = make()
    env.apply(Outcome.delivered("a@example.com"), 1001.0)
    assert env.recipients[0].state == DELIVERED
    assert not env.done
    r = env.apply(Outcome.temporary("b@example.com", "mailbox busy", 451, "4.2.1"), 1002.0)
    assert r.state == PENDING and r.attempts == 1 and r.last_code == 451 and r.last_status == "4.2.1"
    assert env.pending_recipients() == [r]
    env.apply(Outcome.permanent("b@example.com", "no such user", 550, "5.1.1"), 1003.0)
    assert r.state == FAILED and r.attempts == 2 and r.last_attempt == 1003.0
    assert env.done
    with pytest.raises(KeyError):
        env.apply(Outcome.delivered("b@example.com"), 1004.0)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'{"version": 2}',
        b'{"version": 1, "queue_id": "X"}',
        b"\xff\xfe",
        json.dumps({**json.loads(make().to_json()), "recipients": [{"address": "a@b", "state": "weird"}]}).encode(),
        json.dumps({**json.loads(make().to_json()), "surprise": 1}).encode(),
    ],
)
def test_bad_json(raw):
    with pytest.raises(EnvelopeFormatError):
        Envelope.from_json(raw)


def test_outcome_kind_checked():
    with pytest.raises(ValueError):
        Outcome("a@b", "maybe", 250, "2.0.0", "x")
