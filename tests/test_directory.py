"""Tests for mailhub.delivery.directory: local domains, mailboxes, extensions, alias expansion, safety."""

from __future__ import annotations

import os

import pytest
from twisted.internet.task import Clock

from mailhub.address import Mailbox, parse_mailbox
from mailhub.delivery.aliases import AliasesError
from mailhub.delivery.directory import (
    MAX_ALIAS_DEPTH,
    AliasLoop,
    AliasUnavailable,
    Directory,
    InvalidMailbox,
    RecipientError,
    UnknownRecipient,
    UnsafeMailbox,
    UnsupportedAlias,
)

DOMAINS = ("example.org", "Bücher.example")


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "mailboxes"
    for dom, user in [("example.org", "alice"), ("example.org", "bob"), ("xn--bcher-kva.example", "carol"),
                      ("example.org", "%2e%2e"), ("example.org", "alice+tag")]:
        (root / dom / user).mkdir(parents=True)
    return root


def make(root, aliases: str | None = None, tmp=None, **kw) -> Directory:
    path = None
    if aliases is not None:
        path = os.path.join(str(root), "..", "aliases")
        with open(path, "w") as f:
            f.write(aliases)
    return Directory(DOMAINS, str(root), aliases_path=path, **kw)


def resolve(d: Directory, text: str) -> list[str]:
    return d.resolve(parse_mailbox(text))


# -- domains ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "domain, local",
    [
        ("example.org", True),
        ("EXAMPLE.ORG", True),
        ("example.org.", True),
        ("bücher.example", True),
        ("xn--bcher-kva.example", True),
        ("BÜCHER.example", True),
        ("example.com", False),
        ("sub.example.org", False),
        ("not a domain", False),
        ("", False),
    ],
)
def test_is_local(root, domain, local):
    assert make(root).is_local(domain) is local


# -- mailboxes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rcpt, expected",
    [
        ("alice@example.org", ["alice@example.org"]),
        ("Alice@EXAMPLE.org", ["alice@example.org"]),
        ('"alice"@example.org', ["alice@example.org"]),
        ("carol@bücher.example", ["carol@xn--bcher-kva.example"]),
        ("carol@xn--bcher-kva.example", ["carol@xn--bcher-kva.example"]),
        # users list: "dave" in every local domain, "erin" only in example.org
        ("dave@example.org", ["dave@example.org"]),
        ("dave@bücher.example", ["dave@xn--bcher-kva.example"]),
        ("erin@example.org", ["erin@example.org"]),
        # postmaster always exists, in every local domain, any case
        ("postmaster@example.org", ["postmaster@example.org"]),
        ("PostMaster@bücher.example", ["postmaster@xn--bcher-kva.example"]),
        # extensions: strip when the full name is unknown, keep when it exists
        ("bob+lists@example.org", ["bob@example.org"]),
        ("bob+a+b@example.org", ["bob@example.org"]),
        ("alice+tag@example.org", ["alice+tag@example.org"]),
        ("alice+other@example.org", ["alice@example.org"]),
        ("dave+x@bücher.example", ["dave@xn--bcher-kva.example"]),
        ("postmaster+x@example.org", ["postmaster@example.org"]),
        # a percent-encoded dot-dot is just a name
        ("%2e%2e@example.org", ["%2e%2e@example.org"]),
    ],
)
def test_resolve_mailboxes(root, rcpt, expected):
    d = make(root, users=["dave", "erin@Example.ORG"])
    assert resolve(d, rcpt) == expected


@pytest.mark.parametrize(
    "rcpt",
    [
        "nobody@example.org",
        "erin@bücher.example",  # listed for example.org only
        "carol@example.org",  # has a mailbox in the other domain only
        "+tag@example.org",
        "bob-lists@example.org",  # not the separator
        "%2e%2e%2fetc@example.org",
    ],
)
def test_unknown(root, rcpt):
    d = make(root, users=["dave", "erin@example.org"])
    with pytest.raises(UnknownRecipient) as e:
        resolve(d, rcpt)
    assert (e.value.code, e.value.enhanced, e.value.text) == (550, "5.1.1", "User unknown in local recipient table")


