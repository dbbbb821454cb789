"""
docs/configuration.rst documents exactly the configuration keys that exist,
each with its real default.

The page's convention (stated in its "Keys" section): every key is the term
of a definition list, a line at the left margin such as::

    ``max_hops`` (default ``50``, Postfix ``hopcount_limit``)
    ``tls_cert``, ``tls_key`` (default: not set)
    ``path`` (default ``DATA/spool``)

``(default VALUE)`` is the default as TOML writes it, compared, after the
key's own checker, with the default of the key's dataclass field;
``DATA/NAME`` is a name in the data directory, compared with the field's
metadata and with what the loader makes of it; ``(default: words)`` is a key
that is not set by default or that the loader fills in at start.  The
section of a key is the ``[section]`` in the heading above it ("Top level":
outside any section).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import MISSING
from typing import Any

import pytest

from mailhub.config import load_config
from mailhub.configcheck import BadValue
from mailhub.configschema import MILTER_KEYS, SCHEMA, SECTIONS, TOP_KEYS, key_field

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "configuration.rst")

_KEY = re.compile(r"``(\w+)``")
_SECTION = re.compile(r"``\[\[?(\w+)\]\]?``")  # [section], or [[milter]] (an array of tables)
_VALUE = re.compile(r"default ``(.+?)``(?!`)")


def _closing(line: str, start: int) -> int:
    """The index of the parenthesis that closes the one before C{start}; ``...`` spans are skipped."""
    depth, i = 1, start
    while i < len(line):
        if line.startswith("``", i):
            end = line.find("``", i + 2)
            assert end > 0, f"unclosed literal in {line!r}"
            i = end + 2
            continue
        if line[i] == "(":
            depth += 1
        elif line[i] == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise AssertionError(f"unclosed parenthesis in {line!r}")


def parse_term(line: str) -> list[tuple[str, str]]:
    """
    The keys a definition-list term names, each with the text in the
    parentheses that follow it: C{[("min_uid", "default ``1000``"), ...]}.
    """
    entries: list[tuple[str, str]] = []
    pending: list[str] = []
    i = 0
    while i < len(line):
        m = _KEY.match(line, i)
        if m:
            pending.append(m.group(1))
            i = m.end()
        elif line.startswith(" (", i) and pending:
            end = _closing(line, i + 2)
            entries.extend((name, line[i + 2 : end]) for name in pending)
            pending = []
            i = end + 1
        elif line.startswith(", ", i):
            i += 2
        else:
            break  # words after the last default ("system mode")
    assert not pending, f"no default given for {pending} in {line!r}"
    return entries


def documented_keys(text: str) -> list[tuple[str, str, str]]:
    """(section, key, default text) for each key in the "Keys" section; section "" is the top level."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line == "Keys" and set(lines[i + 1]) == {"-"})
    section: str | None = None
    found = []
    for i in range(start + 2, len(lines)):
        line, below = lines[i], lines[i + 1] if i + 1 < len(lines) else ""
        if below and set(below) == {"-"}:
            break  # the next top-level heading
        if below and set(below) == {"~"}:
            m = _SECTION.search(line)
            section = m.group(1) if m else "" if line == "Top level" else None
            assert section is not None, f"heading names no section: {line!r}"
            continue
        if line.startswith("``") and below.startswith(" "):
            assert section is not None, f"key before any section heading: {line!r}"
            found.extend((section, name, default) for name, default in parse_term(line))
    return found


@pytest.fixture(scope="module")
def documented() -> list[tuple[str, str, str]]:
    with open(DOCS, encoding="utf-8") as f:
        return documented_keys(f.read())


def existing_keys() -> set[tuple[str, str]]:
    keys = {(section, name) for section, names in SCHEMA.items() for name in names}
    return keys | {("", name) for name in TOP_KEYS} | {("milter", name) for name in MILTER_KEYS}


