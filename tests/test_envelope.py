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
    assert "üser@bücher.example".encode() in raw
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


# -- every field of an envelope read from disk is checked -----------------------------

NAN, INF = float("nan"), float("inf")
HUGE = 10**30


def full() -> dict:
    """An envelope with every field set, as JSON data (a recipient with every field too)."""
    env = make()
    env.next_attempt, env.attempts, env.held, env.warned = 2000.0, 3, True, True
    env.esmtp.update(ret="HDRS", envid="abc", crlf=True)
    env.client.update(user="alice", listener="smtp", uid=1000, pickup="1.2.abc", bounce_of="X", double_bounce=True)
    r = env.recipients[0]
    r.state, r.attempts, r.last_code, r.last_status, r.last_text = "delivered", 1, 250, "2.0.0", "ok"
    r.last_attempt, r.remote_mta = 1500.0, "mx.example[192.0.2.1]"
    r.notify, r.orcpt = ["SUCCESS", "DELAY"], "rfc822;a@example.com"
    return json.loads(env.to_json())


def raw_with(path: tuple, value) -> bytes:
    """full() with the field at C{path} set to C{value} (or removed, for C{MISSING})."""
    data = full()
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is MISSING:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(data, allow_nan=True).encode()


MISSING = object()
TIMES = [None, "yesterday", "1000", True, [], {}, NAN, INF, -INF, -1, -0.5, HUGE, 1e300, 253402300800]
COUNTS = [None, "x", "3", True, 1.5, 2.0, NAN, INF, -1, HUGE, [], {}]
TEXTS = [None, 5, 1.5, True, [], {}]
FLAGS = [None, 0, 1, "true", "yes", [], {}]

BAD_FIELDS = [
    (("version",), [MISSING, None, 2, "1", 1.0, True]),
    (("queue_id",), [MISSING, None, 5, "", [], {}]),
    (("sender",), [MISSING, None, 5, [], "no-at-sign", "a@b@", "a b@example.org", "a@[bad", "a@exa mple.org",
                   "a\r\nb@example.org", "@example.org", "x" * 65 + "@example.org"]),
    (("recipients",), [MISSING, None, [], {}, "a@example.com", 5, [5], ["a@example.com"], [None], [[]]]),
    (("arrival",), [MISSING, *TIMES]),
    (("next_attempt",), TIMES),
    (("attempts",), COUNTS),
    (("esmtp",), [None, [], "x", 5]),
    (("client",), [None, [], "x", 5]),
    (("held",), FLAGS),
    (("warned",), FLAGS),
    (("unknown",), [None, 1, "x"]),
    (("recipients", 0, "address"), [MISSING, None, 5, "", [], {}, "no-at-sign", "a@[bad", "a\nb@example.com",
                                    "b@" + "x" * 300 + ".example"]),
    (("recipients", 0, "original"), [None, 5, [], {}]),
    (("recipients", 0, "state"), [None, 5, "", "weird", "PENDING", [], {}]),
    (("recipients", 0, "attempts"), COUNTS),
    (("recipients", 0, "last_code"), [*COUNTS, 1000]),
    (("recipients", 0, "last_status"), TEXTS),
    (("recipients", 0, "last_text"), TEXTS),
    (("recipients", 0, "last_attempt"), TIMES),
    (("recipients", 0, "remote_mta"), TEXTS),
    (("recipients", 0, "notify"), [None, "SUCCESS", 5, {}, [5], ["sometimes"], [None]]),
    (("recipients", 0, "orcpt"), TEXTS),
    (("recipients", 0, "unknown"), [None, 1, "x"]),
    (("esmtp", "size"), COUNTS + [2**53 + 1]),
    (("esmtp", "body"), [None, 5, "8bit", "QUOTED", [], True]),
    (("esmtp", "smtputf8"), FLAGS),
    (("esmtp", "ret"), [None, 5, "full", "ALL", []]),
    (("esmtp", "envid"), TEXTS),
    (("esmtp", "crlf"), FLAGS),
    (("client", "helo"), [5, 1.5, True, [], {}]),
    (("client", "addr"), [5, 1.5, True, [], {}]),
    (("client", "user"), [5, 1.5, True, [], {}]),
    (("client", "uid"), COUNTS),
    (("client", "pickup"), TEXTS),
    (("client", "bounce_of"), TEXTS),
    (("client", "double_bounce"), FLAGS),
]


def _cases():
    for path, values in BAD_FIELDS:
        for value in values:
            name = ".".join(map(str, path)) + "=" + ("missing" if value is MISSING else repr(value)[:40])
            yield pytest.param(path, value, id=name)


@pytest.mark.parametrize("path, value", list(_cases()))
def test_every_bad_field_value_is_a_format_error(path, value):
    with pytest.raises(EnvelopeFormatError) as e:
        Envelope.from_json(raw_with(path, value))
    if isinstance(value, float) and value != value or value in (INF, -INF):
        assert "is not a number" in str(e.value)  # refused by the JSON parser already
    else:
        field_name = path[-1] if path[-1] != "unknown" else "unknown field"
        assert str(field_name) in str(e.value)
    assert len(str(e.value)) < 300


def test_a_full_envelope_and_optional_fields_are_accepted():
    data = full()
    env = Envelope.from_json(json.dumps(data).encode())
    assert json.loads(env.to_json()) == data
    minimal = {"version": 1, "queue_id": "ABCDEFGHJK123", "sender": "", "arrival": 0,
               "recipients": [{"address": '"odd local"@[IPv6:::1]'}]}
    env = Envelope.from_json(json.dumps(minimal).encode())
    assert env.recipients[0].original == '"odd local"@[IPv6:::1]' and env.next_attempt == 0.0
    # esmtp and client may carry keys this version does not know
    data["esmtp"]["mt_priority"] = 3
    data["client"]["tls"] = {"version": "TLSv1.3"}
    assert Envelope.from_json(json.dumps(data).encode()).client["tls"] == {"version": "TLSv1.3"}
    # null is a valid value of the informational client fields (HTTP has no HELO)
    data["client"]["helo"] = None
    Envelope.from_json(json.dumps(data).encode())
    # an internationalized address of an SMTPUTF8 message
    data["recipients"][0]["address"] = "jörg@bücher.example"
    assert Envelope.from_json(json.dumps(data, ensure_ascii=False).encode()).recipients[0].address == "jörg@bücher.example"


@pytest.mark.parametrize("raw", [
    b'{"version": 1, "arrival": NaN}',
    b'{"version": 1, "arrival": Infinity}',
    b'{"version": 1, "arrival": 1e999}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"version": 1, "attempts": ' + b"9" * 5000 + b"}",
])
def test_json_that_python_parses_loosely_is_refused(raw):
    with pytest.raises(EnvelopeFormatError):
        Envelope.from_json(raw)
