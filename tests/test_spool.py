"""
Spool tests: the queue file, commit, update, remove, load, recovery from
every state a crash can leave behind, and the conversion of the first layout.
"""

from __future__ import annotations

import json
import os

import pytest

from mailhub.envelope import DELIVERED, Envelope, EnvelopeFormatError, Recipient
from mailhub.queue import durable, queuefile
from mailhub.queue import spool as spool_module
from mailhub.queue.queuefile import is_queue_id, new_queue_id
from mailhub.queue.spool import Spool

BODY = b"Subject: x\r\n\r\nbody\r\n"


@pytest.fixture
def spool(tmp_path) -> Spool:
    return Spool(str(tmp_path / "spool"))


def envelope(qid: str, **kw) -> Envelope:
    return Envelope(qid, "a@example.com", [Recipient("b@example.org")], arrival=1000.0, **kw)


def commit(spool: Spool, body: bytes = BODY, **kw) -> Envelope:
    w = spool.new_message()
    w.write(body)
    env = envelope(w.queue_id, **kw)
    w.commit(env)
    return env


def listing(spool: Spool) -> dict[str, list[str]]:
    return {d: sorted(os.listdir(os.path.join(spool.path, d))) for d in ("tmp", "queue", "envelopes", "corrupt")}


EMPTY = {"tmp": [], "queue": [], "envelopes": [], "corrupt": []}


def message(spool: Spool, qid: str) -> bytes:
    with spool.open_message(qid) as f:
        return f.read()


def test_layout_created(spool):
    assert listing(spool) == EMPTY
    assert not os.path.exists(os.path.join(spool.path, "new"))


def test_commit_then_load(spool):
    env = commit(spool)
    assert listing(spool) == EMPTY | {"queue": [env.queue_id]}  # one file per message
    assert message(spool, env.queue_id) == BODY
    assert spool.load(env.queue_id) == env
    assert spool.queue_ids() == [env.queue_id]
    assert list(spool) == [env]
    # the queue file: the message, the envelope (plain JSON with a version), the footer
    with open(spool.message_path(env.queue_id), "rb") as f:
        raw = f.read()
    assert raw.startswith(BODY)
    footer = raw[-queuefile.FOOTER_SIZE:]
    env_json = raw[len(BODY):-queuefile.FOOTER_SIZE]
    assert footer == b"\n#mailhub-queue 2 %016x %08x\n" % (len(BODY), len(env_json))
    data = json.loads(env_json)
    assert data["version"] == 1 and data["recipients"][0]["address"] == "b@example.org"


def test_one_commit_is_one_file_and_two_fsyncs(tmp_path, monkeypatch):
    """The point of the queue file: a commit creates one file and makes two fsyncs (file, then queue/)."""
    spool = Spool(str(tmp_path / "spool"))
    calls = []
    real_open, real_fsync = os.open, os.fsync

    def counting_open(path, flags, *a, **kw):
        if flags & os.O_CREAT:
            calls.append(("create", os.path.basename(os.path.dirname(path))))
        return real_open(path, flags, *a, **kw)

    def counting_fsync(fd):
        calls.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(os, "fsync", counting_fsync)
    commit(spool)
    monkeypatch.undo()
    assert calls == [("create", "tmp"), ("fsync", "file"), ("fsync", "dir")]


def test_open_message_stops_at_the_end_of_the_message(spool):
    body = b"Subject: x\r\n\r\nline 1\r\nline 2\r\n"
    env = commit(spool, body)
    with spool.open_message(env.queue_id) as f:
        assert f.length == len(body)
        assert f.read(9) == b"Subject: "
        assert f.readline() == b"x\r\n"
        assert f.read() == body[12:]
        assert f.read() == b"" and f.readline() == b""
        f.seek(0)
        assert list(f) == body.splitlines(keepends=True)
        f.seek(-4, 2)
        assert f.read(100) == body[-4:]
        f.seek(len(body) - 3)
        assert f.read(100) == b"2\r\n"


def test_open_message_of_a_message_bigger_than_the_tail_read(spool):
    body = b"Subject: big\r\n\r\n" + b"y" * 200_000 + b"\r\n"
    env = commit(spool, body)
    assert message(spool, env.queue_id) == body
    assert spool.load(env.queue_id) == env