def real_default(section: str, name: str) -> Any:
    f = key_field(section, name)
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def test_the_documented_keys_are_exactly_the_keys_that_exist(documented):
    names = [(section, name) for section, name, _default in documented]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []  # each key documented once
    assert set(names) - existing_keys() == set(), "documented but not a key"
    assert existing_keys() - set(names) == set(), "a key that is not documented"


def test_each_documented_default_is_the_real_default(documented, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = load_config(None, data_dir=str(tmp_path / "data"))
    wrong = []
    for section, name, text in documented:
        f = key_field(section, name)
        m = _VALUE.match(text)
        if m is None and not text.startswith("default: "):
            wrong.append(f"{section}.{name}: want (default ``VALUE``) or (default: words), got ({text})")
            continue
        if m is None:
            # not set, or found at start: no default in the dataclass
            if real_default(section, name) not in (None, MISSING) or f.metadata["data_dir"]:
                wrong.append(f"{section}.{name}: documented ({text}), real default {real_default(section, name)!r}")
            continue
        value = m.group(1)
        if value.startswith("DATA/"):
            below = value.removeprefix("DATA/")
            if f.metadata["data_dir"] != below:
                wrong.append(f"{section}.{name}: documented {value}, real default DATA/{f.metadata['data_dir']}")
            elif getattr(getattr(loaded, section), name) != str(tmp_path / "data" / below):
                wrong.append(f"{section}.{name}: the loader does not put it at DATA/{below}")
            continue
        checker, _is_path = f.metadata["check"], f.metadata["path"]
        try:
            documented_value = checker(tomllib.loads(f"v = {value}")["v"])
        except (tomllib.TOMLDecodeError, BadValue) as e:
            wrong.append(f"{section}.{name}: documented default ``{value}`` is not a valid value: {e}")
            continue
        if documented_value != real_default(section, name):
            wrong.append(f"{section}.{name}: documented ``{value}``, real default {real_default(section, name)!r}")
    assert wrong == []


def test_the_sections_of_the_page_are_the_sections_of_the_configuration(documented):
    assert {section for section, _name, _default in documented} == {"", *SECTIONS, "milter"}


# -- the parser itself -------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, entries",
    [
        (
            "``max_hops`` (default ``50``, Postfix ``hopcount_limit``)",
            [("max_hops", "default ``50``, Postfix ``hopcount_limit``")],
        ),
        ("``tls_cert``, ``tls_key`` (default: not set)", [("tls_cert", "default: not set"), ("tls_key", "default: not set")]),
        (
            "``min_uid`` (default ``1000``), ``max_uid`` (default ``60000``), system mode",
            [("min_uid", "default ``1000``"), ("max_uid", "default ``60000``")],
        ),
        (
            "``hostname`` (default: the host's name, ``socket.getfqdn()``)",
            [("hostname", "default: the host's name, ``socket.getfqdn()``")],
        ),
        (
            '``event_log`` (default ``DATA/events.jsonl``; ``""`` = off)',
            [("event_log", 'default ``DATA/events.jsonl``; ``""`` = off')],
        ),
    ],
)
def test_parse_term(line, entries):
    assert parse_term(line) == entries


def test_a_key_without_a_default_is_refused():
    with pytest.raises(AssertionError, match="no default given"):
        parse_term("``connect_timeout``, ``greeting_timeout`` (default ``30``), ``command_timeout``")


def test_documented_keys_reads_sections_and_stops_at_the_next_part():
    text = "\n".join([
        "Keys", "----", "",
        "Top level", "~~~~~~~~~", "",
        "``data_dir`` (default ``\"d\"``)", "   The directory.", "",
        "``[relay]``: retrying", "~~~~~~~~~~~~~~~~~~~~~", "",
        "``port`` (default ``25``)", "   A port.", "``not_a_term`` (default ``1``)", "",
        "Next", "----", "",
        "``after`` (default ``1``)", "   Not a key.",
    ])
    assert documented_keys(text) == [("", "data_dir", 'default ``"d"``'), ("relay", "port", "default ``25``")]
