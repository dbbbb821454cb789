"""
Tests for mailhub.rfc5322: header field lines, scanning a header section,
Date / Message-ID completion, dates and the Received trace header.  Pure
functions: every time is passed in.
"""

from __future__ import annotations

import email
import email.policy
import time

import pytest

from mailhub.rfc5322 import (
    complete_header,
    field_name,
    format_date,
    is_field_line,
    message_id,
    missing_fields,
    scan_header,
    trace_header,
)

WHEN = 1_700_000_000.25  # Tue, 14 Nov 2023 22:13:20 +0000
DATE = "Tue, 14 Nov 2023 22:13:20 +0000"


# -- field lines ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"Subject: hello\r\n", True),
        (b"Subject:\r\n", True),  # empty value
        (b"Subject : hello\r\n", True),  # obsolete white space before the colon (RFC 5322 4.5)
        (b"Subject\t: hello\r\n", True),
        (b"X-A.b_c~!: v\r\n", True),  # any printable ASCII but the colon
        (b"no colon here\r\n", False),  # space inside a name: not a field
        (b"NoColon\r\n", False),
        (b": value\r\n", False),  # empty name
        (b" folded: value\r\n", False),  # a continuation line, not a field start
        (b"Subj\xc3\xa9ct: v\r\n", False),  # 8-bit octets in the name
        (b"Subject: caf\xc3\xa9\r\n", True),  # 8-bit octets in the value are the value's business
        (b"\r\n", False),
        (b"", False),
    ],
)
def test_is_field_line(line, expected):
    assert is_field_line(line) is expected


def test_field_name_is_lower_case_without_white_space():
    assert field_name(b"Message-ID: <a@b>\r\n") == b"message-id"
    assert field_name(b"DATE \t: x\r\n") == b"date"


# -- scanning a header section ------------------------------------------------------------


def test_scan_stops_at_the_empty_line():
    msg = b"From: a@example.org\r\nSubject: x\r\n\r\nDate: not a header\r\n"
    h = scan_header(msg)
    assert h.names == {b"from", b"subject"}
    assert (h.end, h.separator) == (msg.index(b"\r\n\r\n") + 2, True)


def test_scan_folded_lines_belong_to_their_field():
    msg = b"Subject: a long\r\n subject\r\n\tstill it\r\nTo: b@example.org\r\n\r\nbody\r\n"
    h = scan_header(msg)
    assert h.names == {b"subject", b"to"} and h.separator


def test_scan_obs_fold_line_of_white_space_only():
    # RFC 5322 4.2: obs-FWS allows a continuation line holding only white space
    msg = b"Subject: a\r\n \r\nTo: b@example.org\r\n\r\nbody\r\n"
    h = scan_header(msg)
    assert h.names == {b"subject", b"to"}
    assert msg[h.end :] == b"\r\nbody\r\n"


def test_scan_continuation_before_any_field_starts_the_body():
    msg = b" indented first line\r\nSubject: x\r\n"
    h = scan_header(msg)
    assert (h.names, h.end, h.separator) == (frozenset(), 0, False)


def test_scan_line_without_colon_starts_the_body():
    msg = b"Subject: x\r\nthis is the body\r\nDate: no\r\n"
    h = scan_header(msg)
    assert h.names == {b"subject"}
    assert (msg[h.end :], h.separator) == (b"this is the body\r\nDate: no\r\n", False)


def test_scan_message_without_body_or_final_line_end():
    h = scan_header(b"Subject: x\r\nTo: y")
    assert (h.names, h.end, h.separator) == ({b"subject", b"to"}, len(b"Subject: x\r\nTo: y"), False)


def test_scan_bare_lf_does_not_end_a_line():
    # lines end in CRLF; a bare LF (or CR) stays inside the line, so a field
    # name after it is not seen and an LF LF is not the empty line
    msg = b"Subject: x\nDate: hidden\n\nX-After: y\r\n\r\nbody\r\n"
    h = scan_header(msg)
    assert h.names == {b"subject"} and h.separator
    assert msg[h.end :] == b"\r\nbody\r\n"


