"""
The user the daemon runs as, and the directories that user must own.

Owns: deciding which user the daemon switches to (L{run_as}: C{server.user},
default C{mailhub} when started as root, or twistd's C{--uid/--gid}),
switching to it for good (L{drop_privileges}: supplementary groups, then
real, effective and saved gid and uid, then a check that root cannot be
regained and that no capability is left), and the start-up checks of the
directories and files that user works in (L{prepare_directory},
L{prepare_file}): created with the right owner and mode when missing,
refused with one line (L{PrivilegeError}) when they belong to someone
else.

Process model (docs/architecture.rst, "Processes and users"): everything
that parses bytes from the network (SMTP, TLS, HTTP), the scheduler, the
relay and the spool runs as this user.  Only the local delivery
supervisor of system mode (L{mailhub.delivery.supervisor}) keeps root; it is
started before the switch.

L{DropPrivileges} is the service that does the switch; L{mailhub.tap}
puts it last in the tree.

Must not touch: the reactor, the spool's files (only its directories'
owners and modes are checked).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.logger import Logger

__all__ = [
    "check_runnable",
    "NoDefaultUser",
    "DEFAULT_USER",
    "PrivilegeError",
    "RunAs",
    "run_as",
    "drop_privileges",
    "capabilities",
    "prepare_directory",
    "prepare_file",
    "prepare_for",
    "DropPrivileges",
]

log = Logger()

#: sysexits.h "cannot create" (as mailhub.tap's EX_OSERR).
EX_OSERR = 71

#: C{server.user} when mailhub is started as root and the key is not set.
DEFAULT_USER = "mailhub"

_CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


class PrivilegeError(Exception):
    """A problem with the daemon's user or its directories; C{str()} is one line."""


class NoDefaultUser(PrivilegeError):
    """Started as root, C{server.user} not set, and no account named C{mailhub}."""


@dataclass(frozen=True)
class RunAs:
    """
    The user the daemon switches to.  C{by_twistd}: twistd's C{--uid}
    named it and twistd switches itself after the privileged start.
    """

    name: str
    uid: int
    gid: int
    by_twistd: bool = False

    def describe(self) -> str:
        try:
            group = grp.getgrgid(self.gid).gr_name
        except KeyError:
            group = str(self.gid)
        return f"{self.name} (uid {self.uid}, gid {self.gid} {group})"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def run_as(
    configured: str | None,
    twistd_uid: int | None = None,
    twistd_gid: int | None = None,
    euid: int | None = None,
) -> RunAs | None:
    """
    The user to switch to, or C{None} when the daemon keeps the user it
    was started as.

     - Not started as root: nothing changes.  C{server.user} may only name
       that same user (a one-line error otherwise: switching needs root).
     - twistd C{--uid} (and C{--gid}): that user; twistd switches.  A
       C{server.user} naming someone else is an error.
     - Root: C{server.user}, default C{mailhub}.  C{server.user = "root"}
       keeps root (the daemon says so in its log).

    @raise PrivilegeError: an unknown user, or a switch that cannot happen.
    """
    euid = os.geteuid() if euid is None else euid
    if twistd_uid is not None:
        name = _user_name(twistd_uid)
        if configured is not None and configured != name:
            raise PrivilegeError(
                f"server.user: {configured!r} conflicts with twistd --uid {twistd_uid} ({name}); use one of them"
            )
        gid = twistd_gid if twistd_gid is not None else _primary_gid(twistd_uid)
        return RunAs(name, twistd_uid, gid, by_twistd=True)
    if euid != 0:
        if configured is None:
            return None
        try:
            pw = pwd.getpwnam(configured)
        except KeyError:
            raise PrivilegeError(f"server.user: no such user {configured!r}")
        if pw.pw_uid != euid:
            raise PrivilegeError(
                f"server.user: cannot switch to {configured!r}: mailhub runs as {_user_name(euid)} "
                f"(uid {euid}), not root; start it as root or remove the key"
            )
        return None
    name = configured if configured is not None else DEFAULT_USER
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        hint = (
            f" (create it: useradd --system --home-dir /var/lib/mailhub --shell /usr/sbin/nologin {name})"
            if configured is None else ""
        )
        raise (NoDefaultUser if configured is None else PrivilegeError)(f"server.user: no such user {name!r}{hint}")
    if pw.pw_uid == 0:
        return None
    return RunAs(pw.pw_name, pw.pw_uid, pw.pw_gid)