def test_open_message_with_an_envelope_bigger_than_the_tail_read(spool):
    w = spool.new_message()
    w.write(BODY)
    env = Envelope(w.queue_id, "a@example.com", [Recipient(f"r{i}@example.org") for i in range(400)], arrival=1.0)
    w.commit(env)
    assert len(env.to_json()) > queuefile._TAIL_READ
    assert message(spool, env.queue_id) == BODY
    assert spool.load(env.queue_id) == env


@pytest.mark.parametrize("damage", ["truncated", "no footer", "wrong lengths", "empty"])
def test_open_message_refuses_what_is_not_a_queue_file(spool, damage):
    env = commit(spool)
    path = spool.message_path(env.queue_id)
    with open(path, "rb") as f:
        raw = f.read()
    raw = {
        "truncated": raw[:-10],
        "no footer": BODY,
        "wrong lengths": raw[:-queuefile.FOOTER_SIZE] + b"\n#mailhub-queue 2 %016x %08x\n" % (1, 2),
        "empty": b"",
    }[damage]
    with open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(queuefile.QueueFileError):
        spool.open_message(env.queue_id)
    with pytest.raises(EnvelopeFormatError):
        spool.load(env.queue_id)


class ShortWrites:
    """A raw file whose write() takes at most 3 bytes, as a nearly full disk may."""

    def __init__(self, real):
        self.real = real

    def write(self, data):
        return self.real.write(bytes(data[:3]))

    def fileno(self):
        return self.real.fileno()

    def close(self):
        self.real.close()


def test_writer_survives_short_writes(spool):
    w = spool.new_message()
    w._open()  # a message beyond MEMORY_LIMIT: straight to tmp/
    w._file = ShortWrites(w._file)
    w.write(b"0123456789")
    assert w.size == 10
    env = envelope(w.queue_id)
    w.commit(env)
    assert message(spool, w.queue_id) == b"0123456789"
    assert spool.load(w.queue_id) == env  # the trailer too was written whole


def test_abort_leaves_nothing(spool):
    w = spool.new_message()
    w.write(BODY)
    w.abort()
    assert listing(spool)["tmp"] == [] and spool.queue_ids() == []


def test_commit_wrong_envelope_refused(spool):
    w = spool.new_message()
    with pytest.raises(ValueError):
        w.commit(envelope("ABCDEFGHJKLMN"))
    w.abort()


def test_update_writes_an_envelope_file_and_leaves_the_queue_file(spool):
    env = commit(spool)
    with open(spool.message_path(env.queue_id), "rb") as f:
        before = f.read()
    env.attempts = 3
    env.recipients[0].state = DELIVERED
    spool.update(env)
    assert spool.load(env.queue_id).attempts == 3
    assert spool.load(env.queue_id).recipients[0].state == DELIVERED
    assert listing(spool) == EMPTY | {"queue": [env.queue_id], "envelopes": [env.queue_id + ".json"]}
    with open(spool.message_path(env.queue_id), "rb") as f:
        assert f.read() == before  # never changed after the commit
    env.attempts = 4
    spool.update(env)  # and again: replaced atomically
    assert spool.load(env.queue_id).attempts == 4
    assert listing(spool)["tmp"] == []


def test_update_of_removed_message_refused(spool):
    env = commit(spool)
    spool.remove(env.queue_id)
    with pytest.raises(KeyError):
        spool.update(env)
    spool.drain()
    assert listing(spool) == EMPTY


@pytest.mark.parametrize("updated", [False, True])
def test_remove(spool, updated):
    env = commit(spool)
    if updated:
        env.attempts = 1
        spool.update(env)
    spool.remove(env.queue_id)
    # no longer queued at once (the files go in the remover thread)
    assert spool.queue_ids() == []
    with pytest.raises(KeyError):
        spool.load(env.queue_id)
    assert list(spool) == []
    spool.drain()
    assert listing(spool) == EMPTY
    spool.remove(env.queue_id)  # idempotent
    with pytest.raises(KeyError):
        spool.remove("../../etc")


def test_remove_without_fsync(tmp_path):
    spool = Spool(str(tmp_path / "spool"), fsync=False)
    env = commit(spool)
    env.attempts = 1
    spool.update(env)
    spool.remove(env.queue_id)
    assert listing(spool) == EMPTY


