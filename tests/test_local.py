"""Tests for mailhub.delivery.local: Maildir delivery, trace headers, errors as outcomes."""

from __future__ import annotations

import errno
import io
import mailbox
import os
import re
import stat

import pytest
from twisted.internet import defer
from twisted.logger import formatEvent

from mailhub.delivery import local
from mailhub.delivery import maildir as maildir_module
from mailhub.delivery.directory import Directory
from mailhub.delivery.local import LocalDelivery, copy_lf, delivered_to_addresses
from mailhub.envelope import Envelope, Outcome, Recipient
from mailhub.queue.queuefile import open_message, queue_file_bytes

MESSAGE = (
    b"From: Sender <s@remote.example>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: test\r\n"
    b"\r\n"
    b"Hello\r\n"
    b"bare LF line\n"
    b"a CR alone\r stays\r\n"
    b"Delivered-To: alice@example.org\r\n"  # in the body: not a loop
    b"From the body\r\n"
    b"\xc3\xa9t\xc3\xa9 8bit\r\n"
)


def sync_run(f, *a, **kw):
    return defer.maybeDeferred(f, *a, **kw)


def result_of(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire synchronously"
    return out[0]


@pytest.fixture
def logged(events):
    """The raw log events (conftest's C{events}) under this file's name."""
    return events


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "mailboxes"
    for user in ("alice", "bob"):
        (root / "example.org" / user).mkdir(parents=True)
    return root


@pytest.fixture
def directory(root):
    return Directory(["example.org"], str(root), users=["dave"])


@pytest.fixture
def agent(directory):
    return LocalDelivery(directory, "mx.example.org", run=sync_run, fsync=True)


def envelope(sender: str, *rcpts: str) -> Envelope:
    return Envelope("0123456789ABCDEFG", sender, [Recipient(r) for r in rcpts], arrival=1.0)


#: The envelope in the trailer of the queue files the tests write (the
#: agents take theirs as an argument; the trailer only makes the file valid).
TRAILER_ENVELOPE = envelope("s@remote.example", "alice@example.org")


def spool_message(tmp_path, data: bytes = MESSAGE) -> str:
    """A queue file (spool format 2) holding C{data}, as the spool commits it."""
    path = tmp_path / "queued"
    path.write_bytes(queue_file_bytes(data, TRAILER_ENVELOPE))
    return str(path)


def deliver(agent, env, path) -> list[Outcome]:
    return result_of(agent.deliver(env, env.recipients, path, report=lambda outcomes: None))


def files(root, user, sub="new", domain="example.org") -> list[str]:
    d = os.path.join(str(root), domain, user, sub)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def expected_bytes(sender: str, rcpt: str, data: bytes = MESSAGE) -> bytes:
    return f"Return-Path: <{sender}>\nDelivered-To: {rcpt}\n".encode() + data.replace(b"\r\n", b"\n")


def test_deliver_to_two_mailboxes(agent, root, tmp_path):
    path = spool_message(tmp_path)
    env = envelope("s@remote.example", "alice@example.org", "bob@example.org")
    outcomes = deliver(agent, env, path)
    assert outcomes == [
        Outcome("alice@example.org", "delivered", 250, "2.0.0", "delivered to maildir"),
        Outcome("bob@example.org", "delivered", 250, "2.0.0", "delivered to maildir"),
    ]
    for user in ("alice", "bob"):
        md = mailbox.Maildir(str(root / "example.org" / user), create=False)
        keys = md.keys()
        assert len(keys) == 1
        raw = md.get_bytes(keys[0])
        assert raw == expected_bytes("s@remote.example", f"{user}@example.org")
        msg = md[keys[0]]
        assert msg.get_subdir() == "new"
        assert msg["Return-Path"] == "<s@remote.example>"
        assert msg["Delivered-To"] == f"{user}@example.org"
        # apart from the two trace headers, exactly the queued bytes (LF endings)
        assert raw.split(b"\n", 2)[2] == MESSAGE.replace(b"\r\n", b"\n")
        assert files(root, user, "tmp") == []
        assert files(root, user, "cur") == []
    # the queued message is only read: its message is the same bytes, and the
    # queue file as a whole (message, envelope, footer) is unchanged
    with open_message(path) as f:
        assert f.read() == MESSAGE
    with open(path, "rb") as f:
        assert f.read() == queue_file_bytes(MESSAGE, TRAILER_ENVELOPE)


def test_null_sender(agent, root, tmp_path):
    env = envelope("", "alice@example.org")
    assert deliver(agent, env, spool_message(tmp_path))[0].kind == "delivered"
    (name,) = files(root, "alice")
    data = open(os.path.join(str(root), "example.org", "alice", "new", name), "rb").read()
    assert data.startswith(b"Return-Path: <>\nDelivered-To: alice@example.org\nFrom: ")


def test_trace_headers_cannot_inject(agent, root, tmp_path):
    env = envelope("evil@x\r\nX-Injected: 1", "alice@example.org")
    deliver(agent, env, spool_message(tmp_path))
    (name,) = files(root, "alice")
    data = open(os.path.join(str(root), "example.org", "alice", "new", name), "rb").read()
    assert data.startswith(b"Return-Path: <evil@xX-Injected: 1>\nDelivered-To: alice@example.org\n")


def maildir_file(root, user, name, sub="new"):
    return os.path.join(str(root), "example.org", user, sub, name)


def test_unique_names(directory, root, tmp_path):
    agent = LocalDelivery(directory, "host/with:odd", run=sync_run, fsync=False)
    path = spool_message(tmp_path)
    qids = [f"0123456789ABCD{i:03d}" for i in range(20)]
    for qid in qids:
        env = Envelope(qid, "s@x.example", [Recipient("alice@example.org")], arrival=1700000000.25)
        assert deliver(agent, env, path)[0].kind == "delivered"
    names = files(root, "alice")
    assert len(set(names)) == 20
    size = len(expected_bytes("s@x.example", "alice@example.org"))
    pattern = re.compile(rf"1700000000\.M250000Q([0-9A-Z]+)R([0-9a-f]{{12}})\.host\\057with\\072odd,S={size}\Z")
    seen = set()
    for name in names:
        m = pattern.match(name)
        assert m, name
        seen.add(m.group(1))
        assert os.path.getsize(maildir_file(root, "alice", name)) == size
    assert seen == set(qids)
    # one message, several recipients in one mailbox tree: distinct names
    env = envelope("s@x.example", "bob@example.org", "dave@example.org")
    deliver(agent, env, path)
    (b,), (d,) = files(root, "bob"), files(root, "dave")
    assert b.split("R")[1] != d.split("R")[1]


def test_repeated_delivery_is_not_duplicated(agent, root, tmp_path):
    """A delivery repeated after a crash (outcome not yet recorded) leaves one copy."""
    path = spool_message(tmp_path)
    env = envelope("s@x.example", "alice@example.org")
    assert deliver(agent, env, path)[0].kind == "delivered"
    (name,) = files(root, "alice")
    assert deliver(agent, env, path) == [
        Outcome("alice@example.org", "delivered", 250, "2.0.0", "delivered to maildir")
    ]
    assert files(root, "alice") == [name]
    assert files(root, "alice", "tmp") == []
    # a reader moved it to cur/ and marked it seen: still not delivered twice
    os.rename(maildir_file(root, "alice", name), maildir_file(root, "alice", name + ":2,S", "cur"))
    assert deliver(agent, env, path)[0].kind == "delivered"
    assert files(root, "alice") == []
    assert files(root, "alice", "cur") == [name + ":2,S"]
    # a half-written tmp file of the same delivery (crash while writing) is replaced
    os.unlink(maildir_file(root, "alice", name + ":2,S", "cur"))
    with open(maildir_file(root, "alice", name.split(",")[0], "tmp"), "wb") as f:
        f.write(b"partial")
    assert deliver(agent, env, path)[0].kind == "delivered"
    assert files(root, "alice") == [name]
    assert files(root, "alice", "tmp") == []
    with open(maildir_file(root, "alice", name), "rb") as f:
        assert f.read() == expected_bytes("s@x.example", "alice@example.org")


def test_a_link_planted_in_tmp_after_the_cleanup_is_never_written_through(agent, root, tmp_path, monkeypatch):
    """
    The tmp/ file is created exclusively: a hard link to another file that a mailbox owner puts at the
    (predictable) tmp/ name between the cleanup unlink and the open is refused, and the file it points
    to is left as it was.
    """
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    real_unlink = os.unlink
    planted: list[str] = []

    def unlink_then_plant(name, *args, dir_fd=None, **kw):
        real_unlink(name, *args, dir_fd=dir_fd, **kw)
        if dir_fd is not None and not planted:
            os.link(victim, name, dst_dir_fd=dir_fd)
            planted.append(name)

    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(str(root), "example.org", "alice", sub))
    env = envelope("s@x.example", "alice@example.org")
    name = agent.maildir.unique(env.queue_id, env.arrival, "alice@example.org")
    with open(maildir_file(root, "alice", name, "tmp"), "wb"):
        pass  # a leftover of the same delivery: the cleanup unlink runs
    monkeypatch.setattr(maildir_module.os, "unlink", unlink_then_plant)
    outcome = deliver(agent, env, spool_message(tmp_path))[0]
    assert outcome.kind != "delivered"
    assert victim.read_bytes() == b"not yours"
    assert files(root, "alice") == []


