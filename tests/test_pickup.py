"""
Tests for mailhub.queue.pickup: the pickup file format, write_pickup, and
PickupService turning pickup files into queued messages (in memory: a real
Spool in tmp_path, task.Clock, a fake inotify).
"""

from __future__ import annotations

import io
import os
import stat

import pytest
from twisted.internet import inotify, task

from mailhub.queue import pickup
from mailhub.queue.pickup import PickupService
from mailhub.queue.pickupfile import (
    CRLFNormalizer,
    MessageTooLarge,
    PickupFormatError,
    ensure_pickup_dirs,
    format_header,
    pickup_dirs,
    read_header,
    unique_name,
    write_pickup,
)
from mailhub.queue.spool import Spool


@pytest.fixture
def spool(tmp_path):
    s = Spool(str(tmp_path / "spool"), fsync=False)
    ensure_pickup_dirs(s.path)
    return s


class FakeNotifier:
    def __init__(self):
        self.watches = []
        self.lost = False

    def watch(self, path, mask, callbacks):
        self.watches.append((path, mask, callbacks))

    def loseConnection(self):
        self.lost = True

    def fire(self, name):
        for path, _mask, callbacks in self.watches:
            for cb in callbacks:
                cb(None, path.child(name), inotify.IN_MOVED_TO)


def make_service(spool, notifier=None, max_size=10_000, resolve=None):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    queued = []
    svc = PickupService(
        spool,
        queued.append,
        clock,
        max_size=max_size,
        resolve_recipient=resolve,
        hostname="mx.example",
        notifier_factory=lambda _clock: notifier,
    )
    return svc, clock, queued


# -- format --------------------------------------------------------------------------


def test_header_round_trip():
    raw = format_header("alice@example.org", ["bob@example.com", "c@d.example"], "Alice A")
    assert raw == (
        b"mailhub-pickup 1\nsender alice@example.org\nfullname Alice A\n"
        b"recipient bob@example.com\nrecipient c@d.example\n\n"
    )
    f = io.BytesIO(raw + b"Subject: x\r\n\r\nhi\r\n")
    h = read_header(f)
    assert (h.sender, h.recipients, h.fullname, h.size) == (
        "alice@example.org",
        ("bob@example.com", "c@d.example"),
        "Alice A",
        len(raw),
    )
    assert f.read() == b"Subject: x\r\n\r\nhi\r\n"


def test_null_sender_round_trip():
    raw = format_header("", ["bob@example.com"])
    assert b"\nsender\n" in raw
    assert read_header(io.BytesIO(raw)).sender == ""


def test_newline_in_value_refused():
    with pytest.raises(ValueError):
        format_header("a@b.example\nrecipient evil@x.example", ["bob@example.com"])


@pytest.mark.parametrize(
    "fullname, line",
    [
        ("Evil\r\nrecipient evil@x.example", b"fullname Evil recipient evil@x.example\n"),
        ("a\x00b\x7fc\x85d\u2028e\u2029f\tg", b"fullname a b c d e f g\n"),
        ("\r\n", None),
    ],
)
def test_fullname_control_characters_become_spaces(fullname, line):
    """An informational full name is sanitised, never refused (sendmail -F must not crash)."""
    raw = format_header("a@b.example", ["bob@example.com"], fullname)
    lines = raw.split(b"\n")
    assert lines[:2] == [b"mailhub-pickup 1", b"sender a@b.example"]
    assert lines[-3:] == [b"recipient bob@example.com", b"", b""]
    if line is None:
        assert len(lines) == 5
        assert read_header(io.BytesIO(raw)).fullname is None
    else:
        assert len(lines) == 6 and lines[2] + b"\n" == line
        assert read_header(io.BytesIO(raw)).fullname == line[9:-1].decode()


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"hello\n", "not a mailhub pickup file"),
        (b"mailhub-pickup 2\nsender\n\n", "unsupported pickup version"),
        (b"mailhub-pickup 1\nrecipient a@b.example\n\n", "no sender line"),
        (b"mailhub-pickup 1\nsender a@b.example\n\n", "no recipients"),
        (b"mailhub-pickup 1\nsender a@b.example\nuid 0\nrecipient a@b.example\n\n", "unknown header key 'uid'"),
        (b"mailhub-pickup 1\nsender a@b.example\nrecipient nope\n\n", "bad recipient"),
        (b"mailhub-pickup 1\nsender a@b.example\nrecipient a@b.example\n", "truncated header"),
        (b"mailhub-pickup 1\nsender a\n\n", "bad sender"),
    ],
)
def test_bad_headers(raw, why):
    with pytest.raises(PickupFormatError) as e:
        read_header(io.BytesIO(raw))
    assert str(e.value).startswith(why)