def test_scan_8bit_name_starts_the_body():
    msg = b"Subject: x\r\nN\xe4me: v\r\n\r\n"
    h = scan_header(msg)
    assert h.names == {b"subject"} and not h.separator


# -- completion ---------------------------------------------------------------------------


def test_complete_adds_date_and_message_id_at_the_end_of_the_header():
    msg = b"Subject: x\r\n\r\nbody\r\n"
    out = complete_header(msg, "mx.example", WHEN, token="00112233aabbccdd")
    assert out == (
        b"Subject: x\r\n"
        b"Date: " + DATE.encode() + b"\r\n"
        b"Message-ID: <20231114221320.00112233aabbccdd@mx.example>\r\n"
        b"\r\nbody\r\n"
    )


def test_complete_keeps_existing_fields_in_any_case_and_the_body_byte_for_byte():
    msg = b"DATE: Mon, 1 Jan 2024 00:00:00 +0000\r\nmessage-id : <m@x>\r\n\r\nDate: body\r\n\x00\xff"
    assert complete_header(msg, "mx.example", WHEN) == msg


def test_complete_inserts_the_empty_line_before_a_body_without_one():
    msg = b"Subject: x\r\nnot a field\r\n"
    out = complete_header(msg, "mx.example", WHEN, token="t")
    assert out.endswith(b"Message-ID: <20231114221320.t@mx.example>\r\n\r\nnot a field\r\n")
    assert out.startswith(b"Subject: x\r\nDate: ")


def test_complete_header_only_message():
    out = complete_header(b"Subject: x\r\n", "h", WHEN, token="t")
    assert out == b"Subject: x\r\nDate: " + DATE.encode() + b"\r\nMessage-ID: <20231114221320.t@h>\r\n\r\n"


def test_completed_message_parses():
    out = complete_header(b"Subject: x\r\n folded\r\n\r\nhi\r\n", "mx.example", WHEN)
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg["Subject"] == "x folded"
    assert msg["Date"].datetime.timestamp() == int(WHEN)
    assert msg["Message-ID"].endswith("@mx.example>")


def test_missing_fields_resent_prefix():
    names = {b"date", b"message-id", b"resent-date"}
    assert missing_fields(names, "h", WHEN, prefix="Resent-", token="t") == [
        "Resent-Message-ID: <20231114221320.t@h>"
    ]
    assert missing_fields({b"date", b"message-id"}, "h", WHEN) == []


def test_message_ids_are_unique_and_use_the_given_time():
    ids = {message_id("h.example", WHEN) for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("<20231114221320.") and i.endswith("@h.example>") for i in ids)


# -- dates and trace headers ----------------------------------------------------------------


def test_format_date_utc():
    assert format_date(WHEN) == DATE
    assert format_date(WHEN + 0.5) == DATE  # same second, same text
    assert format_date(WHEN + 1) == "Tue, 14 Nov 2023 22:13:21 +0000"


def test_format_date_localtime(monkeypatch):
    monkeypatch.setenv("TZ", "XYZ-1")  # POSIX form: one hour east of UTC, no tz database needed
    time.tzset()
    try:
        assert format_date(WHEN, localtime=True) == "Tue, 14 Nov 2023 23:13:20 +0100"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_trace_header_folds_one_clause_per_line():
    assert trace_header(["from a ([192.0.2.1])", "by b (mailhub) with ESMTP id Q", "for <c@d>"], DATE) == (
        b"Received: from a ([192.0.2.1])\r\n\tby b (mailhub) with ESMTP id Q\r\n\tfor <c@d>; " + DATE.encode() + b"\r\n"
    )


@pytest.mark.parametrize(
    "content,between",
    [(b" x\r\n", b"\r\n"), (b"\tx\r\n", b"\r\n"), (b"Subject: x\r\n", b""), (b"\r\nbody", b""), (b"", b"")],
)
def test_after_trace_header_ends_it_before_a_leading_continuation_line(content, between):
    from mailhub.rfc5322 import after_trace_header

    assert after_trace_header(content) == between
