"""
Deliver on accept (mailhub.delivery.direct, mailhub.delivery.directwriter)
in memory: an SMTP session on a StringTransport whose factory's committer
is a DirectDelivery with its writer loop run in the caller.

- a message for one local recipient is in the Maildir when the 250 is
  written, nothing is queued, and the mail log says accepted, delivery
  (relay=local, as the scheduler writes it) and removed, in that order;
- the Maildir file is byte for byte (name and content) what the spool path
  and the local delivery agent write for the same message;
- whatever cannot be finished at once goes through the spool, and a
  partial success queues the rest with the delivered recipients marked;
- the writer makes each file durable before linking it, new/ after the
  link and before the answer, and shares one sync per Maildir per round.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import pytest
from smtpharness import FOREIGN, QUEUED, Harness, send_message
from twisted.internet import defer

from mailhub import maillog
from mailhub.config import ConfigError, load_config
from mailhub.delivery import direct as direct_module
from mailhub.delivery.direct import DirectDelivery, committer_for
from mailhub.delivery.directwriter import BatchWriter, Placement, Target
from mailhub.delivery.local import PRELOAD_LIMIT, LocalDelivery
from mailhub.delivery.maildir import MaildirWriter
from mailhub.envelope import DELIVERED, PENDING
from mailhub.queue import spool as spool_module
from mailhub.queue.commit import SpoolCommitter
from mailhub.queue.durable import FileSystemSync

HOST = "mx.example.com"
MESSAGE = b"Subject: hello\r\nFrom: a@elsewhere.test\r\n\r\nline one\r\n..dot line\r\nend\r\n.\r\n"


def sync_run(f, *a, **kw):
    return defer.maybeDeferred(f, *a, **kw)


def inline_writer(maildir: MaildirWriter) -> BatchWriter:
    """The writer loop run in the caller; answers delivered at once."""
    return BatchWriter(maildir, lambda f, *a: f(*a), start=lambda run: run(), linger=0)


class Direct:
    """A harness whose factory delivers on accept."""

    def __init__(self, tmp_path, max_recipients: int = 1, fsync: bool = False, checks=(), trusted=False) -> None:
        self.h = Harness(tmp_path, trusted_networks=(FOREIGN + "/32",) if trusted else ())
        self.maildir = MaildirWriter(HOST, fsync)
        self.writer = inline_writer(self.maildir)
        self.spool_committer = SpoolCommitter(sync_run, self.h.queued.append)
        self.committer = DirectDelivery(self.spool_committer, self.h.directory, self.h.clock, self.writer, max_recipients)
        self.h.serve(committer=self.committer, checks=list(checks))
        self.root = str(tmp_path / "mailboxes")

    def ehlo(self):
        c = self.h.connect()
        c.send("EHLO client.test\r\n")
        return c

    def files(self, user: str, sub: str = "new") -> list[str]:
        path = os.path.join(self.root, "example.com", user, sub)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def read(self, user: str) -> bytes:
        [name] = self.files(user)
        with open(os.path.join(self.root, "example.com", user, "new", name), "rb") as f:
            return f.read()


@pytest.fixture
def events():
    seen: list[dict] = []
    maillog.mail_publisher.addObserver(seen.append)
    yield seen
    maillog.mail_publisher.removeObserver(seen.append)


def names(events: list[dict]) -> list[str]:
    return [e["mail_event"] for e in events if e.get("mail_event") not in ("connection",)]


def test_one_local_recipient_is_in_its_maildir_when_the_250_is_sent(tmp_path, events):
    d = Direct(tmp_path)
    c = d.ehlo()
    answered = []
    real_write = c.transport.write

    def write(data):
        if data.startswith(b"250 2.0.0 Ok: queued"):
            answered.append(d.files("alice"))
        real_write(data)

    c.transport.write = write
    reply = send_message(c, MESSAGE)
    qid = QUEUED.match(reply).group(1)
    assert answered == [d.files("alice")] and len(answered[0]) == 1, "the file exists when the 250 is written"
    assert d.h.queued == [] and d.h.spool_is_empty()
    mail = [e for e in events if e.get("queue_id") == qid]
    assert [e["mail_event"] for e in mail] == ["accepted", "delivery", "removed"]
    delivery = mail[1]
    assert {k: delivery[k] for k in ("to", "orig_to", "relay", "attempts", "dsn", "status", "text", "code")} == {
        "to": "alice@example.com", "orig_to": "alice@example.com", "relay": "local", "attempts": 1,
        "dsn": "2.0.0", "status": "sent", "text": "delivered to maildir", "code": 250,
    }
    assert delivery["delay"] == "0"
    assert maillog_text(delivery) == (
        f"{qid}: to=<alice@example.com>, orig_to=<alice@example.com>, relay=local, delay=0, attempts=1, "
        "dsn=2.0.0, status=sent (delivered to maildir)"
    )


def maillog_text(event: dict) -> str:
    from twisted.logger import formatEvent

    return formatEvent(event)


class Prepend:
    name = "prepend"

    def check(self, message):
        message.prepend(b"X-Checked: yes\r\n")


@pytest.mark.parametrize(
    "shape", ["data", "data-large", "bdat", "prepended", "prepended-large"],
)
def test_maildir_file_is_byte_for_byte_what_the_spool_path_writes(tmp_path, monkeypatch, shape):
    """The same message (same queue id, same arrival) by both paths: same file name, same bytes."""
    monkeypatch.setattr(spool_module, "new_queue_id", lambda: "15PEFTESTQUEUEID0")
    body = b"Subject: same\r\nDelivered-To: other@example.com\r\n\r\n" + b"line\r\n" * 10
    if shape.endswith("large"):
        body += b"x" * 70 + b"\r\n" * 1  # past the in-memory limit of the spool and the preload limit
        body += (b"y" * 998 + b"\r\n") * (PRELOAD_LIMIT // 1000 + 10)
    checks = [Prepend()] if shape.startswith("prepended") else []

    def send(c):
        if shape == "bdat":
            c.send("MAIL FROM:<s@elsewhere.test>\r\nRCPT TO:<alice@example.com>\r\n")
            raw = body + b"bare\nline feed and a bare\rcarriage return\r\n"
            return c.send(f"BDAT {len(raw)} LAST\r\n".encode() + raw)
        return send_message(c, body + b".\r\n", mail="MAIL FROM:<s@elsewhere.test>")

    a = Direct(tmp_path / "a", checks=checks)
    assert QUEUED.match(send(a.ehlo()))
    assert a.h.queued == []

    b = Harness(tmp_path / "b")
    b.serve(checks=checks)
    c = b.connect()
    c.send("EHLO client.test\r\n")
    assert QUEUED.match(send(c))
    [env] = b.queued
    agent = LocalDelivery(b.directory, HOST, run=sync_run, fsync=False)
    outcomes = []
    agent.deliver(env, env.recipients, b.spool.message_path(env.queue_id), report=outcomes.extend).addCallback(
        outcomes.extend)
    assert [o.kind for o in outcomes] == ["delivered"]
    queued_root = str(tmp_path / "b" / "mailboxes")
    [queued_name] = os.listdir(os.path.join(queued_root, "example.com", "alice", "new"))
    with open(os.path.join(queued_root, "example.com", "alice", "new", queued_name), "rb") as f:
        queued_bytes = f.read()
    assert a.files("alice") == [queued_name]
    assert a.read("alice") == queued_bytes
    assert queued_bytes.startswith(b"Return-Path: <s@elsewhere.test>\nDelivered-To: alice@example.com\n")


class Hold:
    name = "hold"

    def check(self, message):
        message.envelope.held = True


@pytest.mark.parametrize("case", ["two recipients", "remote recipient", "notify success", "held by a check"])
def test_what_cannot_be_finished_at_once_goes_through_the_spool(tmp_path, events, case):
    d = Direct(tmp_path, checks=[Hold()] if case == "held by a check" else [], trusted=case == "remote recipient")
    c = d.ehlo()
    rcpts = {"two recipients": ("alice@example.com", "bob@example.com"), "remote recipient": ("a@remote.test",)}
    if case == "notify success":
        c.send("MAIL FROM:<s@elsewhere.test>\r\n")
        c.send("RCPT TO:<alice@example.com> NOTIFY=SUCCESS\r\n")
        c.send("DATA\r\n")
        reply = c.send(MESSAGE)
    else:
        reply = send_message(c, MESSAGE, rcpts=rcpts.get(case, ("alice@example.com",)))
    qid = QUEUED.match(reply).group(1)
    assert [e.queue_id for e in d.h.queued] == [qid]
    assert d.files("alice") == [] and d.files("bob") == []
    assert all(r.state == PENDING for r in d.h.queued[0].recipients)
    assert [e["mail_event"] for e in events if e.get("queue_id") == qid] == ["accepted"]


def break_mailbox(d: Direct, user: str) -> None:
    """The user's Maildir is a plain file: it cannot be opened."""
    os.makedirs(os.path.join(d.root, "example.com"), exist_ok=True)
    with open(os.path.join(d.root, "example.com", user), "w") as f:
        f.write("not a directory")