def test_no_hard_links_falls_back_to_rename(agent, root, tmp_path, monkeypatch):
    def no_links(*a, **kw):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(maildir_module.os, "link", no_links)
    env = envelope("s@x.example", "alice@example.org")
    path = spool_message(tmp_path)
    assert deliver(agent, env, path)[0].kind == "delivered"
    assert deliver(agent, env, path)[0].kind == "delivered"
    assert len(files(root, "alice")) == 1
    assert files(root, "alice", "tmp") == []


def test_users_list_mailbox_created_on_first_delivery(agent, root, tmp_path):
    assert not (root / "example.org" / "dave").exists()
    outcomes = deliver(agent, envelope("s@x.example", "dave@example.org", "postmaster@example.org"),
                       spool_message(tmp_path))
    assert [o.kind for o in outcomes] == ["delivered", "delivered"]
    for user in ("dave", "postmaster"):
        md = root / "example.org" / user
        for sub in ("", "tmp", "new", "cur"):
            assert stat.S_IMODE(os.stat(md / sub).st_mode) == 0o700, (user, sub)
        assert len(files(root, user)) == 1


def test_users_list_mailbox_in_new_domain_dir(tmp_path):
    root = tmp_path / "mb"
    d = Directory(["example.org", "other.example"], str(root), users=["dave@other.example"])
    agent = LocalDelivery(d, "h", run=sync_run)
    (o,) = deliver(agent, envelope("s@x.example", "dave@other.example"), spool_message(tmp_path))
    assert o.kind == "delivered"
    assert len(files(root, "dave", domain="other.example")) == 1


