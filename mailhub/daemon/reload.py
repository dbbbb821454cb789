"""
Reloading the configuration of a running daemon (SIGHUP, C{mailhub reload}).

Owns: L{Live}, the one place the reloadable components (directory, policy,
users file, outbound relay agent, the C{[server]} limits) are read from;
L{Delegate}, the stand-in each consumer (SMTP factories, router, pickup,
scheduler, local delivery) holds instead of the component itself; and
L{Reloader}, which re-reads the configuration file, refuses a broken one
(one log line, the running configuration stays), builds the new components
and swaps them into L{Live} in one step (the reactor thread runs nothing
else meanwhile, so no session sees half of a reload), and names the keys
that only a restart applies (L{RESTART_KEYS}).  Open SMTP sessions are
never dropped: a session already past RCPT keeps what it resolved, later
commands use the new settings.

Must not touch: listeners, the spool, the scheduler's queue.  Each
component is built by the same function L{mailhub.tap} uses at startup
(C{build}), so a reload and a start cannot disagree.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailhub.config import Config, ConfigError

__all__ = ["Live", "Delegate", "Outcome", "Reloader", "RESTART_KEYS", "target", "changed_keys", "install_sighup"]

log = Logger()

#: Keys whose new value takes a restart: the listeners and the files and
#: processes opened once at start.  A prefix ending in "." covers a section.
RESTART_KEYS = (
    "server.smtp", "server.submission", "server.smtps", "server.http", "server.http_max_body",
    "server.http_admins", "server.event_log", "server.mail_log", "server.hostname", "server.processes",
    "spool.", "local.mailboxes", "local.mode", "local.home_maildir", "local.min_uid", "local.max_uid",
    "local.delivery_processes", "local.deliver_on_accept",
    "relay.min_backoff", "relay.max_backoff", "relay.max_queue_lifetime", "relay.delay_warning",
    "relay.concurrency", "relay.destination_concurrency",
    "auth.max_failures", "auth.failure_window", "auth.failure_delay",
    "milter",  # the [[milter]] tables are wired into the listeners at start
    "dkim.", "mailauth.",
)

#: Keys the local delivery processes were started with: reloaded by
#: starting new processes (L{mailhub.delivery.localproc.LocalDeliveryProcesses.reconfigure}).
PROCESS_KEYS: tuple[str, ...] = ()


def _flat(config: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section in ("server", "spool", "local", "relay", "auth", "submission", "dkim", "mailauth"):
        table = getattr(config, section)
        for f in dataclasses.fields(table):
            value = getattr(table, f.name)
            out[f"{section}.{f.name}"] = dict(value) if f.name == "routes" else value
    out["milter"] = config.milters
    return out


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ, sorted."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _restart_only(key: str, fixed: tuple[str, ...] = ()) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in (*RESTART_KEYS, *fixed))


def needs_restart(key: str, old: Config, new: Config, fixed: tuple[str, ...] = ()) -> bool:
    if _restart_only(key, fixed):
        return True
    if key in PROCESS_KEYS and old.local.delivery_processes:
        return True
    # switching STARTTLS or AUTH on or off changes what the listeners offer
    if key in ("server.tls_cert", "server.tls_key"):
        return (old.server.tls_cert is None) != (new.server.tls_cert is None)
    if key == "auth.users":
        return (old.auth.users is None) != (new.auth.users is None)
    return False


class Live:
    """
    The current reloadable components, swapped together by L{Reloader}.
    Attributes: C{config}, C{server} (C{config.server}), C{directory},
    C{policy}, C{users} (or C{None}), C{remote}.
    """

    directory: Any
    policy: Any
    users: Any
    remote: Any

    def __init__(self, config: Config, **components: Any) -> None:
        self.config = config
        self.server = config.server
        self.__dict__.update(components)

    def swap(self, config: Config, **components: Any) -> None:
        self.config = config
        self.server = config.server
        self.__dict__.update(components)


class Delegate:
    """
    Stands for C{getattr(live, name)}: every attribute is looked up on the
    component current at the time of the call, so a consumer built once
    sees every reload.
    """

    def __init__(self, live: Live, name: str) -> None:
        object.__setattr__(self, "_live", live)
        object.__setattr__(self, "_name", name)

    @staticmethod
    def of(live: Live, name: str) -> Any:
        """A delegate for C{name}, typed as the component it stands for."""
        return Delegate(live, name)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(getattr(self._live, self._name), attribute)

    def __repr__(self) -> str:
        return f"<live {self._name}: {getattr(self._live, self._name)!r}>"


def target(component: Any) -> Any:
    """The object a L{Delegate} currently stands for (any other object: itself)."""
    if isinstance(component, Delegate):
        return getattr(component._live, component._name)
    return component


@dataclass(frozen=True)
class Outcome:
    """What a reload did: C{applied}, or the C{refused} reason; C{restart}: keys left for a restart."""

    applied: bool
    refused: str = ""
    changed: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()

    def summary(self) -> str:
        if not self.applied:
            return f"reload refused, keeping the running configuration: {self.refused}"
        applied = [k for k in self.changed if k not in self.restart]
        text = "configuration reloaded: " + (", ".join(applied) + " applied" if applied else "no change applied")
        if self.restart:
            text += "; needs a restart: " + ", ".join(self.restart)
        return text


class Reloader:
    """
    @param load: reads and checks the configuration file again (raises
        L{ConfigError}).
    @param build: builds the reloadable components of a configuration,
        given the running ones (a dict of keyword arguments for
        L{Live.swap}); raises L{ConfigError} or C{ValueError} when it cannot.
    @param also: called after every reload attempt (certificate, log files).
    @param retire: called with the components a swap replaced (stop the old
        relay agent's idle connections).
    @param fixed: more keys (or section prefixes ending in ".") that only a
        restart applies in this daemon: the C{local.} keys when the
        privileged delivery processes were started with them before the
        daemon gave up root.
    """

    def __init__(
        self,
        live: Live,
        load: Callable[[], Config],
        build: Callable[[Config, Live], dict[str, Any]],
        also: Callable[[], Any] | None = None,
        retire: Callable[[dict[str, Any]], Any] | None = None,
        fixed: tuple[str, ...] = (),
    ) -> None:
        self.live = live
        #: the configuration the daemon started with: what its listeners,
        #: spool and other restart-only settings really are
        self.started = live.config
        self.fixed = fixed
        self.load = load
        self.build = build
        self.also = also
        self.retire = retire

    def reload(self, quiet: bool = False) -> Outcome:
        """Re-read, check, apply; log one line with the outcome (C{quiet}: only a refusal)."""
        try:
            outcome = self._reload()
        finally:
            if self.also is not None:
                self.also()
        if outcome.applied and quiet:
            return outcome
        if outcome.applied:
            log.info("{summary}", summary=outcome.summary())
        else:
            log.error("{summary}", summary=outcome.summary())
        return outcome

    def _reload(self) -> Outcome:
        old = self.live.config
        try:
            new = self.load()
        except ConfigError as e:
            return Outcome(False, str(e))
        # Restart-only keys are compared with what runs (the configuration
        # the daemon started with), so a key put back needs nothing and one
        # still waiting is named at every reload until the restart.
        restart = tuple(k for k in changed_keys(self.started, new) if needs_restart(k, self.started, new, self.fixed))
        changed = [k for k in changed_keys(old, new) if k not in restart and not _restart_only(k, self.fixed)]
        if not changed:
            return Outcome(True, changed=restart, restart=restart)
        try:
            components = self.build(new, self.live)
        except (ConfigError, ValueError, OSError) as e:
            return Outcome(False, str(e))
        replaced = {name: getattr(self.live, name, None) for name in components}
        self.live.swap(new, **components)
        if self.retire is not None:
            self.retire({k: v for k, v in replaced.items() if v is not components[k]})
        return Outcome(True, changed=(*changed, *restart), restart=restart)


def install_sighup(reload: Callable[[], Any], reactor: Any) -> Callable[[], None]:
    """
    Run C{reload} in the reactor thread on every SIGHUP (C{kill -HUP},
    C{systemctl reload}, logrotate's postrotate).  The handler only
    schedules the work (C{callFromThread} is safe from a signal handler).

    @return: a function that restores the previous handler.
    """

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(lambda: defer.maybeDeferred(reload).addErrback(
            lambda f: log.failure("reload failed", f)))

    previous = signal.signal(signal.SIGHUP, handler)

    def restore() -> None:
        signal.signal(signal.SIGHUP, previous)

    return restore