def test_partial_success_queues_the_rest_with_the_delivered_recipient_marked(tmp_path, events):
    d = Direct(tmp_path, max_recipients=2)
    break_mailbox(d, "bob")
    order = []
    d.spool_committer.enqueue = lambda env: (order.append("enqueue"), d.h.queued.append(env))
    events_seen = events
    reply = send_message(d.ehlo(), MESSAGE, rcpts=("alice@example.com", "bob@example.com"))
    qid = QUEUED.match(reply).group(1)
    assert len(d.files("alice")) == 1
    [env] = d.h.queued
    assert env.queue_id == qid
    assert {r.address: r.state for r in env.recipients} == {"alice@example.com": DELIVERED, "bob@example.com": PENDING}
    # durable in the spool with those states: a restart delivers bob only
    assert {r.address: r.state for r in d.h.spool.load(qid).recipients} == {
        "alice@example.com": DELIVERED, "bob@example.com": PENDING}
    mail = [e for e in events_seen if e.get("queue_id") == qid]
    assert [(e["mail_event"], e.get("to")) for e in mail] == [("accepted", None), ("delivery", "alice@example.com")]
    assert mail[1]["relay"] == "local" and order == ["enqueue"]


@pytest.mark.parametrize("why", ["broken mailbox", "forwarding loop"])
def test_a_recipient_that_cannot_be_written_now_is_queued_pending(tmp_path, events, why):
    d = Direct(tmp_path)
    body = MESSAGE
    if why == "broken mailbox":
        break_mailbox(d, "alice")
    else:
        body = b"Delivered-To: alice@example.com\r\n" + MESSAGE
    reply = send_message(d.ehlo(), body)
    qid = QUEUED.match(reply).group(1)
    [env] = d.h.queued
    assert env.queue_id == qid and [r.state for r in env.recipients] == [PENDING]
    assert [e["mail_event"] for e in events if e.get("queue_id") == qid] == ["accepted"]
    if why == "forwarding loop":
        assert d.files("alice") == []