@pytest.mark.parametrize(
    "chunks, expected",
    [
        ([b"a\nb\n"], b"a\r\nb\r\n"),
        ([b"a\r\nb\r\n"], b"a\r\nb\r\n"),
        ([b"a\r", b"\nb"], b"a\r\nb\r\n"),
        ([b"a\r", b"b\r"], b"a\rb\r\n"),
        ([b"x"], b"x\r\n"),
        ([b""], b""),
    ],
)
def test_crlf_normalizer(chunks, expected):
    n = CRLFNormalizer()
    out = b"".join(n.feed(c) for c in chunks) + n.close()
    assert out == expected


# -- write_pickup --------------------------------------------------------------------


def test_ensure_pickup_dirs_modes(tmp_path):
    os.mkdir(tmp_path / "s", 0o700)
    ensure_pickup_dirs(str(tmp_path / "s"))
    for path in (tmp_path / "s" / "pickup", *map(lambda p: tmp_path / p, pickup_dirs("s"))):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o1733
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o711


def test_write_pickup(spool):
    name = write_pickup(spool.path, "a@x.example", ["b@y.example"], io.BytesIO(b"Subject: s\n\nbody\n"))
    tmp_dir, new_dir = pickup_dirs(spool.path)
    assert os.listdir(tmp_dir) == []
    path = os.path.join(new_dir, name)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    with open(path, "rb") as f:
        assert f.read() == (
            b"mailhub-pickup 1\nsender a@x.example\nrecipient b@y.example\n\nSubject: s\r\n\r\nbody\r\n"
        )


def test_write_pickup_too_large_leaves_nothing(spool):
    with pytest.raises(MessageTooLarge):
        write_pickup(spool.path, "a@x.example", ["b@y.example"], [b"x" * 60, b"y" * 60], max_size=100)
    tmp_dir, new_dir = pickup_dirs(spool.path)
    assert os.listdir(tmp_dir) == [] and os.listdir(new_dir) == []


def test_write_pickup_with_a_given_name(spool):
    name = unique_name()
    assert write_pickup(spool.path, "a@x.example", ["b@y.example"], [b"x\n"], name=name) == name
    assert os.listdir(pickup_dirs(spool.path)[1]) == [name]


@pytest.mark.parametrize("name", ["../new/x", ".hidden", "", "a/b"])
def test_write_pickup_refuses_a_name_that_is_not_a_pickup_name(spool, name):
    with pytest.raises(ValueError):
        write_pickup(spool.path, "a@x.example", ["b@y.example"], [b"x\n"], name=name)
    tmp_dir, new_dir = pickup_dirs(spool.path)
    assert os.listdir(tmp_dir) == [] and os.listdir(new_dir) == []


def test_write_pickup_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_pickup(str(tmp_path / "nowhere"), "a@x.example", ["b@y.example"], [b"x"])


# -- PickupService -------------------------------------------------------------------