def _primary_gid(uid: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid


def drop_privileges(user: RunAs) -> None:
    """
    Become C{user} for good, as Postfix's C{set_ugid} and OpenSMTPD do:
    supplementary groups (the user's, from the group database), then real,
    effective and saved gid, then real, effective and saved uid.  Then
    check: every id is the user's, C{setuid(0)} fails, and the permitted
    and effective capability sets are empty.

    @raise PrivilegeError: a step failed or the check found a privilege left.
    """
    try:
        os.initgroups(user.name, user.gid)
        os.setresgid(user.gid, user.gid, user.gid)
        os.setresuid(user.uid, user.uid, user.uid)
    except OSError as e:
        raise PrivilegeError(f"cannot switch to user {user.name}: {e.strerror or e}")
    if os.getresuid() != (user.uid,) * 3 or os.getresgid() != (user.gid,) * 3:
        raise PrivilegeError(f"switching to user {user.name} left uids {os.getresuid()} gids {os.getresgid()}")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeError(f"switched to user {user.name} but could become root again")
    caps = capabilities()
    if caps.get("CapPrm") or caps.get("CapEff"):
        raise PrivilegeError(f"switched to user {user.name} but capabilities are left: {caps}")


def capabilities(pid: int | str = "self") -> dict[str, int]:
    """The C{Cap*} sets of a process from C{/proc/PID/status} (empty without /proc)."""
    caps: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in _CAP_FIELDS:
                    caps[name] = int(value.strip(), 16)
    except OSError:
        pass
    return caps


def prepare_directory(key: str, path: str, user: RunAs, mode: int = 0o700) -> None:
    """
    Make C{path} a directory of C{user}: created with C{mode} and given to
    the user when missing (its missing parents are created too, owned by
    root, 0755); when it exists it must be a directory owned by the user
    and not writable by group or others.

    @param key: the configuration key, for the error line.
    @raise PrivilegeError: one line saying what is wrong and how to fix it.
    """
    _check_path(key, path, user)
    _prepare_directory(key, path, user, mode)


def _check_path(key: str, path: str, user: RunAs) -> None:
    """Every existing directory above C{path} must let C{user} through (search permission)."""
    try:
        groups = set(os.getgrouplist(user.name, user.gid))
    except OSError:
        groups = {user.gid}
    ancestor = os.path.dirname(os.path.abspath(path))
    chain = []
    while True:
        chain.append(ancestor)
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            break
        ancestor = parent
    for directory in reversed(chain):
        try:
            st = os.stat(directory)
        except FileNotFoundError:
            return  # created below, 0755
        except OSError:
            continue
        if st.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            raise PrivilegeError(
                f"{key}: {user.name} cannot reach {path}: {directory} is mode "
                f"{stat.S_IMODE(st.st_mode):04o} owned by {_user_name(st.st_uid)} (chmod o+x {directory}, "
                f"or choose another place)"
            )


def check_runnable(user: RunAs, executable: str | None = None, package: str | None = None) -> None:
    """
    The interpreter and mailhub's own files must be usable by C{user}
    after the switch: the daemon imports modules later and starts its
    delivery processes as that user.  An interpreter under a home directory
    of mode 0700 (a per-user Python) would let the daemon start and accept
    mail it then cannot deliver.

    @raise PrivilegeError: one line naming the file and what is missing.
    """
    import sys

    import mailhub

    executable = os.path.realpath(executable or sys.executable)
    package = os.path.realpath(package or os.path.join(os.path.dirname(mailhub.__file__), "__init__.py"))
    for path, what, bits in (
        (executable, "run", (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)),
        (package, "read", (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)),
    ):
        _check_path("server.user", path, user)
        try:
            st = os.stat(path)
        except OSError as e:
            raise PrivilegeError(f"server.user: cannot check {path}: {e.strerror or e}") from None
        try:
            groups = set(os.getgrouplist(user.name, user.gid))
        except OSError:
            groups = {user.gid}
        bit = bits[0] if st.st_uid == user.uid else bits[1] if st.st_gid in groups else bits[2]
        if not st.st_mode & bit:
            raise PrivilegeError(
                f"server.user: {user.name} cannot {what} {path} (mode {stat.S_IMODE(st.st_mode):04o}): "
                "install mailhub where that user can use it (for example a venv made with /usr/bin/python3)"
            )


def _prepare_directory(key: str, path: str, user: RunAs, mode: int) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        try:
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, 0o755, exist_ok=True)
            os.mkdir(path, mode)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                os.fchown(fd, user.uid, user.gid)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        except OSError as e:
            raise PrivilegeError(f"{key}: cannot create {path} for user {user.name}: {e.strerror or e}")
        return
    except OSError as e:
        raise PrivilegeError(f"{key}: cannot use {path}: {e.strerror or e}")
    if not stat.S_ISDIR(st.st_mode):
        raise PrivilegeError(f"{key}: {path} is not a directory")
    if st.st_uid != user.uid:
        raise PrivilegeError(
            f"{key}: {path} is owned by {_user_name(st.st_uid)}, not by {user.name} "
            f"(mailhub runs as {user.name}): chown -R {user.name}: {path}"
        )
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise PrivilegeError(
            f"{key}: {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): chmod go-w {path}"
        )


