"""
The resolver: who exists here, and where their mail goes.

Owns: the answer to "is this a local domain?", "does this local address
exist, and to which final addresses does it expand?" (address extensions,
the implicit aliases, the postmaster rule, alias expansion with its loop,
depth and fan-out limits) and "which Maildir is this address?" (a path
below the mailbox root with no symlink in it, or a system account).  Looks
at, but never writes, the mailbox tree; asks the aliases file
(L{mailhub.delivery.aliases.AliasesFile}) for the targets of a name, and has
it re-read at most once a second (L{RELOAD_INTERVAL}, by the injected clock).

Must not touch: the aliases(5) syntax and reading its files
(L{mailhub.delivery.aliases}), message bytes, the spool, the network, the
reactor.  The one place that creates Maildirs is L{mailhub.delivery.local};
the one place that turns a L{RecipientError} into an SMTP reply is the
policy/server.

Layout (virtual mode, the default): mail for C{user@domain} lives in
C{<mailboxes>/<domain>/<user>/}, where C{domain} is the normalised domain
(lower case, IDNA A-labels) and C{user} is L{address.Mailbox.local_key}
(unquoted, case-folded).  C{root}, C{MAILER-DAEMON} and C{abuse} without an
alias or mailbox of their own mean postmaster (L{IMPLICIT_ALIASES}), whose
Maildir is created on first delivery.  System mode: the local parts are the
host's accounts (L{system.Accounts}) in every local domain, mail goes to
C{~user/Maildir}, postmaster without an alias means root, MAILER-DAEMON and
abuse mean postmaster.

Aliases: C{|command} and C{/file} targets are never run; an alias with one
is refused (550 5.3.0).  An alias that needs an unusable C{:include:} file
answers 451 4.3.0 (see docs/delivery.rst).

About 550 lines, one job: the expansion (extensions, implicit aliases,
loops through aliases and include files, depth and fan-out) and the
mailbox checks it consults at each step are one decision, the one the
RCPT reply and the delivery agent both rely on.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailhub import address
from mailhub.address import AddressError, Mailbox, is_safe_local_part
from mailhub.config import DEFAULT_HOME_MAILDIR, MAX_UID, MIN_UID, check_maildir_name
from mailhub.delivery import system
from mailhub.delivery.aliases import AliasesFile, AliasTarget
from mailhub.delivery.errors import (
    AliasLoop,
    AliasUnavailable,
    InvalidMailbox,
    RecipientError,
    UnknownRecipient,
    UnsafeMailbox,
    UnsupportedAlias,
)

__all__ = [
    "Directory",
    "directory_args",
    "IMPLICIT_ALIASES",
    "MAX_ALIAS_DEPTH",
    "MAX_ALIAS_FANOUT",
]

log = Logger()

#: Nesting limit of alias expansion (sendmail's MaxAliasRecursion is 10, Postfix's 1000).
MAX_ALIAS_DEPTH = 20
#: Most addresses one recipient may expand to (Postfix duplicate_filter_limit is 1000).
MAX_ALIAS_FANOUT = 1000
#: The aliases file is stat()ed at most this often (seconds of the injected clock).
RELOAD_INTERVAL = 1.0


class _WallClock:
    """Used when no clock is injected; only C{seconds()} is needed."""

    def seconds(self) -> float:
        return time.monotonic()


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*\Z")


def _format_address(local: str, domain: str) -> str:
    """C{local@domain}, quoting the local part when it is not a dot-atom."""
    if not _DOT_ATOM.match(local):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{local}@{domain}"


def _split_address(text: str) -> tuple[str, str]:
    """(folded local part, normalised domain) of a C{local@domain} string."""
    at = text.rfind("@")
    if at <= 0:
        raise InvalidMailbox()
    local, domain = text[:at], text[at + 1 :]
    try:
        return Mailbox(local, domain).local_key, address.normalize_domain(domain)
    except AddressError:
        raise InvalidMailbox()


#: In system mode, postmaster without an alias means root (Debian's /etc/aliases default).
_POSTMASTER_TO_ROOT = (AliasTarget("root", None, "root"),)
_TO_POSTMASTER = (AliasTarget("postmaster", None, "postmaster"),)
#: Names that exist in every local domain as aliases of postmaster unless
#: the aliases file defines them or they have a mailbox of their own
#: (Postfix's sample aliases file).  System mode: root is an account.
IMPLICIT_ALIASES = {
    "virtual": {"root": _TO_POSTMASTER, "mailer-daemon": _TO_POSTMASTER, "abuse": _TO_POSTMASTER},
    "system": {"mailer-daemon": _TO_POSTMASTER, "abuse": _TO_POSTMASTER},
}

MODES = ("virtual", "system")

#: Seconds a mailbox found at RCPT time is remembered (L{Directory._has_mailbox}).
MAILBOX_CACHE_TTL = 1.0
#: Mailboxes remembered at most (the table is simply cleared when full).
MAILBOX_CACHE_SIZE = 10000


class Directory:
    """
    Local domains, mailboxes and aliases.

    @param domains: the local domains (any case, U-labels or A-labels).
    @param mailboxes: the mailbox root; C{<root>/<domain>/<user>/} are Maildirs
        (virtual mode; unused in system mode).
    @param users: addresses (C{"user@domain"}) or local parts (C{"user"}, in
        every local domain) that exist even before their Maildir does
        (virtual mode only).
    @param aliases_path: an aliases(5) file, reloaded when it changes.
    @param separator: the address extension separator (C{"+"}); C{""}
        disables extensions.
    @param clock: used to check the aliases file at most once per second.
    @param mode: C{"virtual"} (mailboxes under C{mailboxes}) or C{"system"}
        (local parts are the host's accounts, in every local domain; mail
        goes to C{~user/<home_maildir>}, see L{mailhub.delivery.system}).
    @param home_maildir: system mode: the Maildir relative to the home directory.
    @param passwd_lookup: system mode: C{pwd.getpwnam} or a fake of it.
    @param min_uid: system mode: the lowest uid (besides root's) with a mailbox.
    @param max_uid: system mode: the highest uid with a mailbox.

    @raise mailhub.delivery.aliases.AliasesError: if C{aliases_path} cannot be read or parsed at start.
    @raise ValueError: unknown mode, bad C{home_maildir}, C{users} in system mode.
    """

    def __init__(
        self,
        domains: Sequence[str],
        mailboxes: str,
        users: Sequence[str] | None = None,
        aliases_path: str | None = None,
        separator: str = "+",
        clock: IReactorTime | None = None,
        *,
        mode: str = "virtual",
        home_maildir: str = DEFAULT_HOME_MAILDIR,
        passwd_lookup: Callable[[str], Any] = pwd.getpwnam,
        min_uid: int = MIN_UID,
        max_uid: int = MAX_UID,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"local mode must be one of {', '.join(MODES)}, not {mode!r}")
        if mode == "system" and users:
            raise ValueError("local.users cannot be used in system mode (the accounts are the users)")
        self.mode = mode
        self.home_maildir = check_maildir_name(home_maildir)
        self.accounts = system.Accounts(passwd_lookup, min_uid, max_uid)
        normalised = [address.normalize_domain(d) for d in domains]
        self.domains = frozenset(normalised)
        #: The first configured domain (normalised): where a bare <postmaster> goes.
        self.primary_domain = normalised[0] if normalised else "localhost"
        self.mailboxes = os.path.abspath(mailboxes)
        self.separator = separator
        self.clock = clock if clock is not None else _WallClock()
        self._any_domain_users: set[str] = set()
        self._domain_users: set[tuple[str, str]] = set()
        for entry in users or ():
            if "@" in entry:
                self._domain_users.add(_split_address(entry))
            else:
                self._any_domain_users.add(entry.lower())
        self.aliases_path = aliases_path
        self._last_check = float("-inf")
        # (folded local, domain) -> clock time until which its mailbox is known to exist
        self._found: dict[tuple[str, str], float] = {}
        #: the aliases file as loaded (None: no aliases file)
        self.aliases: AliasesFile | None = None
        if aliases_path is not None:
            self.aliases = AliasesFile(aliases_path, self.domains)
            self._last_check = self.clock.seconds()

    # -- domains --------------------------------------------------------------------

    def is_local(self, domain: str) -> bool:
        """Whether C{domain} is one of ours, compared in normalised form."""
        try:
            return address.normalize_domain(domain) in self.domains
        except AddressError:
            return False

    # -- aliases file ----------------------------------------------------------------

    def _maybe_reload(self) -> None:
        """Reload the aliases file and include files that changed; at most one check per second."""
        if self.aliases is None:
            return
        now = self.clock.seconds()
        if now - self._last_check < RELOAD_INTERVAL:
            return
        self._last_check = now
        self.aliases.refresh()

    def _alias(self, local: str, domain: str) -> tuple[AliasTarget, ...] | None:
        targets = self.aliases.lookup(local, domain) if self.aliases is not None else None
        if not targets and self.mode == "system" and local == "postmaster":
            return _POSTMASTER_TO_ROOT
        # An alias whose every target was unusable is as if not defined.
        return targets or None

    # -- mailboxes ------------------------------------------------------------------

    def _path(self, local: str, domain: str) -> str:
        """The Maildir of (folded local, normalised domain), validated (not looked at)."""
        if not address.is_safe_local_part(local):
            raise InvalidMailbox()
        if domain not in self.domains:
            raise InvalidMailbox(text="not a local domain")
        if self.mode == "system":
            account = self.accounts.lookup(local)
            if account is None:
                raise UnknownRecipient()
            return os.path.join(account.home, *self.home_maildir)
        return os.path.join(self.mailboxes, domain, local)

    def _virtual_exists(self, local: str, domain: str) -> bool:
        """
        Whether the virtual mailbox directory C{<root>/<domain>/<local>}
        exists.  Containment is structural: the names are safe (checked by
        L{_path}) and neither the domain nor the mailbox directory may be a
        symbolic link, wherever it points (inside the root too), as
        delivery opens them without following links
        (L{system.open_virtual_maildir}).  The root itself may be a link.

        @raise UnsafeMailbox: the domain or mailbox directory is a symlink.
        """
        path = self.mailboxes
        for name in (domain, local):
            path = os.path.join(path, name)
            try:
                st = os.lstat(path)
            except OSError:  # missing, or a parent that is not a directory
                return False
            if stat.S_ISLNK(st.st_mode):
                log.error(
                    "directory: mailbox {path} is a symbolic link (never followed below the mailbox root "
                    "{root}); refused",
                    path=path, root=self.mailboxes,
                )
                raise UnsafeMailbox()
            if not stat.S_ISDIR(st.st_mode):
                return False
        return True

    def _listed(self, local: str, domain: str) -> bool:
        return local in self._any_domain_users or (local, domain) in self._domain_users

    def _has_mailbox(self, local: str, domain: str) -> bool:
        """
        Virtual: a Maildir exists, may be created (users list), or it is the
        postmaster.  System: an account that receives mail (L{system.Accounts}).

        Virtual mode remembers a mailbox found for L{MAILBOX_CACHE_TTL}
        seconds (by the injected clock): the C{lstat}s of the symlink check
        are a large share of an RCPT's cost.
        Only "exists and is safe" is remembered, so a new mailbox is seen
        at once; a mailbox removed or turned into a symlink out of the root
        may still be accepted for that long -- delivery checks it again
        (L{maildir_for}, never cached) and keeps the mail queued (4.3.5).
        """
        if self.mode == "system":
            if not address.is_safe_local_part(local):
                raise InvalidMailbox()
            if domain not in self.domains:
                raise InvalidMailbox(text="not a local domain")
            return self.accounts.lookup(local) is not None
        now = self.clock.seconds()
        key = (local, domain)
        until = self._found.get(key)
        if until is not None and now < until:
            return True
        self._path(local, domain)  # validates the names
        exists = self._virtual_exists(local, domain)  # a symlink is refused, even for listed names
        found = exists or local == "postmaster" or self._listed(local, domain)
        if found:
            if len(self._found) >= MAILBOX_CACHE_SIZE:
                self._found.clear()
            self._found[key] = now + MAILBOX_CACHE_TTL
        else:
            self._found.pop(key, None)
        return found

    def maildir_for(self, address: str) -> str:
        """
        The absolute Maildir path of a final local address (as L{resolve}
        returns it).  Virtual mode: C{<mailboxes>/<domain>/<local>}, never
        with a symlink below the root.  Informational in both modes:
        L{mailhub.delivery.local} opens the Maildir by descriptor, through
        L{mailbox_location} or L{account_for}, never by this path.

        @raise InvalidMailbox: the local part cannot be a directory name or
            the domain is not local.
        @raise UnsafeMailbox: virtual mode, the domain or mailbox directory
            is a symlink.
        @raise UnknownRecipient: system mode, no such account.
        """
        local, domain = _split_address(address)
        path = self._path(local, domain)
        if self.mode != "system":
            self._virtual_exists(local, domain)
        return path

    def mailbox_location(self, address: str) -> tuple[str, str, str]:
        """
        Virtual mode: (mailbox root, domain directory name, mailbox directory
        name) of a final local address, the names validated (safe local
        part, local domain) for L{system.open_virtual_maildir}.

        @raise InvalidMailbox: the local part cannot be a directory name or
            the domain is not local.
        """
        local, domain = _split_address(address)
        self._path(local, domain)
        return self.mailboxes, domain, local

    def account_for(self, address: str) -> system.Account:
        """
        System mode: the account that owns the mailbox of a final local
        address (looked up again at delivery time).

        @raise InvalidMailbox: unsafe local part, or the domain is not local.
        @raise UnknownRecipient: no such account, or one without a mailbox.
        """
        local, domain = _split_address(address)
        if not is_safe_local_part(local) or domain not in self.domains:
            raise InvalidMailbox(text="invalid mailbox name" if domain in self.domains else "not a local domain")
        account = self.accounts.lookup(local)
        if account is None:
            raise UnknownRecipient()
        return account

    def may_create(self, address: str) -> bool:
        """
        Whether the Maildir of C{address} may be created on first delivery:
        it is in the users list or it is a postmaster (system mode: the
        account receives mail).  A mailbox that exists only as a directory
        and was removed after acceptance has vanished.
        """
        local, domain = _split_address(address)
        if self.mode == "system":
            return self.accounts.lookup(local) is not None
        return local == "postmaster" or self._listed(local, domain)

    # -- resolution ---------------------------------------------------------------------

    def resolve(self, mailbox: Mailbox) -> list[str]:
        """
        The final delivery addresses of C{mailbox} (a local-domain address):
        local ones as C{"user@domain"} in folded form, remote alias targets
        as written.  Order is kept, duplicates are removed.

        @raise InvalidMailbox: unsafe local part (C{..}, C{/}, NUL...), 550 5.1.3.
        @raise UnknownRecipient: no such mailbox or alias, 550 5.1.1.
        @raise AliasLoop: alias loop without a mailbox or too deep, 550 5.4.6.
        @raise UnsupportedAlias: the alias has a command or file target, 550 5.3.0.
        @raise AliasUnavailable: an include file it needs is unusable, 451 4.3.0.
        @raise RecipientError: expansion larger than L{MAX_ALIAS_FANOUT}, 550 5.5.3.
        @raise UnsafeMailbox: the mailbox is a symlink out of the root, 451 4.3.5.
        """
        try:
            domain = mailbox.domain_key
        except AddressError:
            raise InvalidMailbox(text="invalid domain")
        if domain not in self.domains:
            raise RecipientError(550, "5.1.2", "not a local domain")
        local = mailbox.local_key
        if not address.is_safe_local_part(local):
            raise InvalidMailbox()
        self._maybe_reload()
        out: dict[str, str] = {}
        budget = [MAX_ALIAS_FANOUT, MAX_ALIAS_FANOUT * 10]
        self._expand(local, domain, (), out, budget)
        return list(out.values())

    def _expand(
        self,
        local: str,
        domain: str,
        stack: tuple[tuple[str, str], ...],
        out: dict[str, str],
        budget: list[int],
    ) -> None:
        """Add the final addresses of (local, domain) to C{out}."""
        key = (local, domain)
        # Bound the work too, not just the result: a diamond-shaped alias
        # graph can visit the same names exponentially often.
        budget[1] -= 1
        if budget[1] < 0:
            raise RecipientError(550, "5.5.3", f"alias expands to more than {MAX_ALIAS_FANOUT} addresses")
        if key in stack:
            # sendmail semantics: an alias that (directly or through others)
            # lists itself means its own mailbox.
            if self._has_mailbox(local, domain):
                self._emit(_format_address(local, domain), out, budget)
                return
            if (
                local in IMPLICIT_ALIASES[self.mode]
                and self._alias(local, domain) is None
                and self._has_mailbox("postmaster", domain)
            ):
                # root -> postmaster (implicit) -> root (the aliases file,
                # Debian's "postmaster: root"): postmaster's own mailbox.
                self._emit(_format_address("postmaster", domain), out, budget)
                return
            raise AliasLoop(text=f"alias loop for {_format_address(local, domain)}")
        if len(stack) > MAX_ALIAS_DEPTH:
            raise AliasLoop(text="alias expansion too deep")
        candidates = [local]
        if self.separator and self.separator in local:
            base = local.split(self.separator, 1)[0]
            if base:
                candidates.append(base)
        for name in candidates:
            targets = self._alias(name, domain)
            if targets is not None:
                self._expand_targets(name, domain, targets, stack + ((name, domain),), out, budget)
                return
            if self._has_mailbox(name, domain):
                self._emit(_format_address(name, domain), out, budget)
                return
            default = IMPLICIT_ALIASES[self.mode].get(name)
            if default is not None:
                self._expand_targets(name, domain, default, stack + ((name, domain),), out, budget)
                return
        raise UnknownRecipient()

    def _expand_targets(
        self,
        name: str,
        domain: str,
        targets: tuple[AliasTarget, ...],
        stack: tuple[tuple[str, str], ...],
        out: dict[str, str],
        budget: list[int],
    ) -> None:
        """
        Expand the targets of alias (or include file) C{name}.  At least one
        must be reached; a missing member is skipped with a warning.
        """
        for target in targets:
            if target.kind in ("pipe", "file"):
                raise UnsupportedAlias()
        first_error: RecipientError | None = None
        unavailable: AliasUnavailable | None = None
        reached = 0
        for target in targets:
            if target.kind == "include":
                inc_key = ("\0:include:" + target.path, domain)
                if inc_key in stack:
                    raise AliasLoop(text=f"alias loop through :include:{target.path}")
                if len(stack) > MAX_ALIAS_DEPTH:
                    raise AliasLoop(text="alias expansion too deep")
                inc = self.aliases.include(target.path) if self.aliases is not None else None
                if inc is None or inc.targets is None:
                    unavailable = unavailable or AliasUnavailable()
                    continue
                try:
                    self._expand_targets(name, domain, inc.targets, stack + (inc_key,), out, budget)
                    reached += 1
                except UnknownRecipient as e:
                    first_error = first_error or e
                except AliasUnavailable as e:
                    unavailable = unavailable or e
                continue
            tdomain = domain if target.domain is None else target.domain
            if tdomain not in self.domains:
                # Remote: kept as written, for the router; duplicates compared
                # with the domain normalised.
                self._emit(target.text, out, budget, key=f"{target.text.rpartition('@')[0]}@{tdomain}")
                reached += 1
                continue
            try:
                if target.direct:
                    if not self._has_mailbox(target.local, tdomain):
                        raise UnknownRecipient()
                    self._emit(_format_address(target.local, tdomain), out, budget)
                else:
                    self._expand(target.local, tdomain, stack, out, budget)
                reached += 1
            except UnknownRecipient as e:
                # One broken member does not reject mail for the others
                # (Postfix bounces just that member); all broken rejects.
                log.warn(
                    "aliases: alias {alias}: target {target} does not exist",
                    alias=_format_address(name, domain), target=_format_address(target.local, tdomain),
                )
                first_error = first_error or e
            except AliasUnavailable as e:
                unavailable = unavailable or e
        if not reached:
            # Temporary wins: the missing include may hold the members.
            raise unavailable or first_error or UnknownRecipient()

    def _emit(self, final: str, out: dict[str, str], budget: list[int], key: str | None = None) -> None:
        key = final if key is None else key
        if key in out:
            return
        budget[0] -= 1
        if budget[0] < 0:
            raise RecipientError(550, "5.5.3", f"alias expands to more than {MAX_ALIAS_FANOUT} addresses")
        out[key] = final




def directory_args(local: Any) -> dict[str, Any]:
    """
    The keyword arguments of L{Directory} for a C{[local]} table
    (L{mailhub.config.LocalConfig}), as JSON values: the daemon, its
    delivery processes and C{mailhub check-config} build the same directory
    from them.
    """
    return {
        "domains": list(local.domains),
        "mailboxes": local.mailboxes,
        "users": None if local.users is None else list(local.users),
        "aliases_path": local.aliases,
        "separator": local.extension_separator,
        "mode": local.mode,
        "home_maildir": local.home_maildir,
        "min_uid": local.min_uid,
        "max_uid": local.max_uid,
    }