def test_load_errors(spool):
    with pytest.raises(KeyError):
        spool.load("NOSUCHMESSAGE")
    with pytest.raises(KeyError):
        spool.load("../x")
    env = commit(spool)
    with open(spool.envelope_path(env.queue_id), "wb") as f:
        f.write(b"{not json")
    with pytest.raises(EnvelopeFormatError):
        spool.load(env.queue_id)


def test_add(spool):
    env = envelope(new_queue_id())
    spool.add(env, BODY)
    assert spool.load(env.queue_id) == env
    assert message(spool, env.queue_id) == BODY


def test_queue_file_bytes_is_what_a_commit_writes(spool):
    env = commit(spool)
    with open(spool.message_path(env.queue_id), "rb") as f:
        assert f.read() == queuefile.queue_file_bytes(BODY, env)


def test_ids_unique_and_sortable():
    ids = [new_queue_id(1_700_000_000 + i / 1000) for i in range(2000)]
    assert len(set(ids)) == 2000
    assert sorted(ids) == ids
    assert all(is_queue_id(i) for i in ids)
    assert len({len(i) for i in ids}) == 1
    assert new_queue_id(1_700_000_000.5) < new_queue_id(1_700_000_001)
    assert not is_queue_id("../../etc/passwd") and not is_queue_id("abc")


# -- failures during commit ----------------------------------------------------------


