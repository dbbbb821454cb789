"""
What the property-based (fuzz) tests share (not a test file).

Owns: the Hypothesis profiles ("ci": few examples, the default; "long": a
campaign, chosen with MAILHUB_FUZZ=long; see docs/testing.rst), a log
observer that collects tracebacks and critical events, and the checks on
the shape of SMTP replies.  Must not hold assertions about one protocol's
transcripts: those stay in tests/test_fuzz_smtp.py and
tests/test_fuzz_httpapi.py.
"""

from __future__ import annotations

import os
import re
from typing import Any

from hypothesis import HealthCheck, settings
from twisted.logger import LogLevel, globalLogPublisher

# "ci" keeps the two fuzz files well under a minute together on a loaded
# 2-core machine; "long" is a campaign (minutes to hours, see docs/testing.rst).
# No deadline: a slow example on a shared CI machine is not a failure.
_COMMON: dict[str, Any] = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("ci", max_examples=40, print_blob=True, **_COMMON)
settings.register_profile("long", max_examples=5000, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=300, **_COMMON)

PROFILE = os.environ.get("MAILHUB_FUZZ", "ci")
if PROFILE not in ("ci", "long", "dev"):
    raise ValueError(f"MAILHUB_FUZZ must be ci, dev or long, not {PROFILE!r}")
settings.load_profile(PROFILE)

#: RFC 5321 4.5.3.1.5: a reply line is at most 512 octets, CRLF included.
MAX_REPLY_LINE = 512
# RFC 5321 4.2: Reply-code SP/"-" textstring CRLF; textstring is HT and printable US-ASCII.
_REPLY_LINE = re.compile(rb"[2-5][0-9][0-9](?:[ -][\t\x20-\x7e]*)?\r\n\Z")


def bad_reply_lines(output: bytes) -> list[bytes]:
    """
    The lines of C{output} (everything a server wrote) that are not
    well-formed reply lines: not C{code[ -]text CRLF}, not ASCII, longer
    than 512 octets, or a fragment without its CRLF at the end.
    """
    bad = []
    for line in output.splitlines(keepends=True):
        if len(line) > MAX_REPLY_LINE or not _REPLY_LINE.match(line):
            bad.append(line)
    return bad


class LogCapture:
    """
    Collects the log events that mean a bug: a traceback (C{log_failure})
    or a level of error or above (C{log.failure} and C{log.critical} are
    both).  Use as a context manager around one example.
    """

    def __init__(self) -> None:
        self.bad: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if "log_failure" in event or level in (LogLevel.error, LogLevel.critical):
            self.bad.append(event)

    def __enter__(self) -> LogCapture:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)

    def describe(self) -> list[str]:
        out = []
        for event in self.bad:
            failure = event.get("log_failure")
            text = event.get("log_format") or ""
            if failure is not None:
                text += "\n" + failure.getTraceback()
            out.append(text)
        return out