def prepare_file(key: str, path: str, user: RunAs, mode: int = 0o640) -> None:
    """
    A log file the daemon appends to: created (C{mode}) and given to
    C{user} when missing, so the user can reopen it after a rotation.  An
    existing file is left as it is (it is opened before the switch).

    @raise PrivilegeError: it cannot be created.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        return
    except OSError as e:
        raise PrivilegeError(f"{key}: cannot create {path}: {e.strerror or e}")
    try:
        os.fchown(fd, user.uid, user.gid)
    except OSError as e:
        raise PrivilegeError(f"{key}: cannot give {path} to {user.name}: {e.strerror or e}")
    finally:
        os.close(fd)


def prepare_for(config: Any, user: RunAs) -> None:
    """
    Before the daemon opens anything: the spool (0700, with its
    subdirectories) and, in virtual mode, the mailbox root (0750) belong to
    C{user}, created so when missing; log files that do not exist yet are
    created for it.

    @raise PrivilegeError: something belongs to someone else, or cannot be created.
    """
    check_runnable(user)
    event_log = config.server.event_log
    if event_log and config.server.event_log_max_size:
        # mailhub rotates the event log itself: its directory (by default the
        # data directory, the spool's parent) must be the user's to write in.
        _prepare_rotation_directory(os.path.dirname(os.path.abspath(event_log)), user)
    spool = config.spool.path
    prepare_directory("spool.path", spool, user, 0o700)
    for sub in ("tmp", "queue", "envelopes", "corrupt"):
        prepare_directory("spool.path", os.path.join(spool, sub), user, 0o700)
    for sub in ("pickup", "pickup/tmp", "pickup/new"):  # made by the pickup service, with its own modes
        path = os.path.join(spool, sub)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if st.st_uid != user.uid:
            raise PrivilegeError(
                f"spool.path: {path} is owned by {_user_name(st.st_uid)}, not by {user.name}: "
                f"chown {user.name}: {path}"
            )
    if config.local.mode == "virtual":
        prepare_directory("local.mailboxes", config.local.mailboxes, user, 0o750)
    if config.server.event_log:
        prepare_file("server.event_log", config.server.event_log, user)
    if config.server.mail_log:
        prepare_file("server.mail_log", config.server.mail_log, user)
    history = getattr(config, "history", None)
    if history is not None and history.enabled and "://" not in history.database:
        # SQLite writes its -wal and -shm files beside the database
        _prepare_rotation_directory(os.path.dirname(os.path.abspath(history.database)), user, "history.database")
        prepare_file("history.database", history.database, user)


def _prepare_rotation_directory(directory: str, user: RunAs, key: str = "server.event_log") -> None:
    """
    The event log's directory (or the history database's): created for
    C{user} when missing, else it must let the user write.
    """
    _check_path(key, directory, user)
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        _prepare_directory(key, directory, user, 0o750)
        return
    try:
        groups = set(os.getgrouplist(user.name, user.gid))
    except OSError:
        groups = {user.gid}
    if st.st_uid == user.uid:
        bits = stat.S_IWUSR | stat.S_IXUSR
    elif st.st_gid in groups:
        bits = stat.S_IWGRP | stat.S_IXGRP
    else:
        bits = stat.S_IWOTH | stat.S_IXOTH
    if st.st_mode & bits != bits and key != "server.event_log":
        raise PrivilegeError(f"{key}: {user.name} cannot write in {directory}: chown {user.name}: {directory}")
    if st.st_mode & bits != bits:
        raise PrivilegeError(
            f"server.event_log: {user.name} cannot write in {directory}, where the event log is rotated: "
            f"chown {user.name}: {directory}, or set server.event_log_max_size = 0 and rotate it with "
            "logrotate's copytruncate"
        )


class DropPrivileges(service.Service):
    """
    The last service of the daemon's tree: its privileged start runs after
    every listener and the control socket are bound and the local delivery
    supervisor is started.  It gives the control socket (and its lock) to
    the user, then switches to the user (unless twistd's C{--uid} does that
    right after), and says in the log which user runs the daemon.

    @param fail: called with (one line, exit status) on a problem; must not return.
    """

    def __init__(self, user: RunAs, control_socket: str, supervisor: Any, fail: Callable[[str, int], Any]) -> None:
        self.user = user
        self.control_socket = control_socket
        self.supervisor = supervisor
        self.fail = fail

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        for path in (self.control_socket, self.control_socket + ".lock"):
            try:
                os.lchown(path, self.user.uid, self.user.gid)
            except FileNotFoundError:
                pass
            except OSError as e:
                self.fail(f"cannot give {path} to {self.user.name}: {e.strerror or e}", EX_OSERR)
        if not self.user.by_twistd:
            try:
                drop_privileges(self.user)
            except PrivilegeError as e:
                self.fail(str(e), EX_OSERR)

    def startService(self) -> None:
        super().startService()
        if os.geteuid() != self.user.uid:  # a switch that did not happen
            self.fail(f"mailhub should run as {self.user.name} but runs as uid {os.geteuid()}", EX_OSERR)
        pid = None
        if self.supervisor is not None and self.supervisor.children[0] is not None:
            pid = self.supervisor.children[0]._pid()
        log.info(
            "running as {user}{supervisor}",
            user=self.user.describe(),
            supervisor="" if pid is None else f"; the local delivery supervisor (root) is process {pid}",
        )