def test_new_not_durable_means_queued_and_a_later_delivery_adds_no_second_copy(tmp_path, monkeypatch):
    d = Direct(tmp_path, fsync=True)

    def fail(fds):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(d.maildir, "sync_new", fail)
    reply = send_message(d.ehlo(), MESSAGE)
    QUEUED.match(reply)
    [env] = d.h.queued
    assert [r.state for r in env.recipients] == [PENDING]
    assert len(d.files("alice")) == 1  # linked, but not known to be durable
    monkeypatch.undo()
    agent = LocalDelivery(d.h.directory, HOST, run=sync_run, fsync=False)
    out = []
    agent.deliver(env, env.recipients, d.h.spool.message_path(env.queue_id), report=out.extend).addCallback(out.extend)
    assert [o.kind for o in out] == ["delivered"]
    assert len(d.files("alice")) == 1


def test_a_spool_failure_after_a_partial_delivery_is_451(tmp_path, monkeypatch):
    d = Direct(tmp_path, max_recipients=2)
    break_mailbox(d, "bob")

    def full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(d.h.spool, "_commit", full)
    reply = send_message(d.ehlo(), MESSAGE, rcpts=("alice@example.com", "bob@example.com"))
    assert reply == "451 4.3.0 Error: queue file write error\r\n"
    assert d.h.queued == []


# -- the writer: order of operations and group commit ------------------------------------------------


def placement(root: str, user: str, qid: str, writer) -> Placement:
    return Placement(qid, 1_700_000_000.0, "s@x.test", [Target(f"{user}@example.com", root, "example.com", user, True)],
                     writer, True)


def spool_writer(tmp_path, data: bytes):
    from mailhub.queue.spool import Spool

    w = Spool(str(tmp_path / "spool"), fsync=False).new_message()
    w.write(data)
    return w