def test_extensions_disabled(root):
    d = make(root, separator="")
    assert resolve(d, "alice+tag@example.org") == ["alice+tag@example.org"]
    with pytest.raises(UnknownRecipient):
        resolve(d, "bob+lists@example.org")


def test_other_separator(root):
    d = make(root, separator="-")
    assert resolve(d, "bob-lists@example.org") == ["bob@example.org"]
    with pytest.raises(UnknownRecipient):
        resolve(d, "bob+lists@example.org")


def test_not_local_domain(root):
    with pytest.raises(RecipientError) as e:
        resolve(make(root), "alice@example.com")
    assert (e.value.code, e.value.enhanced) == (550, "5.1.2")


@pytest.mark.parametrize(
    "local",
    ["..", ".", ".hidden", "a/b", "../alice", "..%2f", "a\\b", "a\x00b", "a\nb", "a\x7fb", '"../bob"', '"a/b"',
     '"."', '"a\\\\b"', "x..y"],
)
def test_traversal_rejected(root, local):
    # Mailbox built directly: the directory must not rely on the parser.
    d = make(root, users=["dave"])
    with pytest.raises(InvalidMailbox) as e:
        d.resolve(Mailbox(local, "example.org"))
    assert (e.value.code, e.value.enhanced, e.value.text) == (550, "5.1.3", "invalid mailbox name")


@pytest.mark.parametrize(
    "addr", ["../x@example.org", "a/b@example.org", ".hidden@example.org", "a\x00@example.org", "@example.org",
             "alice@../../etc", "alice@example.com", "alice"],
)
def test_maildir_for_rejects(root, addr):
    with pytest.raises(InvalidMailbox):
        make(root).maildir_for(addr)


def test_maildir_for(root):
    d = make(root)
    assert d.maildir_for("alice@example.org") == os.path.join(str(root), "example.org", "alice")
    assert d.maildir_for("Alice@Bücher.Example") == os.path.join(str(root), "xn--bcher-kva.example", "alice")
    assert d.maildir_for('"john doe"@example.org') == os.path.join(str(root), "example.org", "john doe")
    assert os.path.isabs(make(os.path.relpath(root)).maildir_for("bob@example.org"))


def test_symlinked_mailbox_is_refused_wherever_it_points(root, tmp_path, logged):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), str(root / "example.org" / "mallory"))
    os.symlink("../../..", str(root / "example.org" / "up"))
    # pointing back inside the root: refused too (never followed below the root)
    os.symlink(str(root / "example.org" / "alice"), str(root / "example.org" / "alias-of-alice"))
    os.symlink("alice", str(root / "example.org" / "relative-alice"))
    d = make(root)
    for rcpt in ("mallory@example.org", "up@example.org", "alias-of-alice@example.org", "relative-alice@example.org"):
        with pytest.raises(UnsafeMailbox) as e:
            resolve(d, rcpt)
        assert (e.value.code, e.value.enhanced) == (451, "4.3.5")
        with pytest.raises(UnsafeMailbox):
            d.maildir_for(rcpt)
    lines = logged()
    assert any(str(root / "example.org" / "mallory") in line and "symbolic link" in line for line in lines)
    assert resolve(d, "alice@example.org") == ["alice@example.org"]


def test_symlinked_domain_dir_inside_the_root_is_refused(root):
    (root / "other.example").mkdir()
    (root / "other.example" / "alice").mkdir()
    os.symlink("other.example", str(root / "example.com"))
    d = Directory(["example.org", "example.com"], str(root), users=["alice"])
    with pytest.raises(UnsafeMailbox):
        resolve(d, "alice@example.com")