def test_service_queues_and_removes(spool):
    notifier = FakeNotifier()
    svc, clock, queued = make_service(spool, notifier)
    svc.startService()
    assert notifier.watches[0][0].path == pickup_dirs(spool.path)[1]
    assert notifier.watches[0][1] == inotify.IN_MOVED_TO | inotify.IN_CLOSE_WRITE
    name = write_pickup(spool.path, "alice@x.example", ["bob@y.example", "carol@z.example"], [b"Subject: hi\n\nhello\n"])
    assert queued == []
    notifier.fire(name)
    clock.advance(0)
    assert len(queued) == 1
    env = queued[0]
    assert env.sender == "alice@x.example"
    assert [r.address for r in env.recipients] == ["bob@y.example", "carol@z.example"]
    assert env.client == {"protocol": "local", "user": pickup._user_name(os.getuid()), "uid": os.getuid(), "pickup": name}
    assert env.arrival == env.next_attempt == 1_700_000_000
    with spool.open_message(env.queue_id) as f:
        data = f.read()
        assert f.length == len(data)
    assert env.esmtp == {"size": len(data), "body": "7BIT"}
    assert spool.load(env.queue_id) == env
    assert os.listdir(pickup_dirs(spool.path)[1]) == []
    assert data == (
        f"Received: by mx.example (mailhub, from userid {os.getuid()})\r\n"
        f"\tid {env.queue_id}; ".encode() + data.split(b"; ", 1)[1].split(b"\r\n", 1)[0] + b"\r\n"
        b"Subject: hi\r\n\r\nhello\r\n"
    )
    svc.stopService()
    assert notifier.lost and clock.getDelayedCalls() == []


def test_service_scans_at_start_and_polls_without_inotify(spool):
    first = write_pickup(spool.path, "a@x.example", ["b@y.example"], [b"one\n"])
    svc, clock, queued = make_service(spool, notifier=None)
    svc.startService()
    clock.advance(0)
    assert [e.client["pickup"] for e in queued] == [first]
    second = write_pickup(spool.path, "a@x.example", ["b@y.example"], [b"two\n"])
    clock.advance(0.9)
    assert len(queued) == 1
    clock.advance(0.1)
    assert [e.client["pickup"] for e in queued] == [first, second]
    svc.stopService()
    assert clock.getDelayedCalls() == []


def test_identity_comes_from_file_owner_not_content(spool):
    """A header line claiming an identity is refused; the owner uid is recorded."""
    new_dir = pickup_dirs(spool.path)[1]
    with open(os.path.join(new_dir, "forged"), "wb") as f:
        f.write(b"mailhub-pickup 1\nsender root@x.example\nuser root\nrecipient b@y.example\n\nhi\r\n")
    svc, clock, queued = make_service(spool)
    svc.startService()
    clock.advance(0)
    assert queued == []
    assert os.listdir(os.path.join(spool.path, "corrupt")) == ["pickup.forged"]
    svc.stopService()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to create a file owned by another uid")
def test_uid_of_other_owner_recorded(spool):
    name = write_pickup(spool.path, "root@x.example", ["b@y.example"], [b"hi\n"])
    os.chown(os.path.join(pickup_dirs(spool.path)[1], name), 4242, 4242)
    svc, clock, queued = make_service(spool)
    svc.startService()
    clock.advance(0)
    assert queued[0].client["uid"] == 4242 and queued[0].client["user"] == "uid4242"
    with spool.open_message(queued[0].queue_id) as f:
        assert b"(mailhub, from userid 4242)" in f.read()
    svc.stopService()


def test_hard_link_and_symlink_quarantined(spool, tmp_path):
    new_dir = pickup_dirs(spool.path)[1]
    victim = tmp_path / "victim"
    victim.write_bytes(b"mailhub-pickup 1\nsender a@x.example\nrecipient b@y.example\n\nhi\r\n")
    os.link(victim, os.path.join(new_dir, "linked"))
    os.symlink(victim, os.path.join(new_dir, "symlinked"))
    svc, clock, queued = make_service(spool)
    svc.startService()
    clock.advance(0)
    assert queued == []
    assert sorted(os.listdir(os.path.join(spool.path, "corrupt"))) == ["pickup.linked", "pickup.symlinked"]
    assert os.listdir(new_dir) == []
    svc.stopService()


def test_oversized_quarantined(spool):
    name = write_pickup(spool.path, "a@x.example", ["b@y.example"], [b"x" * 200])
    svc, clock, queued = make_service(spool, max_size=100)
    svc.startService()
    clock.advance(0)
    assert queued == [] and spool.queue_ids() == []
    assert os.listdir(os.path.join(spool.path, "corrupt")) == ["pickup." + name]
    svc.stopService()


