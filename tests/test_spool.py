"""
Spool tests: commit, update, remove, load, and recovery from every state a
crash can leave behind.
"""

from __future__ import annotations

import json
import os

import pytest

from mailhub import spool as spool_module
from mailhub.envelope import DELIVERED, Envelope, EnvelopeFormatError, Recipient
from mailhub.spool import Spool, is_queue_id, new_queue_id

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
    return {d: sorted(os.listdir(os.path.join(spool.path, d))) for d in ("tmp", "new", "envelopes", "corrupt")}


def test_layout_created(spool):
    assert listing(spool) == {"tmp": [], "new": [], "envelopes": [], "corrupt": []}


def test_commit_then_load(spool):
    env = commit(spool)
    assert listing(spool) == {"tmp": [], "new": [env.queue_id], "envelopes": [env.queue_id + ".json"], "corrupt": []}
    with open(spool.message_path(env.queue_id), "rb") as f:
        assert f.read() == BODY
    assert spool.load(env.queue_id) == env
    assert spool.queue_ids() == [env.queue_id]
    assert list(spool) == [env]
    # the envelope is plain JSON with a version
    with open(spool.envelope_path(env.queue_id), "rb") as f:
        data = json.loads(f.read())
    assert data["version"] == 1 and data["recipients"][0]["address"] == "b@example.org"


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
    w.commit(envelope(w.queue_id))
    with open(spool.message_path(w.queue_id), "rb") as f:
        assert f.read() == b"0123456789"


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


def test_update_replaces_atomically(spool):
    env = commit(spool)
    env.attempts = 3
    env.recipients[0].state = DELIVERED
    spool.update(env)
    assert spool.load(env.queue_id).attempts == 3
    assert spool.load(env.queue_id).recipients[0].state == DELIVERED
    assert listing(spool)["tmp"] == []


def test_update_of_removed_message_refused(spool):
    env = commit(spool)
    spool.remove(env.queue_id)
    with pytest.raises(KeyError):
        spool.update(env)
    spool.drain()
    assert listing(spool)["envelopes"] == []


def test_remove(spool):
    env = commit(spool)
    spool.remove(env.queue_id)
    # no longer queued at once (the files go in the remover thread)
    assert spool.queue_ids() == []
    with pytest.raises(KeyError):
        spool.load(env.queue_id)
    assert list(spool) == []
    spool.drain()
    assert listing(spool) == {"tmp": [], "new": [], "envelopes": [], "corrupt": []}
    spool.remove(env.queue_id)  # idempotent
    with pytest.raises(KeyError):
        spool.remove("../../etc")


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


def test_ids_unique_and_sortable():
    ids = [new_queue_id(1_700_000_000 + i / 1000) for i in range(2000)]
    assert len(set(ids)) == 2000
    assert sorted(ids) == ids
    assert all(is_queue_id(i) for i in ids)
    assert len({len(i) for i in ids}) == 1
    assert new_queue_id(1_700_000_000.5) < new_queue_id(1_700_000_001)
    assert not is_queue_id("../../etc/passwd") and not is_queue_id("abc")


# -- failures during commit ----------------------------------------------------------


@pytest.mark.parametrize("fail_at", ["message-fsync", "message-rename", "dir-fsync", "envelope-rename", "envelope-dir-fsync"])
def test_oserror_during_commit_leaves_nothing_queued(tmp_path, monkeypatch, fail_at):
    spool = Spool(str(tmp_path / "spool"))
    real_rename, real_fsync, real_fsync_dir = os.rename, os.fsync, spool_module._fsync_dir

    def rename(src, dst):
        if (fail_at == "message-rename" and "/new/" in dst) or (fail_at == "envelope-rename" and dst.endswith(".json")):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    fsyncs = []

    def fsync(fd):
        fsyncs.append(fd)
        if fail_at == "message-fsync" and len(fsyncs) == 1:
            raise OSError(5, "I/O error")
        return real_fsync(fd)

    def fsync_dir(path):
        if (fail_at == "dir-fsync" and path.endswith("new")) or (fail_at == "envelope-dir-fsync" and path.endswith("envelopes")):
            raise OSError(5, "I/O error")
        return real_fsync_dir(path)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(spool_module, "_fsync_dir", fsync_dir)
    w = spool.new_message()
    w.write(BODY)
    with pytest.raises(OSError):
        w.commit(envelope(w.queue_id))
    monkeypatch.undo()
    assert listing(spool) == {"tmp": [], "new": [], "envelopes": [], "corrupt": []}
    assert spool.recover() == []


# -- recovery ------------------------------------------------------------------------------


def test_recover_returns_pending_and_cleans_tmp(spool):
    env = commit(spool)
    for name in ("LEFTOVER.msg", "LEFTOVER.env"):
        with open(os.path.join(spool.path, "tmp", name), "wb") as f:
            f.write(b"half")
    assert spool.recover() == [env]
    assert listing(spool)["tmp"] == []


def test_recover_message_without_envelope_removed(spool):
    env = commit(spool)
    os.unlink(spool.envelope_path(env.queue_id))  # crash between envelope and message unlink in remove()
    assert spool.recover() == []
    assert listing(spool) == {"tmp": [], "new": [], "envelopes": [], "corrupt": []}


def test_recover_envelope_without_message_quarantined(spool):
    env = commit(spool)
    os.unlink(spool.message_path(env.queue_id))
    assert spool.recover() == []
    assert listing(spool)["corrupt"] == [env.queue_id + ".json"]
    assert listing(spool)["envelopes"] == []


