"""
System mailboxes (local users are the host's accounts, mail goes to
~user/Maildir), and the one safe way of opening a Maildir in either mode.

Owns: the rule which passwd(5) accounts receive mail (L{Accounts}), and
opening a Maildir below a trusted base directory (L{open_below}): every
directory below the base is opened with C{O_NOFOLLOW | O_DIRECTORY}
relative to its parent's descriptor and created where missing (mode
0700).  A symlink anywhere below the base is refused, never followed, even
one that points back inside it, so nobody who can write in a mailbox can
redirect the daemon's writes.  System mode (L{open_maildir}): the base is
the account's home directory, each directory is handed to the account with
C{fchown} and must be owned by it.  Virtual mode (L{open_virtual_maildir}):
the base is the mailbox root (which may itself be a symlink: it is the
operator's), the path below it is C{DOMAIN/USER}, and ownership is not
looked at (the daemon's user, or the IMAP server's, owns the tree).

Must not touch: message bytes and Maildir file names (L{mailhub.delivery.local}),
aliases and address parsing (L{mailhub.delivery.directory}), the reactor.  Nothing
here changes the process's uid: it is shared by the reactor and worker
threads, so ownership is given per file and per directory instead.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from mailhub.config import MAX_UID, MIN_UID

__all__ = [
    "Account",
    "Accounts",
    "MaildirFds",
    "UnsafeLocation",
    "open_maildir",
    "open_below",
    "open_virtual_maildir",
    "NoMailbox",
    "give",
]

log = Logger()


_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class UnsafeLocation(OSError):
    """
    A Maildir location that must not be written: a symlink, not a directory,
    or owned by someone other than the account.  Already logged (once per
    delivery attempt) with the path and the reason.
    """


class NoMailbox(Exception):
    """
    A directory of a virtual mailbox is missing and may not be created
    (the mailbox vanished after its mail was accepted).
    """


@dataclass(frozen=True)
class Account:
    """A passwd entry that receives mail."""

    name: str
    uid: int
    gid: int
    home: str


class Accounts:
    """
    Which accounts have a mailbox.

    The rule: C{root}, and accounts whose uid is in C{[min_uid, max_uid]}
    (people: Debian's adduser and login.defs use 1000..60000).  System
    accounts (daemon, www-data, other uid-0 names, nobody = 65534) have no
    mailbox: mail for them needs an alias (C{www-data: root}), otherwise it
    is rejected like an unknown user, so mailhub never creates a Maildir in
    C{/var/www} or C{/usr/sbin}.  The login shell is not looked at: a
    mail-only account with C{nologin} is a normal reason to receive mail.

    Names are looked up as the directory folds them (lower case), as
    Postfix local(8) does.  Lookups go to NSS every time (no cache): an
    account added or removed takes effect at once.

    @param passwd_lookup: C{pwd.getpwnam} or a fake with the same contract
        (returns an object with C{pw_name, pw_uid, pw_gid, pw_dir}; raises
        C{KeyError} for an unknown name).
    """

    def __init__(
        self,
        passwd_lookup: Callable[[str], Any] = pwd.getpwnam,
        min_uid: int = MIN_UID,
        max_uid: int = MAX_UID,
    ) -> None:
        self.passwd_lookup = passwd_lookup
        self.min_uid = min_uid
        self.max_uid = max_uid

    def lookup(self, name: str) -> Account | None:
        """The account C{name} if it exists and receives mail, else C{None}."""
        try:
            pw = self.passwd_lookup(name)
        except (KeyError, ValueError, UnicodeError):  # unknown, NUL in name, ...
            return None
        if pw.pw_name != name:  # NSS modules that match case-insensitively
            return None
        uid = pw.pw_uid
        if uid == 0:
            if name != "root":
                return None
        elif not (self.min_uid <= uid <= self.max_uid):
            return None
        home = pw.pw_dir
        if not home or not os.path.isabs(home):
            return None
        return Account(name, uid, pw.pw_gid, home)


@dataclass
class MaildirFds:
    """
    Open descriptors of one Maildir and its tmp/new/cur; close() releases
    them.  C{uid}/C{gid}: the owner new files are given to (system mode),
    C{None} to leave them to the daemon's user (virtual mode).
    """

    path: str
    maildir: int
    tmp: int
    new: int
    cur: int
    uid: int | None
    gid: int | None

    def close(self) -> None:
        for fd in (self.tmp, self.new, self.cur, self.maildir):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.maildir = self.tmp = self.new = self.cur = -1

    def __enter__(self) -> MaildirFds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def give(fd: int, uid: int | None, gid: int | None) -> None:
    """
    C{fchown} C{fd} to (uid, gid) unless it already is (a daemon not running
    as root); nothing when C{uid} is C{None} (virtual mode).
    """
    if uid is None or gid is None:
        return
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.fchown(fd, uid, gid)


def _refuse(path: str, why: str) -> UnsafeLocation:
    log.error("local: refusing to deliver into {path}: {why}", path=path, why=why)
    return UnsafeLocation(why)


def _open_subdir(
    parent: int, parent_path: str, name: str, uid: int | None, gid: int | None, fsync: bool, create: bool = True
) -> int:
    """
    Open the directory C{name} in C{parent}, never following a symlink;
    where it is missing, create it (mode 0700, owned by uid:gid) if
    C{create}, else raise L{NoMailbox}.  With a C{uid}, the directory must
    belong to it.  Returns its descriptor.
    """
    path = os.path.join(parent_path, name)
    created = False
    try:
        fd = os.open(name, _NOFOLLOW_DIR, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise NoMailbox(path)
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
            created = True
        except FileExistsError:
            pass
        try:
            fd = os.open(name, _NOFOLLOW_DIR, dir_fd=parent)
        except OSError as e:
            raise _classify(e, parent, name, path)
    except OSError as e:
        raise _classify(e, parent, name, path)
    try:
        if uid is not None and gid is not None:
            st = os.fstat(fd)
            if created and (st.st_uid, st.st_gid) != (uid, gid):
                os.fchown(fd, uid, gid)
                st = os.fstat(fd)
            if st.st_uid != uid:
                raise _refuse(path, f"owned by uid {st.st_uid}, not by the recipient (uid {uid})")
        if created and fsync:
            os.fsync(parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _classify(e: OSError, parent: int, name: str, path: str) -> OSError:
    """
    A symlink (ELOOP, or ENOTDIR as Linux reports O_NOFOLLOW|O_DIRECTORY on
    a link) or a non-directory is a refusal; the rest stays an OSError.
    """
    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
        return e
    try:
        is_link = stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        is_link = e.errno == errno.ELOOP
    if is_link:
        return _refuse(path, "it is a symbolic link (never followed)")
    return _refuse(path, "it is not a directory")


def open_below(
    base: int,
    base_path: str,
    components: Sequence[str],
    uid: int | None = None,
    gid: int | None = None,
    fsync: bool = True,
    create: bool = True,
) -> MaildirFds:
    """
    Open the Maildir C{base_path/<components...>} and its tmp/new/cur,
    relative to the open directory C{base} (which stays the caller's).
    Every component is opened with C{O_NOFOLLOW | O_DIRECTORY} relative to
    its parent's descriptor: nothing below C{base} is ever followed, so the
    Maildir is inside C{base} by construction.  tmp/new/cur are always
    created where missing (mode 0700; with C{uid}, C{fchown}ed to it);
    C{components} too if C{create}, else a missing one is L{NoMailbox}.

    @raise UnsafeLocation: a symlink, a non-directory, or (with C{uid}) a
        foreign owner; logged here with the path.
    @raise NoMailbox: a component is missing and C{create} is false.
    @raise OSError: anything else (EACCES, ENOSPC...).
    """
    fds: list[int] = []
    try:
        parent, path = base, base_path
        for name in components:
            fds.append(_open_subdir(parent, path, name, uid, gid, fsync, create))
            parent, path = fds[-1], os.path.join(path, name)
        maildir = parent
        subs = []
        for sub in ("tmp", "new", "cur"):
            subs.append(_open_subdir(maildir, path, sub, uid, gid, fsync))
            fds.append(subs[-1])
        # Keep the Maildir and its subdirectories open; close the ones above.
        for fd in fds[:-4]:
            os.close(fd)
        return MaildirFds(path, maildir, subs[0], subs[1], subs[2], uid, gid)
    except BaseException:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        raise


def open_maildir(account: Account, components: Sequence[str], fsync: bool = True) -> MaildirFds:
    """
    Open C{~account/<components...>} and its tmp/new/cur for writing as root.

    The home directory itself comes from passwd (root's data) and is opened
    normally; it must be owned by the account (root's by root), otherwise
    nothing is created in it.  Everything below is opened by L{open_below}:
    created where missing (0700, then C{fchown} to the account) and must
    be owned by the account.

    @raise UnsafeLocation: a symlink, a non-directory, or a foreign owner
        (logged here with the path).
    @raise OSError: anything else (missing home directory, EACCES, ENOSPC...).
    """
    home = account.home
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if st.st_uid != account.uid:
            raise _refuse(home, f"home directory of {account.name} is owned by uid {st.st_uid}, not {account.uid}")
        if not components:
            raise ValueError("home_maildir has no components")
        return open_below(fd, home, components, account.uid, account.gid, fsync)
    finally:
        os.close(fd)


def open_virtual_maildir(root: str, domain: str, local: str, may_create: bool, fsync: bool = True) -> MaildirFds:
    """
    Open the virtual-mode Maildir C{<root>/<domain>/<local>} and its
    tmp/new/cur.  The root is opened normally (the operator may make it a
    symlink) and created with its parents where missing; C{domain} and
    C{local} (already validated names) are opened by L{open_below}, so a
    symlink at the domain, the mailbox, tmp, new or cur is refused wherever
    it points.  The domain and mailbox directories are created only when
    C{may_create} (a listed user or a postmaster), else a missing one is
    L{NoMailbox}.

    @raise UnsafeLocation: a symlink or a non-directory below the root (logged).
    @raise NoMailbox: the mailbox directory is missing and may not be created.
    @raise OSError: anything else.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(root, flags)
    except FileNotFoundError:
        if not may_create:
            raise NoMailbox(root)
        os.makedirs(root, 0o700, exist_ok=True)
        fd = os.open(root, flags)
    try:
        return open_below(fd, root, (domain, local), fsync=fsync, create=may_create)
    finally:
        os.close(fd)