def test_missing_subdirectories_created(agent, root, tmp_path):
    (root / "example.org" / "alice" / "new").mkdir()
    deliver(agent, envelope("s@x.example", "alice@example.org"), spool_message(tmp_path))
    assert sorted(os.listdir(root / "example.org" / "alice")) == ["cur", "new", "tmp"]
    assert len(files(root, "alice")) == 1


def test_vanished_mailbox_is_permanent(agent, root, tmp_path):
    os.rmdir(root / "example.org" / "bob")
    outcomes = deliver(agent, envelope("s@x.example", "bob@example.org", "alice@example.org"),
                       spool_message(tmp_path))
    assert outcomes[0] == Outcome(
        "bob@example.org", "permanent", 550, "5.1.1", "User unknown in local recipient table"
    )
    assert outcomes[1].kind == "delivered"
    assert not (root / "example.org" / "bob").exists()


@pytest.mark.parametrize(
    "err, kind, code, status",
    [
        (errno.ENOSPC, "temporary", 452, "4.3.1"),
        (errno.EDQUOT, "temporary", 452, "4.2.2"),
        (errno.EACCES, "temporary", 451, "4.2.0"),
        (errno.EPERM, "temporary", 451, "4.2.0"),
        (errno.EIO, "temporary", 451, "4.3.0"),
        (errno.EROFS, "temporary", 451, "4.3.0"),
    ],
)
@pytest.mark.parametrize("preloaded", [True, False])
def test_write_errors_are_temporary_and_clean_tmp(agent, root, tmp_path, monkeypatch, err, kind, code, status, preloaded):
    if not preloaded:
        monkeypatch.setattr(local, "PRELOAD_LIMIT", 0)  # streamed from the spool per recipient
    real_write = local.QueuedMessage.write_to

    def failing_write(self, out):
        assert (self.body is not None) == preloaded
        out.write(b"partial")
        real_write(self, out)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(local.QueuedMessage, "write_to", failing_write)
    outcomes = deliver(agent, envelope("s@x.example", "alice@example.org", "bob@example.org"),
                       spool_message(tmp_path))
    for o in outcomes:
        assert (o.kind, o.code, o.status) == (kind, code, status)
        assert os.strerror(err) in o.text
    for user in ("alice", "bob"):
        assert files(root, user, "tmp") == []
        assert files(root, user, "new") == []