@pytest.mark.parametrize("level", ["domain", "mailbox"])
def test_sibling_of_the_root_with_the_same_prefix_is_outside(tmp_path, level):
    """<root>-evil/ starts with the root's name: it is still outside the root."""
    root = tmp_path / "mailboxes"
    evil = tmp_path / "mailboxes-evil"
    (root / "example.org").mkdir(parents=True)
    (evil / "example.org" / "eve").mkdir(parents=True)
    if level == "domain":
        os.rmdir(root / "example.org")
        os.symlink("../mailboxes-evil/example.org", str(root / "example.org"))
    else:
        os.symlink("../../mailboxes-evil/example.org/eve", str(root / "example.org" / "eve"))
    assert os.path.isdir(root / "example.org" / "eve")  # the link resolves
    d = Directory(["example.org"], str(root), users=["eve"])
    with pytest.raises(UnsafeMailbox):
        resolve(d, "eve@example.org")
    with pytest.raises(UnsafeMailbox):
        d.maildir_for("eve@example.org")


def test_symlinked_domain_dir_escape(tmp_path):
    root = tmp_path / "mb"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "alice").mkdir(parents=True)
    os.symlink(str(elsewhere), str(root / "example.org"))
    d = Directory(["example.org"], str(root), users=["alice"])
    with pytest.raises(UnsafeMailbox):
        d.maildir_for("alice@example.org")


def test_symlinked_root_is_fine(tmp_path):
    real = tmp_path / "real"
    (real / "example.org" / "alice").mkdir(parents=True)
    os.symlink(str(real), str(tmp_path / "link"))
    d = Directory(["example.org"], str(tmp_path / "link"))
    assert resolve(d, "alice@example.org") == ["alice@example.org"]
    assert d.maildir_for("alice@example.org") == str(tmp_path / "link" / "example.org" / "alice")


def test_may_create(root):
    d = make(root, users=["dave", "erin@example.org"])
    assert d.may_create("dave@bücher.example")
    assert d.may_create("erin@example.org")
    assert d.may_create("postmaster@example.org")
    assert not d.may_create("alice@example.org")  # exists only as a directory
    assert not d.may_create("erin@bücher.example")


# -- aliases ----------------------------------------------------------------

ALIASES = """\
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
self: self, bob
both: alice, Alice, alice@example.org, ALICE@EXAMPLE.ORG
list: team, root, friend@Remote.Example, Friend@remote.example
pm: postmaster
postmaster: alice
"""


@pytest.mark.parametrize(
    "rcpt, expected",
    [
        ("root@example.org", ["alice@example.org"]),
        ("ABUSE@example.org", ["alice@example.org"]),
        ("root@bücher.example", ["alice@xn--bcher-kva.example"]),  # bare target = same domain
        ("team@example.org", ["alice@example.org", "bob@example.org", "carol@xn--bcher-kva.example",
                              "friend@remote.example"]),
        ("sales@example.org", ["bob@example.org"]),  # domain-specific key wins
        ('"quoted name"@example.org', ["bob@example.org"]),
        ("both@example.org", ["alice@example.org"]),  # duplicates removed
        ("list@example.org", ["alice@example.org", "bob@example.org", "carol@xn--bcher-kva.example",
                              "friend@remote.example", "Friend@remote.example"]),  # remote local parts keep case
        ("root+tag@example.org", ["alice@example.org"]),
        ("postmaster@example.org", ["alice@example.org"]),  # alias defined: used
        ("pm@bücher.example", ["alice@xn--bcher-kva.example"]),
    ],
)
def test_alias_resolution(root, rcpt, expected):
    d = make(root, ALIASES, users=["dave", "alice"])
    assert resolve(d, rcpt) == expected


def test_alias_member_missing(root, logged):
    d = make(root, ALIASES)
    # "sales" (generic key) lists only a missing user: rejected, not accepted-then-bounced
    with pytest.raises(UnknownRecipient):
        resolve(d, "sales@bücher.example")
    assert any("does not exist" in line for line in logged())
    # a list with one missing member still reaches the others
    d = make(root, "grp: alice, ghost, bob\n")
    assert resolve(d, "grp@example.org") == ["alice@example.org", "bob@example.org"]