@pytest.mark.parametrize("fail_at", ["write", "fsync", "rename", "dir-fsync"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_oserror_during_commit_leaves_nothing_queued(tmp_path, monkeypatch, fail_at, size):
    spool = Spool(str(tmp_path / "spool"))
    real_rename, real_fsync, real_fsync_dir, real_write = os.rename, os.fsync, durable.fsync_dir, os.write

    def rename(src, dst):
        if fail_at == "rename" and "/queue/" in dst:
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    def fsync(fd):
        if fail_at == "fsync":
            raise OSError(5, "I/O error")
        return real_fsync(fd)

    def write(fd, data):
        if fail_at == "write":
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    def fsync_dir(path):
        if fail_at == "dir-fsync" and path.endswith("queue"):
            raise OSError(5, "I/O error")
        return real_fsync_dir(path)

    w = spool.new_message()
    w.write(BODY if size == "small" else b"z" * (spool_module.MEMORY_LIMIT + 10))
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(durable, "fsync_dir", fsync_dir)
    if size == "large" and fail_at == "write":
        w._file = ShortWrites(w._file)
        w._file.write = lambda data: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    with pytest.raises(OSError):
        w.commit(envelope(w.queue_id))
    monkeypatch.undo()
    assert listing(spool) == EMPTY
    assert spool.recover() == []


# -- recovery ------------------------------------------------------------------------------


def test_recover_returns_pending_and_cleans_tmp(spool):
    env = commit(spool)
    updated = commit(spool)
    updated.attempts = 2
    spool.update(updated)
    for name in ("LEFTOVER.msg", "LEFTOVER.env"):
        with open(os.path.join(spool.path, "tmp", name), "wb") as f:
            f.write(b"half")
    assert spool.recover() == [env, updated]
    assert listing(spool)["tmp"] == []


def test_recover_envelope_without_queue_file_deleted(spool):
    """What a crash between the two unlinks of a removal leaves: the message is gone, so is its envelope."""
    env = commit(spool)
    spool.update(env)
    os.unlink(spool.message_path(env.queue_id))
    assert spool.recover() == []
    assert listing(spool) == EMPTY


def test_recover_unparseable_envelope_quarantined_with_its_message(spool):
    env = commit(spool)
    good = commit(spool)
    with open(spool.envelope_path(env.queue_id), "wb") as f:
        f.write(b'{"version": 99}')
    assert spool.recover() == [good]
    assert listing(spool)["corrupt"] == sorted([env.queue_id, env.queue_id + ".json"])
    with open(os.path.join(spool.path, "corrupt", env.queue_id), "rb") as f:
        assert f.read().startswith(BODY)  # acknowledged mail is never deleted
    assert listing(spool)["queue"] == [good.queue_id] and listing(spool)["envelopes"] == []


def test_recover_unreadable_queue_file_quarantined(spool):
    env = commit(spool)
    good = commit(spool)
    path = spool.message_path(env.queue_id)
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[:-1])
    assert spool.recover() == [good]
    assert listing(spool)["corrupt"] == [env.queue_id]
    with open(os.path.join(spool.path, "corrupt", env.queue_id), "rb") as f:
        assert f.read() == raw[:-1]


def test_recover_strange_file_names_quarantined(spool):
    with open(os.path.join(spool.path, "envelopes", "notes.txt"), "w") as f:
        f.write("hello")
    with open(os.path.join(spool.path, "queue", "x.y"), "w") as f:
        f.write("hello")
    assert spool.recover() == []
    assert listing(spool)["corrupt"] == ["notes.txt", "x.y"]


def test_recover_goes_on_past_every_queue_file_it_sets_aside(spool, monkeypatch):
    """
    A strange name, an unreadable file, a message removed meanwhile and a message already done, each
    sorted before a pending message: recovery deals with each and still returns the pending one.
    """
    with open(os.path.join(spool.path, "queue", "-strange"), "w") as f:  # sorts before every queue id
        f.write("hello")
    unreadable, vanished, done, pending = commit(spool), commit(spool), commit(spool), commit(spool)
    done.recipients[0].state = DELIVERED
    spool.update(done)
    with open(spool.message_path(unreadable.queue_id), "r+b") as f:
        f.truncate(5)
    spool.update(vanished)
    real_load = spool.load

    def load(qid):
        if qid == vanished.queue_id:
            raise KeyError(qid)  # removed by the queue tool between the listing and the read
        return real_load(qid)

    monkeypatch.setattr(spool, "load", load)
    assert spool.recover() == [pending]
    assert listing(spool)["corrupt"] == ["-strange", unreadable.queue_id]
    assert done.queue_id not in listing(spool)["queue"]


def test_iterating_skips_an_unreadable_envelope_and_goes_on(spool):
    bad, good = commit(spool), commit(spool)
    spool.update(bad)
    with open(spool.envelope_path(bad.queue_id), "wb") as f:
        f.write(b"{not json")
    assert list(spool) == [good]


def test_recover_done_envelope_removed(spool):
    env = commit(spool)
    env.recipients[0].state = DELIVERED
    spool.update(env)
    assert spool.recover() == []
    assert listing(spool) == EMPTY


def test_recover_twice_quarantine_names_do_not_collide(spool):
    for _ in range(2):
        env = commit(spool)
        with open(spool.message_path(env.queue_id), "wb") as f:
            f.write(b"junk")
        os.rename(spool.message_path(env.queue_id), os.path.join(spool.path, "queue", "SAMENAME0"))
        spool.recover()
    assert len(listing(spool)["corrupt"]) == 2


# -- the first layout (new/ID + envelopes/ID.json) is converted ------------------------------


def format1_layout(spool: Spool, env: Envelope, body: bytes = BODY) -> None:
    """Queue C{env} in spool format 1 (new/ID + envelopes/ID.json), which migrate() converts."""
    os.makedirs(os.path.join(spool.path, "new"), exist_ok=True)
    with open(os.path.join(spool.path, "new", env.queue_id), "wb") as f:
        f.write(body)
    with open(spool.envelope_path(env.queue_id), "wb") as f:
        f.write(env.to_json())


def test_recover_converts_the_first_layout(spool):
    a, b = envelope(new_queue_id()), envelope(new_queue_id(), attempts=2)
    big = b"Subject: big\r\n\r\n" + b"b" * 300_000
    format1_layout(spool, a)
    format1_layout(spool, b, big)
    with open(os.path.join(spool.path, "new", "15NXJ6XHETT74RJ74"), "wb") as f:
        f.write(b"never committed: no envelope")
    assert spool.recover() == [a, b]
    assert listing(spool) == EMPTY | {"queue": sorted([a.queue_id, b.queue_id])}
    assert not os.path.exists(os.path.join(spool.path, "new"))
    assert message(spool, a.queue_id) == BODY and message(spool, b.queue_id) == big
    assert spool.load(b.queue_id) == b
    assert spool.recover() == [a, b]  # and nothing happens the second time


def test_conversion_interrupted_after_the_queue_file_keeps_it(spool):
    """A crash after the queue file was made durable but before the format-1 files went."""
    env = commit(spool)
    format1_layout(spool, env)
    assert spool.recover() == [env]
    assert listing(spool) == EMPTY | {"queue": [env.queue_id]}  # the format-1 envelope was only a copy
    assert message(spool, env.queue_id) == BODY


def test_conversion_interrupted_keeps_an_envelope_updated_since(spool):
    """new/ID left over (its unlink failed) while the daemon updated the envelope: the update stays."""
    env = commit(spool)
    env.recipients[0].state = DELIVERED
    env.recipients.append(Recipient("c@example.org"))
    spool.update(env)
    os.makedirs(os.path.join(spool.path, "new"))
    with open(os.path.join(spool.path, "new", env.queue_id), "wb") as f:
        f.write(BODY)
    assert spool.recover() == [env]
    assert spool.load(env.queue_id).recipients[0].state == DELIVERED
    assert listing(spool) == EMPTY | {"queue": [env.queue_id], "envelopes": [env.queue_id + ".json"]}


def test_conversion_quarantines_an_unreadable_old_envelope(spool):
    env = envelope(new_queue_id())
    format1_layout(spool, env)
    with open(spool.envelope_path(env.queue_id), "wb") as f:
        f.write(b"{broken")
    assert spool.recover() == []
    assert listing(spool)["corrupt"] == sorted([env.queue_id, env.queue_id + ".json"])


def test_conversion_quarantines_a_directory_in_new_and_closes_what_it_opened(spool):
    env, good = envelope(new_queue_id()), envelope(new_queue_id())
    format1_layout(spool, env)
    format1_layout(spool, good)
    os.unlink(os.path.join(spool.path, "new", env.queue_id))
    os.mkdir(os.path.join(spool.path, "new", env.queue_id))
    before = len(os.listdir("/proc/self/fd"))
    assert spool.recover() == [good]
    assert len(os.listdir("/proc/self/fd")) == before
    assert listing(spool)["corrupt"] == sorted([env.queue_id, env.queue_id + ".json"])
    assert listing(spool)["queue"] == [good.queue_id]


def test_migrate_without_a_format1_spool_is_a_no_op(spool):
    env = commit(spool)
    assert spool.migrate() == 0
    assert listing(spool) == EMPTY | {"queue": [env.queue_id]}


# -- performance machinery: in-memory small messages, group commit, remover --------


def test_small_message_touches_no_file_before_commit(spool):
    w = spool.new_message()
    w.write(BODY)
    assert listing(spool)["tmp"] == []
    w.commit(envelope(w.queue_id))
    assert message(spool, w.queue_id) == BODY
    w2 = spool.new_message()
    w2.write(BODY)
    w2.abort()
    assert listing(spool)["tmp"] == [] and listing(spool)["queue"] == [w.queue_id]


def test_large_message_spills_to_tmp(spool):
    w = spool.new_message()
    chunk = b"x" * 1000 + b"\r\n"
    n = spool_module.MEMORY_LIMIT // len(chunk) + 2
    for _ in range(n):
        w.write(chunk)
    assert listing(spool)["tmp"] == [w.queue_id + ".msg"]
    assert w.size == n * len(chunk)
    env = envelope(w.queue_id)
    w.commit(env)
    assert message(spool, w.queue_id) == chunk * n
    assert spool.load(w.queue_id) == env
    assert listing(spool)["tmp"] == []


@pytest.mark.parametrize("size", ["small", "large"])
def test_queue_file_is_private_whatever_the_umask(spool, size):
    """A queue file is mode 0600 under a permissive umask, whether it was written at commit or spilled to tmp/."""
    old = os.umask(0)
    try:
        env = commit(spool, BODY if size == "small" else b"x" * (spool_module.MEMORY_LIMIT + 1))
    finally:
        os.umask(old)
    assert os.stat(spool.message_path(env.queue_id)).st_mode & 0o777 == 0o600


def test_spilling_never_writes_through_an_existing_tmp_file(spool):
    """The tmp/ file a large message spills to is created exclusively: a file (or link) already there is refused."""
    w = spool.new_message()
    planted = os.path.join(spool.path, "tmp", w.queue_id + ".msg")
    with open(planted, "wb") as f:
        f.write(b"planted")
    with pytest.raises(FileExistsError):
        w.write(b"x" * (spool_module.MEMORY_LIMIT + 1))
    with open(planted, "rb") as f:
        assert f.read() == b"planted"


def test_large_message_abort_removes_tmp(spool):
    w = spool.new_message()
    w.write(b"x" * (spool_module.MEMORY_LIMIT + 1))
    assert listing(spool)["tmp"] == [w.queue_id + ".msg"]
    w.abort()
    assert listing(spool)["tmp"] == []


def test_dirsync_one_fsync_covers_concurrent_callers():
    """While an fsync runs, arriving callers wait and then share one more."""
    import threading

    started, release = threading.Event(), threading.Event()
    calls = []

    def slow_fsync():
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            started.set()
            release.wait(5)

    ds = durable.DirSync()
    first = threading.Thread(target=ds.sync, args=(slow_fsync,), name="first")
    first.start()
    assert started.wait(5)
    # these renamed after the first fsync began: it does not cover them
    others = [threading.Thread(target=ds.sync, args=(slow_fsync,), name=f"o{i}") for i in range(8)]
    for t in others:
        t.start()
    assert _waiting(ds, 8)  # every one waits for the running fsync instead of starting its own
    release.set()
    for t in [first] + others:
        t.join(5)
        assert not t.is_alive()
    assert len(calls) == 2 and ds.fsyncs == 2  # not 9


def _waiting(ds: durable.DirSync, n: int) -> bool:
    """Poll (with a deadline) until C{n} threads wait on C{ds}'s condition."""
    import time

    deadline = time.monotonic() + 5
    while len(ds._cond._waiters) != n:  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_dirsync_failed_fsync_raises_in_every_caller_that_waited_for_it():
    """Two callers arrive while an fsync runs; the next fsync, which covers both, fails: both see the error."""
    import threading

    started, release = threading.Event(), threading.Event()
    calls = []

    def fsync():
        calls.append(1)
        if len(calls) == 1:
            started.set()
            release.wait(5)
        else:
            raise OSError(5, "I/O error")

    ds = durable.DirSync()
    first = threading.Thread(target=ds.sync, args=(fsync,))
    first.start()
    assert started.wait(5)
    outcomes: list[object] = []

    def waiter():
        try:
            ds.sync(fsync)
            outcomes.append("durable")
        except OSError as e:
            outcomes.append(e.errno)

    waiters = [threading.Thread(target=waiter) for _ in range(2)]
    for t in waiters:
        t.start()
    assert _waiting(ds, 2)
    release.set()
    for t in [first, *waiters]:
        t.join(5)
        assert not t.is_alive()
    assert outcomes == [5, 5] and len(calls) == 2


def test_dirsync_with_patience_still_fsyncs_when_nobody_else_does():
    calls = []
    durable.DirSync().sync(lambda: calls.append(1), patience=0.01)
    assert calls == [1]


def test_dirsync_error_reaches_every_waiter():
    ds = durable.DirSync()

    def broken():
        raise OSError(5, "I/O error")

    with pytest.raises(OSError):
        ds.sync(broken)
    ds.sync(lambda: None)  # a later fsync is a new chance


def test_remover_unlinks_envelope_only_after_queue_fsync(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path / "spool"))
    env = commit(spool)
    spool.update(env)
    events = []
    real = durable.fsync_dir

    def fsync_dir(path):
        events.append(("fsync", os.path.basename(path), os.path.exists(spool.message_path(env.queue_id)),
                       os.path.exists(spool.envelope_path(env.queue_id))))
        return real(path)

    monkeypatch.setattr(durable, "fsync_dir", fsync_dir)
    spool.remove(env.queue_id)
    spool.drain()
    # queue file already unlinked, envelope still there, when queue/ was synced
    assert events == [("fsync", "queue", False, True)]
    assert not os.path.exists(spool.envelope_path(env.queue_id))


