"""Tests for mailhub.delivery.aliases: the aliases(5) syntax, its errors, include files."""

from __future__ import annotations

import os

import pytest

from mailhub.delivery.aliases import AliasesError, AliasesFile, is_safe_include, load_include, parse_aliases, parse_include

TABLE = """\
# system aliases
root: alice
Abuse: root

team: alice,
  bob ,
\tcarol@bücher.example
    # a comment inside an entry is just a comment
  , friend@remote.example
sales@example.org: bob
sales: nobody-here
"quoted name": bob
"""


def test_parse_aliases_table():
    table = parse_aliases(TABLE, "aliases")
    keys = set(table)
    assert ("root", None) in keys
    assert ("abuse", None) in keys
    assert ("sales", "example.org") in keys
    assert ("sales", None) in keys
    assert ("quoted name", None) in keys
    team = table[("team", None)]
    assert [(t.local, t.domain) for t in team] == [
        ("alice", None), ("bob", None), ("carol", "xn--bcher-kva.example"), ("friend", "remote.example"),
    ]


@pytest.mark.parametrize(
    "text, line",
    [
        ("  leading: continuation\n", 1),
        ("root alice\n", 1),
        ("root: alice\n\nbroken line\n", 3),
        (": alice\n", 1),
        ("../x: alice\n", 1),
        ("a@not..valid: alice\n", 1),
    ],
)
def test_syntax_errors(text, line):
    with pytest.raises(AliasesError) as e:
        parse_aliases(text, "/etc/aliases")
    assert str(e.value).startswith(f"/etc/aliases:{line}: ")


def test_include_file_targets_by_comma_or_line():
    targets = parse_include("# list\nalice, bob\n\ncarol@remote.example\n:include:/etc/more\n", "/etc/list")
    assert [(t.kind, t.local, t.domain, t.path) for t in targets] == [
        ("address", "alice", None, ""),
        ("address", "bob", None, ""),
        ("address", "carol", "remote.example", ""),
        ("include", "", None, "/etc/more"),
    ]


def test_pipe_and_file_targets_are_kept_as_such_and_bad_ones_dropped(logged):
    table = parse_aliases('a: |/bin/cmd, "|/bin/other arg", /var/mail/x, ../bad, bob\n', "/etc/aliases")
    assert [t.kind for t in table[("a", None)]] == ["pipe", "pipe", "file", "address"]
    assert any("not supported" in line for line in logged())


def test_unsafe_include_files_are_not_read(tmp_path):
    path = tmp_path / "list"
    path.write_text("alice\n")
    os.chmod(path, 0o666)
    assert is_safe_include(os.stat(path)) == "world-writable"
    assert load_include(str(path)) == (None, "world-writable")
    os.chmod(path, 0o644)
    targets, error = load_include(str(path))
    assert error is None and [t.local for t in targets] == ["alice"]
    link = tmp_path / "link"
    link.symlink_to(path)
    assert load_include(str(link)) == (None, "is a symbolic link (not followed)")
    assert is_safe_include(os.stat(tmp_path)) == "not a regular file"


def test_aliases_file_lookup_domain_key_first_and_foreign_domain_ignored(tmp_path, logged):
    path = tmp_path / "aliases"
    path.write_text("sales@example.org: bob\nsales: carol\nx@other.example: dave\n")
    f = AliasesFile(str(path), frozenset({"example.org", "b.example"}))
    assert [t.local for t in f.lookup("sales", "example.org")] == ["bob"]
    assert [t.local for t in f.lookup("sales", "b.example")] == ["carol"]
    assert f.lookup("nobody", "example.org") is None
    assert any("is not a local domain" in line for line in logged())


def test_aliases_file_that_cannot_be_read_is_an_error(tmp_path):
    with pytest.raises(AliasesError) as e:
        AliasesFile(str(tmp_path / "missing"), frozenset())
    assert str(e.value).startswith(f"{tmp_path / 'missing'}: cannot read: ")