def test_alias_self_reference_delivers_to_own_mailbox(root):
    d = make(root, "bob: bob, alice\nselfonly: selfonly\npostmaster: postmaster, bob\n")
    assert resolve(d, "bob@example.org") == ["bob@example.org", "alice@example.org"]
    assert resolve(d, "postmaster@example.org") == ["postmaster@example.org", "bob@example.org", "alice@example.org"]
    with pytest.raises(AliasLoop) as e:
        resolve(d, "selfonly@example.org")
    assert (e.value.code, e.value.enhanced) == (550, "5.4.6")


def test_alias_cycle(root):
    d = make(root, "a: b\nb: c\nc: a\nx: y\ny: alice, x\n")
    with pytest.raises(AliasLoop) as e:
        resolve(d, "a@example.org")
    assert (e.value.code, e.value.enhanced) == (550, "5.4.6")
    # a cycle back to a name without a mailbox is a loop even with other members
    with pytest.raises(AliasLoop):
        resolve(d, "x@example.org")


def test_alias_cycle_through_mailbox(root):
    # alice is an alias that reaches alice again: her own mailbox
    d = make(root, "alice: team\nteam: alice, bob\n")
    assert resolve(d, "alice@example.org") == ["alice@example.org", "bob@example.org"]


def test_alias_depth_limit(root):
    chain = "".join(f"a{i}: a{i + 1}\n" for i in range(MAX_ALIAS_DEPTH + 5)) + f"a{MAX_ALIAS_DEPTH + 5}: alice\n"
    d = make(root, chain)
    with pytest.raises(AliasLoop) as e:
        resolve(d, "a0@example.org")
    assert e.value.text == "alias expansion too deep"
    # 20 nested aliases are fine, 21 are not
    assert resolve(d, "a6@example.org") == ["alice@example.org"]
    with pytest.raises(AliasLoop):
        resolve(d, "a5@example.org")


def test_alias_fanout_limit(root):
    many = ", ".join(f"u{i}@remote.example" for i in range(1001))
    d = make(root, f"big: {many}\nok: " + ", ".join(f"u{i}@remote.example" for i in range(1000)) + "\n")
    with pytest.raises(RecipientError) as e:
        resolve(d, "big@example.org")
    assert (e.value.code, e.value.enhanced) == (550, "5.5.3")
    assert len(resolve(d, "ok@example.org")) == 1000


def test_alias_diamond_explosion_bounded(root):
    # each level lists the next three times: 3**15 paths, but one final address
    text = "".join(f"d{i}: d{i + 1}, d{i + 1}+x, d{i + 1}+y\n" for i in range(15)) + "d15: alice\n"
    d = make(root, text)
    with pytest.raises(RecipientError) as e:
        resolve(d, "d0@example.org")
    assert e.value.enhanced == "5.5.3"


def test_pipe_and_file_targets_reject_the_alias(root, tmp_path, logged):
    d = make(root, "prog: |/usr/bin/vacation, alice\nfile: /var/log/mail\ninc: :include:/nonexistent/list\n"
                   'q: "|cmd arg, more", bob\nbad: alice@, bob\nteam: alice, prog\n')
    lines = logged()
    for number, what in [(1, "|/usr/bin/vacation"), (2, "/var/log/mail"), (4, '"|cmd arg, more"'), (5, "alice@")]:
        hits = [line for line in lines if f"aliases:{number}:" in line and what in line]
        assert len(hits) == 1, (number, lines)
    assert any("aliases:1: alias 'prog': pipe target" in line and "550 5.3.0" in line for line in lines)
    assert any("aliases:2: alias 'file': file target" in line for line in lines)
    # never delivered partly: the whole alias is refused, also through another alias
    for rcpt in ("prog@example.org", "file@example.org", "q@example.org", "team@example.org", "prog+x@example.org"):
        with pytest.raises(UnsupportedAlias) as e:
            resolve(d, rcpt)
        assert (e.value.code, e.value.enhanced, e.value.text) == (550, "5.3.0", "alias target type not supported")
    # an invalid address is just skipped
    assert resolve(d, "bad@example.org") == ["bob@example.org"]
    # a missing :include: file is temporary (logged once at load)
    with pytest.raises(AliasUnavailable) as e:
        resolve(d, "inc@example.org")
    assert (e.value.code, e.value.enhanced) == (451, "4.3.0")
    assert len([line for line in logged() if ":include:/nonexistent/list cannot read" in line]) == 1