def test_remover_of_a_message_never_updated_makes_no_fsync(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path / "spool"))
    env = commit(spool)
    events = []
    monkeypatch.setattr(durable, "fsync_dir", events.append)
    spool.remove(env.queue_id)
    spool.drain()
    assert events == [] and listing(spool) == EMPTY


def test_remover_keeps_envelope_when_fsync_fails(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path / "spool"))
    env = commit(spool)
    spool.update(env)

    def fsync_dir(path):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(durable, "fsync_dir", fsync_dir)
    spool.remove(env.queue_id)
    spool.drain()
    monkeypatch.undo()
    assert listing(spool)["queue"] == [] and listing(spool)["envelopes"] == [env.queue_id + ".json"]
    assert spool.recover() == [] and listing(spool) == EMPTY  # the orphan goes at the next start


def test_remover_goes_on_after_a_queue_file_it_cannot_unlink(tmp_path, monkeypatch):
    """
    A queue file that cannot be unlinked stays queued (updatable, found at the next start); the other
    messages of the same batch are still removed, and the remover forgets every id it has dealt with.
    """
    import threading

    spool = Spool(str(tmp_path / "spool"))
    first, stuck, other, plain = commit(spool), commit(spool), commit(spool), commit(spool)
    for env in (first, stuck, other):
        spool.update(env)
    gate = threading.Event()
    real_unlink = os.unlink

    def unlink(path, *a, **kw):
        if path == spool.message_path(first.queue_id):
            gate.wait(5)  # hold the remover in its first batch while the others are queued behind it
        if path == spool.message_path(stuck.queue_id):
            raise PermissionError(13, "Permission denied")
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(spool_module.os, "unlink", unlink)
    spool.remove(first.queue_id)
    for env in (stuck, other, plain):  # one batch: stuck first
        spool.remove(env.queue_id)
    gate.set()
    spool.drain()
    monkeypatch.undo()
    assert listing(spool)["queue"] == [stuck.queue_id]
    assert listing(spool)["envelopes"] == [stuck.queue_id + ".json"]
    assert spool._removing == set()
    spool.update(stuck)  # still queued: not taken for a message being removed
    assert [e.queue_id for e in spool.recover()] == [stuck.queue_id]


