"""
The order of the file-system calls that make the spool durable, recorded
call by call: for every commit path (a small message kept in memory, a
large one spilled to tmp/, an envelope update, a removal, the conversion
of the first layout, a pickup file written by mailhub-sendmail and queued
by the daemon) the file's bytes are all written and fsync'd before the
rename (or link) that publishes it, and its directory is fsync'd after
that rename, before the call returns.  A removal unlinks the queue file,
fsyncs queue/, and only then unlinks the envelope file.

The recorder wraps os.fsync, os.rename, os.replace, os.link and os.unlink
and notes for each the file (device and inode), the size an fsync'd file
had, and the paths; an fsync of a directory is told from a file's by
fstat.
"""

from __future__ import annotations

import os
import stat

import pytest
from twisted.internet import task

from mailhub.envelope import DELIVERED, Envelope, Recipient
from mailhub.queue.pickup import PickupService
from mailhub.queue.pickupfile import ensure_pickup_dirs, pickup_dirs, write_pickup
from mailhub.queue.queuefile import new_queue_id
from mailhub.queue.spool import MEMORY_LIMIT, Spool

SMALL = b"Subject: small\r\n\r\nhello\r\n"
LARGE = b"Subject: large\r\n\r\n" + b"x" * (3 * MEMORY_LIMIT) + b"\r\n"


class Recorder:
    """Every durable file-system call made while it is installed, in completion order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple] = []
        #: paths whose existence is noted at each directory fsync (for
        #: unlinks made through a reference to os.unlink taken at import)
        self.watch: list[str] = []
        self.existing: dict[int, set[str]] = {}
        real = {name: getattr(os, name) for name in ("fsync", "rename", "replace", "link", "unlink")}

        def key(st: os.stat_result) -> tuple[int, int]:
            return (st.st_dev, st.st_ino)

        def fsync(fd):
            st = os.fstat(fd)
            real["fsync"](fd)
            kind = "fsync-dir" if stat.S_ISDIR(st.st_mode) else "fsync"
            if kind == "fsync-dir":
                self.existing[len(self.events)] = {p for p in self.watch if os.path.lexists(p)}
            self.events.append((kind, key(st), st.st_size))

        def publish(name):
            def call(src, dst, *args, **kwargs):
                st = os.lstat(src)
                real[name](src, dst, *args, **kwargs)
                self.events.append((name, key(st), os.path.abspath(src), os.path.abspath(dst)))
            return call

        def unlink(path, *args, **kwargs):
            real["unlink"](path, *args, **kwargs)
            self.events.append(("unlink", None, os.path.abspath(path)))

        monkeypatch.setattr(os, "fsync", fsync)
        for name in ("rename", "replace", "link"):
            monkeypatch.setattr(os, name, publish(name))
        monkeypatch.setattr(os, "unlink", unlink)

    def index(self, kind: str, path: str, after: int = -1) -> int:
        """Index of the first C{kind} event (rename, link, replace, unlink) on C{path} after C{after}."""
        path = os.path.abspath(path)
        for i, event in enumerate(self.events):
            if i > after and event[0] == kind and event[-1] == path:
                return i
        raise AssertionError(f"no {kind} of {path} after event {after}: {self.events}")

    def assert_published_durably(self, final: str) -> int:
        """
        C{final} was renamed (or linked) into place after an fsync of its
        complete bytes, and its directory was fsync'd after that; return
        the index of that directory fsync.
        """
        final = os.path.abspath(final)
        published = [i for i, e in enumerate(self.events) if e[0] in ("rename", "replace", "link") and e[3] == final]
        assert published, f"{final} was never renamed or linked into place: {self.events}"
        at = published[-1]
        inode = self.events[at][1]
        size = os.stat(final).st_size
        synced = [i for i, e in enumerate(self.events[:at]) if e[0] == "fsync" and e[1] == inode]
        assert synced, f"{final}: no fsync of the file before its rename: {self.events}"
        assert self.events[synced[-1]][2] == size, (
            f"{final}: fsync'd at {self.events[synced[-1]][2]} bytes, published with {size}: {self.events}"
        )
        return self.assert_directory_synced(os.path.dirname(final), at)

    def assert_directory_synced(self, directory: str, after: int) -> int:
        """C{directory} was fsync'd after event C{after}; return the index of that fsync."""
        st = os.stat(directory)
        for i in range(after + 1, len(self.events)):
            e = self.events[i]
            if e[0] == "fsync-dir" and e[1] == (st.st_dev, st.st_ino):
                return i
        raise AssertionError(f"no fsync of {directory} after event {after}: {self.events}")


@pytest.fixture
def spool(tmp_path) -> Spool:
    return Spool(str(tmp_path / "spool"), fsync=True)


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    return Recorder(monkeypatch)