def test_backslash_target_skips_aliases(root):
    d = make(root, "alice: \\alice, bob\nbob: carol@remote.example\nx: \\ghost, alice\n")
    assert resolve(d, "alice@example.org") == ["alice@example.org", "carol@remote.example"]
    assert resolve(d, "x@example.org") == ["alice@example.org", "carol@remote.example"]


def test_bad_file_at_start_raises(root, tmp_path):
    with pytest.raises(AliasesError):
        make(root, "broken\n")
    with pytest.raises(AliasesError):
        Directory(DOMAINS, str(root), aliases_path=str(tmp_path / "missing"))


# -- reloading -------------------------------------------------------------------------


def rewrite(path: str, text: str, mtime: float) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.utime(path, (mtime, mtime))


def test_reload_on_change(root, tmp_path):
    clock = Clock()
    clock.advance(1000)
    path = str(tmp_path / "aliases")
    rewrite(path, "info: alice\n", 1_000_000)
    d = Directory(DOMAINS, str(root), aliases_path=path, clock=clock)
    assert resolve(d, "info@example.org") == ["alice@example.org"]

    rewrite(path, "info: bob\n", 1_000_010)  # same size, new mtime
    clock.advance(0.5)
    assert resolve(d, "info@example.org") == ["alice@example.org"]  # checked at most once a second
    clock.advance(0.5)
    assert resolve(d, "info@example.org") == ["bob@example.org"]


def test_reload_same_mtime_other_size(root, tmp_path):
    clock = Clock()
    path = str(tmp_path / "aliases")
    rewrite(path, "info: alice\n", 1_000_000)
    d = Directory(DOMAINS, str(root), aliases_path=path, clock=clock)
    rewrite(path, "info: alice, bob\n", 1_000_000)
    clock.advance(1)
    assert resolve(d, "info@example.org") == ["alice@example.org", "bob@example.org"]


def test_reload_replaced_file(root, tmp_path):
    clock = Clock()
    path = str(tmp_path / "aliases")
    rewrite(path, "info: alice\n", 1_000_000)
    d = Directory(DOMAINS, str(root), aliases_path=path, clock=clock)
    new = str(tmp_path / "aliases.new")
    rewrite(new, "info: bob!\n"[:-2] + "\n", 1_000_000)  # "info: bob\n", same mtime, other inode
    os.rename(new, path)
    clock.advance(1)
    assert resolve(d, "info@example.org") == ["bob@example.org"]


def test_broken_reload_keeps_old_table(root, tmp_path, logged):
    clock = Clock()
    path = str(tmp_path / "aliases")
    rewrite(path, "info: alice\n", 1_000_000)
    d = Directory(DOMAINS, str(root), aliases_path=path, clock=clock)
    rewrite(path, "info: bob\nthis is not an alias line\n", 1_000_100)
    clock.advance(1)
    assert resolve(d, "info@example.org") == ["alice@example.org"]
    errors = [line for line in logged() if f"{path}:2:" in line and "keeping the previous table" in line]
    assert len(errors) == 1
    # not reported again while the file stays the same
    clock.advance(5)
    resolve(d, "info@example.org")
    assert len([line for line in logged() if f"{path}:2:" in line]) == 1
    # fixed: picked up
    rewrite(path, "info: bob\n", 1_000_200)
    clock.advance(1)
    assert resolve(d, "info@example.org") == ["bob@example.org"]