def test_update_while_removing_refused(tmp_path, monkeypatch):
    """An update racing a removal must not bring back a ghost envelope."""
    spool = Spool(str(tmp_path / "spool"))
    env = commit(spool)
    spool.update(env)
    import threading

    gate = threading.Event()
    real = durable.fsync_dir
    monkeypatch.setattr(durable, "fsync_dir", lambda p: (gate.wait(5), real(p)))
    spool.remove(env.queue_id)
    assert os.path.exists(spool.envelope_path(env.queue_id))  # the remover is blocked
    with pytest.raises(KeyError):
        spool.update(env)
    gate.set()
    spool.drain()
    assert listing(spool) == EMPTY


def test_concurrent_commits_share_directory_fsyncs(tmp_path):
    import threading

    spool = Spool(str(tmp_path / "spool"))
    envs = []
    lock = threading.Lock()

    def one():
        for _ in range(10):
            e = commit(spool)
            with lock:
                envs.append(e)

    ts = [threading.Thread(target=one) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(spool.queue_ids()) == sorted(e.queue_id for e in envs) and len(envs) == 80
    # never more than one fsync of queue/ per commit, usually far fewer
    assert spool.queue_sync.fsyncs <= 80 and spool.envelopes_sync.fsyncs == 0
    assert all(spool.load(e.queue_id) == e for e in envs)


@pytest.mark.parametrize("big", [False, True], ids=["in-memory", "spilled"])
def test_prepend_replace_start_and_rewrite_compose(spool, big):
    """What the end-of-data checks do in turn -- prepend, delete fields at the start, rewrite -- ends on disk as seen."""
    body = b"x" * 70 + b"\r\n"
    content = b"Authentication-Results: forged\r\nSubject: s\r\n\r\n" + body * (2000 if big else 3)
    writer = spool.new_message()
    writer.write(content)
    writer.prepend(b"Authentication-Results: ours\r\n")
    writer.replace_start(len(b"Authentication-Results: forged\r\n"), b"")
    seen = b"".join(writer.chunks())
    assert seen == content[len(b"Authentication-Results: forged\r\n") :]
    writer.rewrite([b"X-Milter: yes\r\n", *writer.chunks()])
    expected = b"Authentication-Results: ours\r\nX-Milter: yes\r\n" + seen
    assert b"".join(writer.chunks()) == expected[len(b"Authentication-Results: ours\r\n") :]
    assert writer.size == len(expected)
    writer.commit(envelope(writer.queue_id))
    assert message(spool, writer.queue_id) == expected
