"""
The aliases(5) file: its format, its C{:include:} files, and reading them.

Owns: parsing aliases(5) text (L{parse_aliases}) and C{:include:} files
(L{parse_include}) into L{AliasTarget}s, the syntax errors
(L{AliasesError}, C{"FILE:LINE: problem"}) and the warnings about unusable
targets, reading an include file safely (L{load_include}: no symlink
followed, owned by root or the daemon's user, not world-writable, bounded
size), and the loaded file itself (L{AliasesFile}: the table, its include
files, re-read when their (mtime, size, inode) change).

Pure apart from reading those files.  Must not touch: what a name means
(local domains, mailboxes, implicit aliases, expansion and its loops: the
resolver, L{mailhub.delivery.directory}), the reactor, message bytes.

Targets: addresses, C{\\user} (that mailbox, no further aliasing) and
C{:include:/path}.  C{|command} and C{/file} targets are kept as such and
logged: mailhub never runs or writes them, the resolver refuses an alias
that has one (550 5.3.0).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from twisted.logger import Logger

from mailhub import address
from mailhub.address import AddressError, Mailbox

__all__ = [
    "AliasesError",
    "AliasTarget",
    "AliasesFile",
    "Include",
    "is_safe_include",
    "load_include",
    "parse_aliases",
    "parse_include",
    "MAX_INCLUDE_SIZE",
]

log = Logger()


class AliasesError(ValueError):
    """The aliases file cannot be read or has a syntax error (C{"FILE:LINE: problem"})."""


@dataclass(frozen=True)
class AliasTarget:
    """
    One parsed alias target.

    C{kind} is C{"address"} (a local part in the alias's own domain when
    C{domain} is None, else a full address; C{direct} for C{\\name}, which
    skips alias lookup), C{"include"} (C{path} holds more targets) or
    C{"pipe"} / C{"file"} (never run or written: the alias is rejected).
    """

    local: str  # folded local part ("" for include/pipe/file)
    domain: str | None  # normalised domain, or None for "the alias's own domain"
    text: str  # as written, for remote addresses and messages
    kind: str = "address"
    direct: bool = False
    path: str = ""  # :include: file
    where: str = ""  # FILE:LINE, for messages


def _unquote_target(raw: str) -> str:
    """C{"|cmd arg"} -> C{|cmd arg}: quoted pipe/file/include targets, as sendmail allows."""
    if len(raw) > 1 and raw.startswith('"') and raw.endswith('"') and raw[1:2] in ("|", "/", ":"):
        return raw[1:-1]
    return raw


def _split_targets(text: str) -> list[str]:
    """Split C{a, "b, c", d} on commas outside double quotes."""
    out, cur, quoted, escaped = [], [], False, False
    for ch in text:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            cur.append(ch)
            escaped = True
        elif ch == '"':
            cur.append(ch)
            quoted = not quoted
        elif ch == "," and not quoted:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return [t for t in out if t]


def _parse_target(raw: str) -> AliasTarget:
    """@raise ValueError: if C{raw} is not a usable address."""
    if "@" in raw:
        mb = address.parse_mailbox(raw)  # AddressError is a ValueError
        local = mb.local_key
        if not address.is_safe_local_part(local):
            raise ValueError("unsafe local part")
        return AliasTarget(local, mb.domain_key, raw)
    direct = False
    if raw.startswith("\\"):  # sendmail: \\user = the mailbox, no further aliasing
        direct, raw = True, raw[1:]
    if raw.startswith('"'):
        if len(raw) < 2 or not raw.endswith('"'):
            raise ValueError("unbalanced quotes")
        local = Mailbox(raw, "x").local_key
    else:
        local = raw.lower()
        if any(c.isspace() for c in local):
            raise ValueError("not a valid local part")
    if not address.is_safe_local_part(local):
        raise ValueError("not a valid local part")
    return AliasTarget(local, None, raw, direct=direct)


def _parse_one(raw: str, filename: str, number: int, owner: str) -> AliasTarget | None:
    """
    One target as written in C{filename} line C{number}, or None (logged)
    when it is not usable.  C{owner} names the alias (or include file) for
    the messages.
    """
    where = f"{filename}:{number}"
    text = _unquote_target(raw)
    if text.lower().startswith(":include:"):
        path = text[len(":include:") :].strip()
        if not os.path.isabs(path):
            log.warn(
                "aliases: {where}: target {target!r} ignored: an :include: path must be absolute",
                where=where, target=raw,
            )
            return None
        return AliasTarget("", None, raw, kind="include", path=os.path.normpath(path), where=where)
    if text.startswith(("|", "/")):
        kind = "pipe" if text.startswith("|") else "file"
        log.error(
            "aliases: {where}: {owner}: {kind} target {target!r} is not supported "
            "(mailhub never runs commands or writes files named in aliases); "
            "mail for it is rejected with 550 5.3.0",
            where=where, owner=owner, kind=kind, target=raw,
        )
        return AliasTarget("", None, raw, kind=kind, where=where)
    try:
        target = _parse_target(raw)
    except ValueError as e:
        log.warn("aliases: {where}: target {target!r} ignored: {why}", where=where, target=raw, why=str(e))
        return None
    return target


def _parse_key(raw: str) -> tuple[str, str | None]:
    """(folded local part, normalised domain or None)."""
    name = raw.strip()
    quoted = name.startswith('"') and name.endswith('"') and len(name) > 1
    if quoted:
        name = Mailbox(name, "x").local_key
        domain = None
    elif "@" in name:
        local, _, dom = name.rpartition("@")
        try:
            domain = address.normalize_domain(dom)
        except AddressError as e:
            raise ValueError(f"invalid domain in alias name {raw!r}: {e}")
        name = Mailbox(local, dom).local_key
    else:
        name = name.lower()
        domain = None
    if not name or not address.is_safe_local_part(name) or (not quoted and any(c.isspace() for c in name)):
        raise ValueError(f"invalid alias name {raw!r}")
    return name, domain


def parse_aliases(text: str, filename: str = "<aliases>") -> dict[tuple[str, str | None], tuple[AliasTarget, ...]]:
    """
    Parse aliases(5) text into C{{(name, domain or None): targets}}.

    Syntax: C{name: target, target, ...}; a line starting with whitespace
    continues the previous entry; lines whose first non-blank character is
    C{#} and blank lines are ignored.  Names are case-insensitive.  Targets:
    addresses, C{\\user} (that mailbox, no further aliasing) and
    C{:include:/path}.  C{|command} and C{/file} targets are kept as such
    (and logged as an error naming the file and line): an alias with one is
    rejected when used, never partly delivered.  A target that is not a
    valid address is ignored with a warning.

    @raise AliasesError: on a syntax error (C{"FILE:LINE: problem"}).
    """
    # Logical lines: (first physical line number, text).
    entries: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if not entries:
                raise AliasesError(f"{filename}:{number}: continuation line without an alias before it")
            first, prev = entries[-1]
            entries[-1] = (first, prev + " " + line.strip())
            continue
        entries.append((number, line.rstrip()))
    table: dict[tuple[str, str | None], tuple[AliasTarget, ...]] = {}
    for number, line in entries:
        name, sep, rest = line.partition(":")
        if not sep:
            raise AliasesError(f"{filename}:{number}: missing ':' after the alias name")
        try:
            key = _parse_key(name)
        except ValueError as e:
            raise AliasesError(f"{filename}:{number}: {e}")
        if key in table:
            log.warn(
                "aliases: {filename}:{line}: duplicate alias {name!r} ignored, the first one is used",
                filename=filename, line=number, name=name.strip(),
            )
            continue
        targets: list[AliasTarget] = []
        for raw in _split_targets(rest):
            target = _parse_one(raw, filename, number, f"alias {name.strip()!r}")
            if target is not None:
                targets.append(target)
        table[key] = tuple(targets)
    return table


def parse_include(text: str, filename: str) -> tuple[AliasTarget, ...]:
    """
    Parse an C{:include:} file: targets separated by commas or newlines,
    C{#} comment lines and blank lines ignored, the same target syntax as
    the aliases file (nested C{:include:} too).
    """
    targets: list[AliasTarget] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        for raw in _split_targets(line):
            target = _parse_one(raw, filename, number, f":include: file {filename}")
            if target is not None:
                targets.append(target)
    return tuple(targets)


#: Largest :include: file read (a list of addresses; anything bigger is a mistake).
MAX_INCLUDE_SIZE = 1 << 20


@dataclass(frozen=True)
class Include:
    """An C{:include:} file as last read: C{targets} None when it cannot be used (C{error} says why)."""

    sig: tuple[int, int, int] | None
    targets: tuple[AliasTarget, ...] | None  # None: unavailable
    error: str | None


def is_safe_include(st: os.stat_result) -> str | None:
    """
    Why an C{:include:} file with this C{fstat} must not be used, or None:
    a regular file owned by root or the daemon's user, not writable by
    others (else any local user could add themselves to a list, or point
    it at an outside address).
    """
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid} (must be root or the daemon's user)"
    if st.st_mode & stat.S_IWOTH:
        return "world-writable"
    return None


def load_include(path: str) -> tuple[tuple[AliasTarget, ...] | None, str | None]:
    """Read an include file safely: (targets, None) or (None, why not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, "is a symbolic link (not followed)"
        return None, f"cannot read: {e.strerror}"
    try:
        why = is_safe_include(os.fstat(fd))
        if why is not None:
            return None, why
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_INCLUDE_SIZE + 1)
    except OSError as e:
        return None, f"cannot read: {e.strerror}"
    finally:
        os.close(fd)
    if len(raw) > MAX_INCLUDE_SIZE:
        return None, f"larger than {MAX_INCLUDE_SIZE} bytes"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8: {e}"
    return parse_include(text, path), None


class AliasesFile:
    """
    An aliases file as loaded: its table (L{lookup}) and the C{:include:}
    files the table refers to (L{include}), read at construction and
    again by L{refresh} where they changed.  How often L{refresh} is
    called is the caller's (the resolver: at most once a second).

    @param path: the aliases file.
    @param domains: the local domains (normalised): an alias C{name@domain}
        for another domain is ignored with a warning.

    @raise AliasesError: the file cannot be read or parsed.
    """

    def __init__(self, path: str, domains: frozenset[str]) -> None:
        self.path = path
        self.domains = domains
        sig = self._stat()
        self.table = self._read()
        self._sig: tuple[int, int, int] | None = sig
        self._includes: dict[str, Include] = {}
        self._refresh_includes()

    def lookup(self, local: str, domain: str) -> tuple[AliasTarget, ...] | None:
        """The targets of alias C{local@domain}, else of C{local} in every domain, else None."""
        targets = self.table.get((local, domain))
        if targets is None:
            targets = self.table.get((local, None))
        return targets

    def include(self, path: str) -> Include | None:
        """The C{:include:} file C{path} as last read (None: not referred to)."""
        return self._includes.get(path)

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise AliasesError(f"{self.path}: cannot read: {e.strerror}")
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> dict[tuple[str, str | None], tuple[AliasTarget, ...]]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise AliasesError(f"{self.path}: cannot read: {e.strerror}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise AliasesError(f"{self.path}: not UTF-8: {e}")
        table = parse_aliases(text, self.path)
        for name, domain in table:
            if domain is not None and domain not in self.domains:
                log.warn(
                    "aliases: {filename}: alias {name}@{domain} ignored: {domain} is not a local domain",
                    filename=self.path, name=name, domain=domain,
                )
        return table

    def refresh(self) -> None:
        """
        Reload the aliases file and the include files that changed.  A file
        that cannot be read or parsed is logged once per change and the
        previous table is kept.
        """
        try:
            sig = self._stat()
        except AliasesError as e:
            if self._sig is not None:
                log.error("aliases: {error}; keeping the previous table", error=str(e))
                self._sig = None
            self._refresh_includes()
            return
        if sig != self._sig:
            # Remember the signature even when parsing fails, so a broken file is
            # reported once, not once a second.
            self._sig = sig
            try:
                table = self._read()
            except AliasesError as e:
                log.error("aliases: {error}; keeping the previous table", error=str(e))
            else:
                self.table = table
                log.info("aliases: reloaded {filename} ({count} aliases)", filename=self.path, count=len(table))
        self._refresh_includes()

    def _refresh_includes(self) -> None:
        """
        (Re)read the C{:include:} files the table refers to, directly or
        through other include files, where their (mtime, size, inode)
        changed.  A file that cannot be used is logged once per change and
        its aliases answer 451 until it is fixed.
        """
        pending = [t.path for targets in self.table.values() for t in targets if t.kind == "include"]
        seen: dict[str, Include] = {}
        while pending:
            path = pending.pop()
            if path in seen:
                continue
            try:
                st = os.lstat(path)
                sig: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                sig = None
            old = self._includes.get(path)
            if old is not None and sig is not None and old.sig == sig:
                inc = old
            else:
                targets, error = load_include(path)
                inc = Include(sig, targets, error)
                if error is not None and (old is None or old.error != error or old.sig != sig):
                    log.error(
                        "aliases: :include:{path} {error}; aliases using it answer 451 4.3.0 until it is fixed",
                        path=path, error=error,
                    )
            seen[path] = inc
            pending.extend(t.path for t in inc.targets or () if t.kind == "include")
        self._includes = seen