def test_fsync_enospc(agent, root, tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(maildir_module.os, "fsync", no_space)
    (o,) = deliver(agent, envelope("s@x.example", "alice@example.org"), spool_message(tmp_path))
    assert (o.kind, o.code, o.status) == ("temporary", 452, "4.3.1")
    assert files(root, "alice", "tmp") == [] and files(root, "alice", "new") == []


def test_link_eacces(agent, root, tmp_path, monkeypatch):
    def denied(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(maildir_module.os, "link", denied)
    (o,) = deliver(agent, envelope("s@x.example", "alice@example.org"), spool_message(tmp_path))
    assert (o.kind, o.code, o.status) == ("temporary", 451, "4.2.0")
    assert files(root, "alice", "tmp") == []


def test_recipients_of_one_message_are_written_at_the_same_time(agent, root, tmp_path, monkeypatch):
    """Their fsyncs overlap (one journal commit for all); outcomes keep the recipients' order."""
    import threading

    users = ["u%d" % i for i in range(5)]
    for u in users:
        for sub in ("tmp", "new", "cur"):
            (root / "example.org" / u / sub).mkdir(parents=True)
    inside, peak, lock = [0], [0], threading.Lock()
    gate = threading.Barrier(5, timeout=10)
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            return real_fsync(fd)
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        gate.wait()  # all five files are being fsync'd at once, or this times out
        try:
            return real_fsync(fd)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(os, "fsync", fsync)
    env = envelope("s@remote.example", *[f"{u}@example.org" for u in users])
    outcomes = deliver(agent, env, spool_message(tmp_path))
    assert [(o.recipient, o.kind) for o in outcomes] == [(f"{u}@example.org", "delivered") for u in users]
    assert peak[0] == 5
    for u in users:
        assert len(files(root, u)) == 1


def test_the_same_mailbox_twice_is_written_once_in_order(agent, root, tmp_path):
    env = envelope("s@remote.example", "alice@example.org", "Alice@example.org", "bob@example.org")
    outcomes = deliver(agent, env, spool_message(tmp_path))
    assert [o.kind for o in outcomes] == ["delivered"] * 3
    assert len(files(root, "alice")) == 1 and len(files(root, "bob")) == 1


def test_missing_queue_file_is_temporary(agent, tmp_path):
    outcomes = deliver(agent, envelope("s@x.example", "alice@example.org", "bob@example.org"),
                       str(tmp_path / "gone"))
    assert [(o.recipient, o.kind, o.code, o.status) for o in outcomes] == [
        ("alice@example.org", "temporary", 451, "4.3.0"),
        ("bob@example.org", "temporary", 451, "4.3.0"),
    ]


def test_damaged_queue_file_is_temporary_and_says_why(agent, tmp_path, root):
    """A queue file without its footer is never delivered as if it were the message."""
    path = tmp_path / "damaged"
    path.write_bytes(MESSAGE)  # a bare message: no envelope, no footer
    outcomes = deliver(agent, envelope("s@x.example", "alice@example.org"), str(path))
    assert [(o.kind, o.code, o.status, o.text) for o in outcomes] == [
        ("temporary", 451, "4.3.0", "cannot read queued message: no queue file footer"),
    ]
    assert files(root, "alice") == []


def test_unexpected_error_is_temporary_and_logged(agent, tmp_path, monkeypatch, logged):
    def boom(*a):
        raise RuntimeError("bug")

    monkeypatch.setattr(agent.maildir, "write", boom)
    (o,) = deliver(agent, envelope("s@x.example", "alice@example.org"), spool_message(tmp_path))
    assert (o.kind, o.code, o.status) == ("temporary", 451, "4.3.0")
    assert any(e.get("log_failure") is not None and "bug" in str(e["log_failure"].value) for e in logged)


def test_failing_runner_never_errbacks(directory, tmp_path, logged):
    agent = LocalDelivery(directory, "h", run=lambda f, *a, **kw: defer.fail(RuntimeError("thread pool gone")))
    outcomes = deliver(agent, envelope("s@x.example", "alice@example.org"), spool_message(tmp_path))
    assert [(o.kind, o.code, o.status) for o in outcomes] == [("temporary", 451, "4.3.0")]
    assert any("local delivery of" in formatEvent(e) for e in logged)


def test_no_log_per_recipient(agent, tmp_path, logged):
    deliver(agent, envelope("s@x.example", "alice@example.org"), spool_message(tmp_path))
    assert logged == []


def test_invalid_and_unsafe_addresses(agent, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), str(root / "example.org" / "mallory"))
    outcomes = deliver(
        agent,
        envelope("s@x.example", "../alice@example.org", "mallory@example.org", "alice@elsewhere.example"),
        spool_message(tmp_path),
    )
    assert [(o.kind, o.code, o.status) for o in outcomes] == [
        ("permanent", 550, "5.1.3"),
        ("temporary", 451, "4.3.5"),
        ("permanent", 550, "5.1.3"),
    ]
    assert os.listdir(outside) == []


# -- no symlink is followed below the mailbox root ------------------------------------------


def _plant(root, level: str, target) -> str:
    """Replace the directory at C{level} of alice's Maildir with a symlink to C{target}; its path."""
    domain = root / "example.org"
    maildir = domain / "alice"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(exist_ok=True)
    if level == "domain":
        os.rename(domain, root / "real.example")
        link = domain
    elif level == "mailbox":
        os.rename(maildir, domain / "real-alice")
        link = maildir
    else:
        os.rmdir(maildir / level)
        link = maildir / level
    os.symlink(str(target), str(link))
    return str(link)


@pytest.mark.parametrize("level", ["domain", "mailbox", "tmp", "new", "cur"])
@pytest.mark.parametrize("where", ["outside", "inside"])
def test_symlink_at_any_level_is_refused(agent, root, tmp_path, logged, level, where):
    """
    Refused wherever the link points: outside the root, or back inside it
    (to a directory of the same shape); nothing is written through it.
    """
    if where == "outside":
        target = tmp_path / "elsewhere"
        for sub in ("alice/tmp", "alice/new", "alice/cur", "tmp", "new", "cur"):
            (target / sub).mkdir(parents=True)
        target = {"domain": target, "mailbox": target / "alice"}.get(level, target / level)
    else:
        target = root / "inside"
        for sub in ("alice/tmp", "alice/new", "alice/cur", "tmp", "new", "cur"):
            (target / sub).mkdir(parents=True)
        target = {"domain": target, "mailbox": target / "alice"}.get(level, target / level)
    before = sorted(p for p in os.walk(target))
    link = _plant(root, level, target)
    (o,) = deliver(agent, envelope("s@x.example", "alice@example.org"), spool_message(tmp_path))
    assert (o.kind, o.code, o.status) == ("temporary", 451, "4.3.5")
    assert "mailbox location not allowed" in o.text
    assert sorted(p for p in os.walk(target)) == before  # nothing written there
    assert os.path.islink(link)
    assert any(link in line and "symbolic link" in line for line in map(formatEvent, logged))


def test_symlink_at_a_mailbox_not_yet_created_is_refused(agent, root, tmp_path, logged):
    """dave (a listed user) has no Maildir yet; one planted as a link is not followed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), str(root / "example.org" / "dave"))
    (o,) = deliver(agent, envelope("s@x.example", "dave@example.org"), spool_message(tmp_path))
    assert (o.kind, o.code, o.status) == ("temporary", 451, "4.3.5")
    assert os.listdir(outside) == []


def test_symlinked_file_name_in_tmp_is_not_written_through(agent, root, tmp_path):
    """A link planted under the predictable tmp/ name is removed, never written through."""
    for sub in ("tmp", "new", "cur"):
        (root / "example.org" / "alice" / sub).mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    env = envelope("s@x.example", "alice@example.org")
    unique = agent.maildir.unique(env.queue_id, env.arrival, "alice@example.org")
    os.symlink(str(victim), str(root / "example.org" / "alice" / "tmp" / unique))
    (o,) = deliver(agent, env, spool_message(tmp_path))
    assert o.kind == "delivered"
    assert victim.read_bytes() == b"precious\n"
    (name,) = files(root, "alice")
    path = root / "example.org" / "alice" / "new" / name
    assert not os.path.islink(path)
    assert path.read_bytes() == expected_bytes("s@x.example", "alice@example.org")
    assert files(root, "alice", "tmp") == []


def test_sibling_of_the_root_with_the_same_prefix_gets_nothing(tmp_path):
    """<root>-evil/ starts with the root's name; a mailbox linked into it is refused."""
    root = tmp_path / "mailboxes"
    evil = tmp_path / "mailboxes-evil" / "example.org" / "eve"
    (root / "example.org").mkdir(parents=True)
    for sub in ("tmp", "new", "cur"):
        (evil / sub).mkdir(parents=True)
    os.symlink("../../mailboxes-evil/example.org/eve", str(root / "example.org" / "eve"))
    agent = LocalDelivery(Directory(["example.org"], str(root), users=["eve"]), "h", run=sync_run)
    (o,) = deliver(agent, envelope("s@x.example", "eve@example.org"), spool_message(tmp_path))
    assert (o.kind, o.code, o.status) == ("temporary", 451, "4.3.5")
    assert [os.listdir(evil / sub) for sub in ("tmp", "new", "cur")] == [[], [], []]


# -- forwarding loops ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        b"Delivered-To: alice@example.org\r\n",
        b"delivered-to:   <ALICE@example.org> \r\n",
        b"Delivered-To:\r\n alice@example.org\r\n",
    ],
)
def test_forwarding_loop(agent, root, tmp_path, header):
    data = b"Received: from x\r\n" + header + b"Subject: loop\r\n\r\nbody\r\n"
    outcomes = deliver(agent, envelope("s@x.example", "alice@example.org", "bob@example.org"),
                       spool_message(tmp_path, data))
    assert outcomes[0] == Outcome("alice@example.org", "permanent", 554, "5.4.6",
                                  "mail forwarding loop for alice@example.org")
    assert outcomes[1].kind == "delivered"
    assert files(root, "alice") == []