class Recorder:
    """os.fsync (file or directory) and os.link, and the answers, in order."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[tuple] = []
        real_fsync, real_link = os.fsync, os.link

        def fsync(fd):
            st = os.fstat(fd)
            real_fsync(fd)
            self.events.append(("fsync-dir" if stat.S_ISDIR(st.st_mode) else "fsync", st.st_ino, st.st_size))

        def link(src, dst, *, src_dir_fd=None, dst_dir_fd=None, follow_symlinks=True):
            st = os.stat(src, dir_fd=src_dir_fd, follow_symlinks=False)
            real_link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=follow_symlinks)
            self.events.append(("link", st.st_ino, os.fstat(dst_dir_fd).st_ino))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "link", link)


def test_each_file_is_fsynced_before_its_link_and_new_after_it_before_the_answer(tmp_path, monkeypatch):
    root = str(tmp_path / "mailboxes")
    rec = Recorder(monkeypatch)
    w = BatchWriter(MaildirWriter(HOST, True), lambda f, *a: f(*a), start=lambda run: run(), linger=0)
    p = placement(root, "alice", "15PEFQID1", spool_writer(tmp_path, MESSAGE))
    p.deferred.addCallback(lambda _: rec.events.append(("answer",)))
    w.submit(p)
    assert p.placed == ["alice@example.com"] and p.failed == {}
    [name] = os.listdir(os.path.join(root, "example.com", "alice", "new"))
    path = os.path.join(root, "example.com", "alice", "new", name)
    inode, size = os.stat(path).st_ino, os.stat(path).st_size
    new_inode = os.stat(os.path.dirname(path)).st_ino
    kinds = [e for e in rec.events if e[0] != "fsync-dir" or e[1] == new_inode]
    file_sync = kinds.index(("fsync", inode, size))
    link = kinds.index(("link", inode, new_inode))
    new_sync = kinds.index(("fsync-dir", new_inode, os.stat(os.path.dirname(path)).st_size))
    assert file_sync < link < new_sync < kinds.index(("answer",))


def test_one_round_shares_one_sync_of_new_between_messages_finishing_together(tmp_path, monkeypatch):
    root = str(tmp_path / "mailboxes")
    rec = Recorder(monkeypatch)
    loops = []
    w = BatchWriter(MaildirWriter(HOST, True), lambda f, *a: f(*a), start=loops.append, linger=0)
    ps = [placement(root, "alice", f"15PEFQID{i}", spool_writer(tmp_path / str(i), MESSAGE)) for i in range(3)]
    ps.append(placement(root, "bob", "15PEFQID9", spool_writer(tmp_path / "9", MESSAGE)))
    answered = []
    for p in ps:
        w.submit(p).addCallback(answered.append)
    assert len(loops) == 1 and answered == []  # one writer loop, not started yet
    loops[0]()
    assert answered == ps and all(p.placed and not p.failed for p in ps)
    assert w.rounds == 1 and w.syncs == 2  # alice's new/ and bob's new/, once each
    new_dirs = {os.stat(os.path.join(root, "example.com", u, "new")).st_ino for u in ("alice", "bob")}
    assert len([e for e in rec.events if e[0] == "fsync-dir" and e[1] in new_dirs]) == 2
    kinds = [e[0] for e in rec.events]
    assert kinds.count("fsync") == 4 and kinds.count("link") == 4
    # every file of the round is fsync'd before the first link, and every new/ after the last
    last_file_sync = max(i for i, k in enumerate(kinds) if k == "fsync")
    links = [i for i, k in enumerate(kinds) if k == "link"]
    new_syncs = [i for i, e in enumerate(rec.events) if e[0] == "fsync-dir" and e[1] in new_dirs]
    assert last_file_sync < min(links) and max(links) < min(new_syncs)


def test_a_round_holds_at_most_max_round_files(tmp_path, monkeypatch):
    from mailhub.delivery import directwriter

    monkeypatch.setattr(directwriter, "MAX_ROUND", 2)
    root = str(tmp_path / "mailboxes")
    loops = []
    w = BatchWriter(MaildirWriter(HOST, False), lambda f, *a: f(*a), start=loops.append, linger=0)
    ps = [placement(root, "alice", f"15PEFQID{i}", spool_writer(tmp_path / str(i), MESSAGE)) for i in range(5)]
    for p in ps:
        w.submit(p)
    loops[0]()
    assert w.rounds == 3 and all(p.placed for p in ps)


def test_a_file_that_cannot_be_made_durable_is_not_linked_and_its_recipient_is_queued(tmp_path, monkeypatch):
    root = str(tmp_path / "mailboxes")
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    w = BatchWriter(MaildirWriter(HOST, True), lambda f, *a: f(*a), start=lambda run: run(), linger=0)
    p = placement(root, "alice", "15PEFQID1", spool_writer(tmp_path, MESSAGE))
    w.submit(p)
    assert p.placed == [] and p.failed == {"alice@example.com": "cannot write to maildir: No space left on device"}
    for sub in ("tmp", "new"):
        assert os.listdir(os.path.join(root, "example.com", "alice", sub)) == []


def test_syncfs_replaces_every_fsync_with_one_syncfs_after_the_links(tmp_path, monkeypatch):
    root = str(tmp_path / "mailboxes")
    rec = Recorder(monkeypatch)
    fs = FileSystemSync(flush=lambda fd: rec.events.append(("syncfs", os.fstat(fd).st_dev)))
    w = BatchWriter(MaildirWriter(HOST, True, fs), lambda f, *a: f(*a), start=lambda run: run(), linger=0)
    ps = [placement(root, u, f"15PEFQID{u}", spool_writer(tmp_path / u, MESSAGE)) for u in ("alice", "bob")]
    for p in ps:
        p.deferred.addCallback(lambda _: rec.events.append(("answer",)))
        w.submit(p)
    # the Maildirs were created (their parents fsync'd: "fsync-dir"), but no
    # file is fsync'd on its own: each round links, syncs the file system once, answers
    assert [e[0] for e in rec.events if e[0] != "fsync-dir"] == ["link", "syncfs", "answer"] * 2


def test_spool_commit_with_syncfs_fsyncs_no_file_and_syncs_the_file_system_after_the_rename(tmp_path, monkeypatch):
    from mailhub.queue import durable
    from mailhub.queue.spool import Spool

    events: list[tuple] = []
    monkeypatch.setattr(durable.FILE_SYSTEMS, "_flush", lambda fd: events.append(("syncfs",)))
    real_rename = os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync",)))
    monkeypatch.setattr(os, "rename", lambda a, b: (real_rename(a, b), events.append(("rename",))))
    spool = Spool(str(tmp_path / "spool"), fsync=True, sync="syncfs")
    w = spool.new_message()
    w.write(MESSAGE)
    from mailhub.envelope import Envelope, Recipient

    w.commit(Envelope(w.queue_id, "s@x.test", [Recipient("a@example.com")], arrival=1.0))
    assert events == [("rename",), ("syncfs",)]
    assert spool.queue_ids() == [w.queue_id]


# -- configuration ------------------------------------------------------------------------------------


def test_syncfs_is_refused_with_a_clear_error_where_the_system_lacks_it(monkeypatch):
    from mailhub import syncfs

    assert load_config(None, {"spool.sync": "syncfs"}).spool.sync == ("syncfs" if syncfs.available() else "fsync")
    monkeypatch.setattr(syncfs, "available", lambda: False)
    with pytest.raises(ConfigError) as e:
        load_config(None, {"spool.sync": "syncfs"})
    assert str(e.value) == (
        'command line: spool.sync: "syncfs": syncfs() is not available on this system (it is a Linux system call);'
        ' use "fsync"'
    )
    with pytest.raises(ConfigError, match='spool.sync: must be one of'):
        load_config(None, {"spool.sync": "fdatasync"})


class FakeReactor:
    def callFromThread(self, f: Any, *a: Any) -> None:
        f(*a)

    def seconds(self) -> float:
        return 0.0


@pytest.mark.parametrize(
    "overrides, kind, limit",
    [
        ({}, DirectDelivery, 2),
        ({"spool.sync": "syncfs"}, DirectDelivery, 5),
        ({"local.deliver_on_accept": False}, SpoolCommitter, None),
        ({"local.mode": "system", "local.users": None}, SpoolCommitter, None),
        ({"local.transport": "lmtp:unix:/run/dovecot/lmtp"}, SpoolCommitter, None),
    ],
)
def test_committer_for_the_configuration(tmp_path, overrides, kind, limit):
    config = load_config(None, {"local.mailboxes": str(tmp_path), **overrides})
    committer = committer_for(config, object(), FakeReactor(), sync_run, lambda env: None)
    assert type(committer) is kind
    if limit is not None:
        assert committer.max_recipients == limit == direct_module.MAX_RECIPIENTS[config.spool.sync]