def test_deleted_file_keeps_old_table(root, tmp_path, logged):
    clock = Clock()
    path = str(tmp_path / "aliases")
    rewrite(path, "info: alice\n", 1_000_000)
    d = Directory(DOMAINS, str(root), aliases_path=path, clock=clock)
    os.unlink(path)
    clock.advance(1)
    assert resolve(d, "info@example.org") == ["alice@example.org"]
    assert any("cannot read" in line for line in logged())
    rewrite(path, "info: bob\n", 1_000_000)
    clock.advance(1)
    assert resolve(d, "info@example.org") == ["bob@example.org"]


def test_lazy_and_rate_limited(root, tmp_path, monkeypatch):
    """No polling loop; while lookups come in, the file is stat()ed at most once a second."""
    clock = Clock()
    path = str(tmp_path / "aliases")
    rewrite(path, "info: alice\n", 1_000_000)
    d = Directory(DOMAINS, str(root), aliases_path=path, clock=clock)
    assert clock.getDelayedCalls() == []
    import mailhub.delivery.aliases as mod

    stats = []
    real_stat = mod.os.stat

    def counting_stat(p, *a, **kw):
        if p == path:
            stats.append(clock.seconds())
        return real_stat(p, *a, **kw)

    monkeypatch.setattr(mod.os, "stat", counting_stat)
    for _ in range(10):
        resolve(d, "info@example.org")
        clock.advance(0.25)
    assert stats == [1.0, 2.0]


# -- root, MAILER-DAEMON, abuse ------------------------------------------------------


@pytest.mark.parametrize(
    "rcpt, expected",
    [
        ("root@example.org", ["postmaster@example.org"]),
        ("ROOT@bücher.example", ["postmaster@xn--bcher-kva.example"]),
        ("root+cron@example.org", ["postmaster@example.org"]),
        ("MAILER-DAEMON@example.org", ["postmaster@example.org"]),
        ("abuse@example.org", ["postmaster@example.org"]),
    ],
)
def test_root_mailer_daemon_and_abuse_are_postmaster_by_default(root, rcpt, expected):
    assert resolve(make(root), rcpt) == expected


def test_implicit_aliases_give_way_to_the_aliases_file(root):
    d = make(root, "root: alice\npostmaster: bob\n")
    assert resolve(d, "root@example.org") == ["alice@example.org"]
    assert resolve(d, "abuse@example.org") == ["bob@example.org"]  # postmaster's alias
    assert resolve(d, "mailer-daemon@example.org") == ["bob@example.org"]


def test_implicit_aliases_give_way_to_a_mailbox_of_their_own(root):
    (root / "example.org" / "abuse").mkdir()
    d = make(root, users=["root@xn--bcher-kva.example"])
    assert resolve(d, "abuse@example.org") == ["abuse@example.org"]
    assert resolve(d, "root@bücher.example") == ["root@xn--bcher-kva.example"]
    assert resolve(d, "root@example.org") == ["postmaster@example.org"]


def test_postmaster_aliased_to_root_is_not_a_loop(root):
    """postmaster: root (Debian's line) with no root alias: postmaster's own Maildir."""
    d = make(root, "postmaster: root\n")
    assert resolve(d, "postmaster@example.org") == ["postmaster@example.org"]
    assert resolve(d, "root@example.org") == ["postmaster@example.org"]


def test_only_local_domains_have_them(root):
    with pytest.raises(RecipientError) as e:
        resolve(make(root), "root@example.com")
    assert e.value.enhanced == "5.1.2"


def test_symlink_escape_for_listed_user_and_postmaster(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), str(root / "example.org" / "dave"))
    os.symlink(str(outside), str(root / "example.org" / "postmaster"))
    d = make(root, users=["dave"])
    for rcpt in ("dave@example.org", "postmaster@example.org", "dave+x@example.org"):
        with pytest.raises(UnsafeMailbox):
            resolve(d, rcpt)


def test_primary_domain(root):
    assert Directory(["Bücher.example", "example.org"], str(root)).primary_domain == "xn--bcher-kva.example"