def test_recover_unparseable_envelope_quarantined_with_its_message(spool):
    env = commit(spool)
    good = commit(spool)
    with open(spool.envelope_path(env.queue_id), "wb") as f:
        f.write(b'{"version": 99}')
    assert spool.recover() == [good]
    assert listing(spool)["corrupt"] == sorted([env.queue_id, env.queue_id + ".json"])
    with open(os.path.join(spool.path, "corrupt", env.queue_id), "rb") as f:
        assert f.read() == BODY  # acknowledged mail is never deleted


def test_recover_strange_file_name_quarantined(spool):
    with open(os.path.join(spool.path, "envelopes", "notes.txt"), "w") as f:
        f.write("hello")
    assert spool.recover() == []
    assert listing(spool)["corrupt"] == ["notes.txt"]


def test_recover_done_envelope_removed(spool):
    env = commit(spool)
    env.recipients[0].state = DELIVERED
    spool.update(env)
    assert spool.recover() == []
    assert listing(spool) == {"tmp": [], "new": [], "envelopes": [], "corrupt": []}


def test_recover_twice_quarantine_names_do_not_collide(spool):
    env = commit(spool)
    os.unlink(spool.message_path(env.queue_id))
    spool.recover()
    with open(spool.envelope_path(env.queue_id), "wb") as f:
        f.write(b"junk")
    spool.recover()
    assert len(listing(spool)["corrupt"]) == 2


# -- performance machinery: in-memory small messages, group commit, remover --------


def test_small_message_touches_no_file_before_commit(spool):
    w = spool.new_message()
    w.write(BODY)
    assert listing(spool)["tmp"] == []
    w.commit(envelope(w.queue_id))
    with open(spool.message_path(w.queue_id), "rb") as f:
        assert f.read() == BODY
    w2 = spool.new_message()
    w2.write(BODY)
    w2.abort()
    assert listing(spool)["tmp"] == [] and listing(spool)["new"] == [w.queue_id]


def test_large_message_spills_to_tmp(spool):
    w = spool.new_message()
    chunk = b"x" * 1000 + b"\r\n"
    n = spool_module.MEMORY_LIMIT // len(chunk) + 2
    for _ in range(n):
        w.write(chunk)
    assert listing(spool)["tmp"] == [w.queue_id + ".msg"]
    assert w.size == n * len(chunk)
    w.commit(envelope(w.queue_id))
    with open(spool.message_path(w.queue_id), "rb") as f:
        assert f.read() == chunk * n
    assert listing(spool)["tmp"] == []


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

    ds = spool_module.DirSync()
    first = threading.Thread(target=ds.sync, args=(slow_fsync,), name="first")
    first.start()
    assert started.wait(5)
    # these renamed after the first fsync began: it does not cover them
    others = [threading.Thread(target=ds.sync, args=(slow_fsync,), name=f"o{i}") for i in range(8)]
    for t in others:
        t.start()
    release.set()
    for t in [first] + others:
        t.join(5)
        assert not t.is_alive()
    assert len(calls) == 2 and ds.fsyncs == 2  # not 9


def test_dirsync_error_reaches_every_waiter():
    ds = spool_module.DirSync()

    def broken():
        raise OSError(5, "I/O error")

    with pytest.raises(OSError):
        ds.sync(broken)
    ds.sync(lambda: None)  # a later fsync is a new chance


def test_remover_unlinks_message_only_after_envelopes_fsync(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path / "spool"))
    env = commit(spool)
    events = []
    real = spool_module._fsync_dir

    def fsync_dir(path):
        events.append(("fsync", os.path.basename(path), os.path.exists(spool.envelope_path(env.queue_id)),
                       os.path.exists(spool.message_path(env.queue_id))))
        return real(path)

    monkeypatch.setattr(spool_module, "_fsync_dir", fsync_dir)
    spool.remove(env.queue_id)
    spool.drain()
    # envelope already unlinked, message still there, when envelopes/ was synced
    assert events == [("fsync", "envelopes", False, True)]
    assert not os.path.exists(spool.message_path(env.queue_id))


def test_remover_keeps_message_when_fsync_fails(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path / "spool"))
    env = commit(spool)

    def fsync_dir(path):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(spool_module, "_fsync_dir", fsync_dir)
    spool.remove(env.queue_id)
    spool.drain()
    monkeypatch.undo()
    assert listing(spool)["new"] == [env.queue_id] and listing(spool)["envelopes"] == []
    assert spool.recover() == [] and listing(spool)["new"] == []  # the orphan goes at the next start


def test_update_while_removing_refused(tmp_path, monkeypatch):
    """An update racing a removal must not bring back a ghost envelope."""
    spool = Spool(str(tmp_path / "spool"))
    env = commit(spool)
    import threading

    gate = threading.Event()
    real = spool_module._fsync_dir
    monkeypatch.setattr(spool_module, "_fsync_dir", lambda p: (gate.wait(5), real(p)))
    spool.remove(env.queue_id)
    assert os.path.exists(spool.message_path(env.queue_id))  # the remover is blocked
    with pytest.raises(KeyError):
        spool.update(env)
    gate.set()
    spool.drain()
    assert listing(spool)["envelopes"] == [] and listing(spool)["new"] == []


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
    # never more than one fsync per commit, usually far fewer
    assert spool.new_sync.fsyncs <= 80 and spool.envelopes_sync.fsyncs <= 80
    assert all(spool.load(e.queue_id) == e for e in envs)