def test_delivered_to_addresses(tmp_path):
    path = spool_message(tmp_path, b"Delivered-To: A@b.example\nX: y\n\tdelivered-to: c@d\n"
                                   b"Delivered-To: <e@f>\n\nDelivered-To: body@x\n")
    assert delivered_to_addresses(path) == {"a@b.example", "e@f"}
    assert delivered_to_addresses(spool_message(tmp_path, b"")) == set()


# -- streaming and line endings ------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 7, 1 << 20])
def test_copy_lf_chunk_boundaries(chunk):
    data = b"a\r\nb\r\r\nc\rd\n\r\n\r\n.\r\n\r" + b"x\r\n" * 10 + b"end\r"
    out = io.BytesIO()
    n = copy_lf(io.BytesIO(data), out, chunk)
    assert out.getvalue() == data.replace(b"\r\n", b"\n")
    assert n == len(out.getvalue())


class RecordingFile(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.sizes: list[int] = []

    def read(self, size=-1):
        self.sizes.append(size)
        return super().read(size)


def test_copy_lf_reads_in_chunks():
    src = RecordingFile(b"line\r\n" * 100000)
    out = io.BytesIO()
    copy_lf(src, out, 65536)
    assert set(src.sizes) == {65536}
    assert len(src.sizes) == 600000 // 65536 + 2


def test_large_message_streamed(agent, root, tmp_path, monkeypatch):
    # 6 MiB, a CRLF falling on many chunk boundaries; reads never exceed the chunk size.
    monkeypatch.setattr(local, "CHUNK_SIZE", 65537)
    line = b"0123456789" * 7 + b"\r\n"
    data = b"Subject: big\r\n\r\n" + line * (6 * 1024 * 1024 // len(line))
    path = spool_message(tmp_path, data)
    sizes = []
    real_copy = local.copy_lf

    def spy(src, dst, chunk_size=None, crlf_only=False):
        real_read = src.read

        def read(n=-1):
            sizes.append(n)
            return real_read(n)

        src.read = read
        return real_copy(src, dst, chunk_size, crlf_only)

    monkeypatch.setattr(local, "copy_lf", spy)
    (o,) = deliver(agent, envelope("s@x.example", "alice@example.org"), path)
    assert o.kind == "delivered"
    assert sizes and set(sizes) == {65537}
    md = mailbox.Maildir(str(root / "example.org" / "alice"), create=False)
    (key,) = md.keys()
    assert md.get_bytes(key) == expected_bytes("s@x.example", "alice@example.org", data)


def test_default_runner_is_a_thread(directory):
    from twisted.internet import threads

    assert LocalDelivery(directory, "h").run is threads.deferToThread


@pytest.mark.parametrize("size", [0, 1, 2, 5, 1000])
def test_preloaded_and_streamed_copies_are_identical(tmp_path, monkeypatch, size):
    """A small message is read once for all recipients; a big one is streamed: the Maildir bytes are the same."""
    raw = b"Subject: s\r\n\r\n" + b"a\rb\r\n" * size + b"end\r"  # CRs alone, CRLFs, a CR at the very end
    path = tmp_path / "msg"
    path.write_bytes(queue_file_bytes(raw, TRAILER_ENVELOPE))
    preloaded = local.QueuedMessage(str(path))
    assert preloaded.body is not None
    monkeypatch.setattr(local, "PRELOAD_LIMIT", 0)
    streamed = local.QueuedMessage(str(path))
    assert streamed.body is None
    outs = []
    for m in (preloaded, streamed):
        out = io.BytesIO()
        assert m.write_to(out) == len(out.getvalue())
        outs.append(out.getvalue())
    assert outs[0] == outs[1] == raw.replace(b"\r\n", b"\n")


@pytest.mark.parametrize("size", [0, 1, 5, 1000])
def test_crlf_only_copies_are_the_same_bytes(tmp_path, monkeypatch, size):
    """For a message whose every CR is in a CRLF (DATA), deleting the CRs is the CRLF -> LF conversion."""
    raw = b"Subject: s\r\n\r\n" + b"line . of text\r\n" * size + b"end\r\n"
    path = tmp_path / "msg"
    path.write_bytes(queue_file_bytes(raw, TRAILER_ENVELOPE))
    copies = []
    for limit in (local.PRELOAD_LIMIT, 0):
        monkeypatch.setattr(local, "PRELOAD_LIMIT", limit)
        for crlf_only in (False, True):
            out = io.BytesIO()
            m = local.QueuedMessage(str(path), crlf_only)
            assert m.write_to(out) == len(out.getvalue())
            copies.append(out.getvalue())
    assert copies == [raw.replace(b"\r\n", b"\n")] * 4


def test_data_messages_are_delivered_with_the_crlf_fast_path(agent, root, tmp_path, monkeypatch):
    """The envelope's esmtp["crlf"] reaches QueuedMessage."""
    seen = []
    real = local.QueuedMessage

    def spy(path, crlf_only=False):
        seen.append(crlf_only)
        return real(path, crlf_only)

    monkeypatch.setattr(local, "QueuedMessage", spy)
    data = b"Subject: crlf only\r\n\r\nline 1\r\nline 2\r\n"
    env = envelope("s@x.example", "alice@example.org")
    env.esmtp["crlf"] = True
    (o,) = deliver(agent, env, spool_message(tmp_path, data))
    (o2,) = deliver(agent, envelope("s@x.example", "bob@example.org"), spool_message(tmp_path))
    assert (o.kind, o2.kind) == ("delivered", "delivered")
    assert seen == [True, False]
    md = mailbox.Maildir(str(root / "example.org" / "alice"), create=False)
    (key,) = md.keys()
    assert md.get_bytes(key) == expected_bytes("s@x.example", "alice@example.org", data)