def test_no_duplicate_after_crash_between_commit_and_unlink(spool):
    name = write_pickup(spool.path, "a@x.example", ["b@y.example"], [b"hi\n"])
    svc, clock, queued = make_service(spool)
    # Simulate the crash: queue the file but keep it.
    original_unlink = os.unlink
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pickup.os, "unlink", lambda p: None)
        svc.startService()
        clock.advance(0)
        svc.stopService()
    assert len(spool.queue_ids()) == 1 and os.listdir(pickup_dirs(spool.path)[1]) == [name]
    assert original_unlink is os.unlink
    svc2, clock2, queued2 = make_service(spool)
    svc2.startService()
    clock2.advance(0)
    assert queued2 == []
    assert len(spool.queue_ids()) == 1 and os.listdir(pickup_dirs(spool.path)[1]) == []
    svc2.stopService()


def test_spool_failure_leaves_file_and_retries(spool):
    name = write_pickup(spool.path, "a@x.example", ["b@y.example"], [b"hi\n"])
    notifier = FakeNotifier()
    svc, clock, queued = make_service(spool, notifier)
    with pytest.MonkeyPatch.context() as mp:
        def full():
            raise OSError(28, "No space left on device")
        mp.setattr(spool, "new_message", full)
        svc.startService()
        clock.advance(0)
    assert queued == [] and os.listdir(pickup_dirs(spool.path)[1]) == [name]
    clock.advance(1)
    assert len(queued) == 1 and os.listdir(pickup_dirs(spool.path)[1]) == []
    svc.stopService()


def test_resolve_recipient(spool):
    def resolve(address):
        if address == "list@x.example":
            return ["a@x.example", "b@x.example"]
        if address == "nobody@x.example":
            raise ValueError("unknown")
        return [address]

    write_pickup(spool.path, "s@x.example", ["list@x.example", "nobody@x.example", "a@x.example"], [b"hi\n"])
    svc, clock, queued = make_service(spool, resolve=resolve)
    svc.startService()
    clock.advance(0)
    assert [(r.address, r.original) for r in queued[0].recipients] == [
        ("a@x.example", "list@x.example"),
        ("b@x.example", "list@x.example"),
        ("nobody@x.example", "nobody@x.example"),
    ]
    svc.stopService()


def test_eight_bit_and_utf8(spool):
    write_pickup(spool.path, "jörg@x.example", ["b@y.example"], ["Subject: ä\n\nü\n".encode()])
    svc, clock, queued = make_service(spool)
    svc.startService()
    clock.advance(0)
    assert queued[0].esmtp["body"] == "8BITMIME" and queued[0].esmtp["smtputf8"] is True
    svc.stopService()


def test_unlink_failure_does_not_queue_twice(spool):
    write_pickup(spool.path, "a@x.example", ["b@y.example"], [b"hi\n"])
    svc, clock, queued = make_service(spool, notifier=None)

    real_unlink = os.unlink

    def refuse(path):
        if "pickup" in str(path):
            raise PermissionError(13, "Permission denied")
        real_unlink(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pickup.os, "unlink", refuse)
        svc.startService()
        clock.advance(0)
        clock.advance(1)
        clock.advance(1)
    assert len(queued) == 1 and len(spool.queue_ids()) == 1
    svc.stopService()


def test_real_inotify_on_running_reactor(reactor, spool):
    """The default notifier (real inotify on the real reactor) sees a renamed-in file."""
    import threading

    from conftest import in_reactor

    done = threading.Event()
    queued = []

    def enqueue(env):
        queued.append(env)
        done.set()

    svc = PickupService(spool, enqueue, reactor, max_size=10_000, hostname="mx.example",
                        rescan_interval=3600)
    in_reactor(reactor, svc.startService)
    try:
        assert svc._notifier is not None
        # Let the initial scan (callLater(0)) run first, so only inotify can see the file.
        in_reactor(reactor, lambda: task.deferLater(reactor, 0.05, lambda: None))
        assert svc._soon is None or not svc._soon.active()
        write_pickup(spool.path, "a@x.example", ["b@y.example"], [b"hi\n"])
        assert done.wait(10)
        assert queued[0].recipients[0].address == "b@y.example"
    finally:
        in_reactor(reactor, svc.stopService)
