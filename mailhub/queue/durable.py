"""
The file-system steps that make a write durable: an fsync of a file
before the rename that publishes it, an fsync of its directory after.

Owns: L{fsync_dir}, the group commit of a directory's fsync shared by
threads (L{DirSync}), the group commit of a whole file system's
C{syncfs()} (L{FileSystemSync}, L{SyncFSDir}: C{spool.sync = "syncfs"}),
the creation of a whole file in one call (L{write_file}), and unlinks
whose failure is ignored or only logged.  The spool, the pickup directory
and local delivery write durably with these.

Must not touch: the reactor, the network, what the files mean (the
callers decide which file goes where and in which order).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from twisted.logger import Logger

from mailhub.syncfs import syncfs

__all__ = [
    "fsync_dir", "DirSync", "FileSystemSync", "SyncFSDir", "FILE_SYSTEMS", "write_file", "unlink_quietly",
    "unlink_logged",
]

log = Logger()


def fsync_dir(path: str) -> None:
    """fsync a directory, so the renames and unlinks in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirSync:
    """
    Group commit of one directory's fsync, shared by threads.

    A thread that has just renamed (or linked, or unlinked) a name in the
    directory calls L{sync}; it returns once an fsync of the directory that
    I{began after that call} has completed, so it covers the caller's
    change.  If no fsync is running the caller starts one; if one is
    running (it may have begun before the caller's rename) the caller waits
    for it to end and then for the next one, which one of the waiters
    starts and which covers all of them.  N concurrent committers therefore
    cost about two fsyncs, not N.  An fsync error is raised in every
    caller that relied on that fsync.

    @param path: the directory, opened for each fsync; or C{None} when
        every caller passes its own C{fsync} callable (a descriptor it holds).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._cond = threading.Condition(threading.Lock())
        self._started = 0  # generation of the last fsync begun
        self._done = 0  # generation of the last fsync ended
        self._running = False
        self._errors: dict[int, BaseException] = {}
        #: fsyncs really made (for tests and the benchmark's curiosity)
        self.fsyncs = 0

    def sync(self, fsync: Callable[[], None] | None = None, patience: float = 0.0) -> None:
        """
        Return when the directory is durable as of this call; raise if that
        fsync failed.

        @param patience: seconds to wait for another thread to start the
            covering fsync before starting one.  For work that is not
            waited for by a client (the spool's remover): under load it
            then rides on the commits' fsyncs and adds none of its own.
        """
        with self._cond:
            target = self._started + 1  # the first fsync to begin after now
            deadline = None
            while self._done < target:
                if self._running:
                    self._cond.wait()
                    continue
                if patience <= 0:
                    break
                if deadline is None:
                    deadline = time.monotonic() + patience
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._done >= target:
                error = self._errors.get(target)
                if error is not None:
                    raise error
                return
            # nobody is syncing and our change is not covered: lead
            self._running = True
            self._started += 1
            gen = self._started
        error = None
        try:
            if fsync is not None:
                fsync()
            else:
                assert self.path is not None
                fsync_dir(self.path)
        except BaseException as e:
            error = e
        with self._cond:
            self._running = False
            self._done = gen
            self.fsyncs += 1
            if error is not None:
                self._errors[gen] = error
            for old in [g for g in self._errors if g < gen - 1000]:
                del self._errors[old]
            self._cond.notify_all()
        if error is not None:
            raise error


class FileSystemSync:
    """
    Group commit of C{syncfs()}, one group per file system (device).

    With C{spool.sync = "syncfs"} nothing is fsync'd file by file: a
    writer creates its files, renames or links them into place, and then
    calls L{sync} with a descriptor on that file system.  It returns once
    a C{syncfs()} that began after the call has completed (the rules of
    L{DirSync}), which wrote back every file, rename and link made before
    it on that file system -- the spool's and the Maildirs' alike -- so
    concurrent writers share one call.  Sound only where the spool and
    the mailboxes have a file system of their own (docs/spool.rst): the
    call also writes back whatever else is dirty there.
    """

    def __init__(self, flush: Callable[[int], None] = syncfs) -> None:
        self._flush = flush
        self._lock = threading.Lock()
        self._groups: dict[int, DirSync] = {}

    def group(self, device: int) -> DirSync:
        """The group commit of the file system C{device} (C{st_dev})."""
        with self._lock:
            found = self._groups.get(device)
            if found is None:
                found = self._groups[device] = DirSync()
            return found

    def sync(self, fd: int, patience: float = 0.0) -> None:
        """Return when every change made before this call on C{fd}'s file system is durable."""
        flush = self._flush
        self.group(os.fstat(fd).st_dev).sync(lambda: flush(fd), patience)

    @property
    def syncs(self) -> int:
        """C{syncfs()} calls made (for tests and the benchmark)."""
        with self._lock:
            return sum(g.fsyncs for g in self._groups.values())


#: The process's groups: one per file system, shared by the spool and the Maildir writers.
FILE_SYSTEMS = FileSystemSync()


class SyncFSDir:
    """
    A directory's stand-in for L{DirSync} under C{spool.sync = "syncfs"}:
    L{sync} makes the renames and unlinks in it durable with the group
    C{syncfs()} of its file system (L{FileSystemSync}).
    """

    def __init__(self, path: str, file_systems: FileSystemSync = FILE_SYSTEMS) -> None:
        self.path = path
        self.file_systems = file_systems

    def sync(self, fsync: Callable[[], None] | None = None, patience: float = 0.0) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.file_systems.sync(fd, patience)
        finally:
            os.close(fd)

    @property
    def fsyncs(self) -> int:
        return self.file_systems.syncs


def write_file(path: str, data: bytes, sync: bool) -> None:
    """Create C{path} (mode 0600, never over an existing file) holding C{data}; fsync it when C{sync}."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str) -> None:
    """Unlink C{path}, ignoring any error (a temporary file that may not exist)."""
    try:
        os.unlink(path)
    except OSError:
        pass



def unlink_logged(path: str, remove: Callable[[str], None] = os.unlink) -> None:
    """C{remove(path)}; a failure other than "already gone" is logged, not raised."""
    try:
        remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.error("spool: cannot remove {path}: {error}", path=path, error=e)