def envelope(qid: str) -> Envelope:
    return Envelope(qid, "a@example.org", [Recipient("b@example.com"), Recipient("c@example.com")],
                    arrival=1_700_000_000.0)


def receive(spool: Spool, data: bytes) -> Envelope:
    writer = spool.new_message()
    for start in range(0, len(data), 8192):
        writer.write(data[start:start + 8192])
    env = envelope(writer.queue_id)
    writer.commit(env)
    return env


@pytest.mark.parametrize("data", [SMALL, LARGE], ids=["in-memory", "spilled-to-tmp"])
def test_commit_fsyncs_the_file_then_renames_then_fsyncs_queue(spool, recorder, data):
    env = receive(spool, data)
    final = spool.message_path(env.queue_id)
    recorder.assert_published_durably(final)
    tmp = os.path.join(spool.path, "tmp", env.queue_id + ".msg")
    assert recorder.events[recorder.index("rename", final)][2] == tmp
    with spool.open_message(env.queue_id) as f:
        assert f.read() == data


def test_add_fsyncs_the_file_then_renames_then_fsyncs_queue(spool, recorder):
    env = envelope(new_queue_id())
    spool.add(env, LARGE)
    recorder.assert_published_durably(spool.message_path(env.queue_id))


def test_update_fsyncs_the_envelope_then_renames_then_fsyncs_envelopes(spool, recorder):
    env = receive(spool, SMALL)
    start = len(recorder.events)
    env.recipients[0].state = DELIVERED
    spool.update(env)
    assert all(e[0] in ("fsync", "fsync-dir", "rename", "unlink") for e in recorder.events[start:])
    recorder.assert_published_durably(spool.envelope_path(env.queue_id))
    assert spool.load(env.queue_id) == env


def test_remove_unlinks_the_queue_file_fsyncs_queue_then_unlinks_the_envelope(spool, recorder):
    env = receive(spool, SMALL)
    env.recipients[0].state = DELIVERED
    spool.update(env)
    start = len(recorder.events) - 1
    spool.remove(env.queue_id)
    spool.drain()
    queue_file = recorder.index("unlink", spool.message_path(env.queue_id), after=start)
    synced = recorder.assert_directory_synced(os.path.join(spool.path, "queue"), queue_file)
    assert recorder.index("unlink", spool.envelope_path(env.queue_id), after=start) > synced
    assert not os.path.exists(spool.envelope_path(env.queue_id))


def test_recover_fsyncs_envelopes_after_deleting_an_orphan_envelope(spool, recorder):
    """An envelope whose queue file is gone (a crash during removal) is deleted, and envelopes/ fsync'd after."""
    env = receive(spool, SMALL)
    spool.update(env)
    os.unlink(spool.message_path(env.queue_id))
    start = len(recorder.events) - 1
    assert spool.recover() == []
    orphan = recorder.index("unlink", spool.envelope_path(env.queue_id), after=start)
    recorder.assert_directory_synced(os.path.join(spool.path, "envelopes"), orphan)


def test_conversion_fsyncs_the_queue_file_links_it_fsyncs_queue_then_deletes_the_old_files(spool, recorder):
    env = envelope(new_queue_id())
    os.makedirs(os.path.join(spool.path, "new"))
    old = os.path.join(spool.path, "new", env.queue_id)
    with open(old, "wb") as f:
        f.write(LARGE)
    with open(spool.envelope_path(env.queue_id), "wb") as f:
        f.write(env.to_json())
    recorder.watch = [old, spool.envelope_path(env.queue_id)]
    assert spool.migrate() == 1
    synced = recorder.assert_published_durably(spool.message_path(env.queue_id))
    # the old files were still there when queue/ was fsync'd, and are gone now
    assert recorder.existing[synced] == set(recorder.watch)
    assert not any(os.path.lexists(p) for p in recorder.watch)


def test_write_pickup_fsyncs_the_file_then_renames_then_fsyncs_new(spool, recorder):
    ensure_pickup_dirs(spool.path)
    name = write_pickup(spool.path, "a@example.org", ["b@example.com"], [LARGE])
    recorder.assert_published_durably(os.path.join(pickup_dirs(spool.path)[1], name))


def test_pickup_removes_its_file_only_after_the_queue_commit_is_durable(spool, recorder):
    ensure_pickup_dirs(spool.path)
    name = write_pickup(spool.path, "a@example.org", ["b@example.com"], [SMALL])
    clock = task.Clock()
    queued: list[Envelope] = []
    svc = PickupService(spool, queued.append, clock, max_size=10_000_000, hostname="mx.example",
                        notifier_factory=lambda _clock: None)
    start = len(recorder.events) - 1
    svc.startService()
    clock.advance(0)
    svc.stopService()
    [env] = queued
    synced = recorder.assert_published_durably(spool.message_path(env.queue_id))
    assert synced > start
    assert recorder.index("unlink", os.path.join(pickup_dirs(spool.path)[1], name), after=start) > synced
